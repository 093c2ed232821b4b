"""Many requests at once on the same wallets: no lost update, no overdraft, no deadlock,
and one idempotency key moves money once. Real threads, real database, real Redis."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from svckit import aiodb
from wallet.audit import audit

from .factories import AuthFake, Signer, call, move, new_user, open_wallet, run_all, sync_engine


def test_sixty_withdrawals_of_50_from_1000_exactly_twenty_succeed(
    client: TestClient, signer: Signer, auth_fake: AuthFake
) -> None:
    user = new_user(signer, auth_fake)
    open_wallet(client, user, balance=1000)
    results = run_all([lambda: call(client, user, "withdraw", uuid.uuid4().hex, amount=50) for _ in range(60)])
    codes = Counter(status for status, _ in results)
    assert codes == {200: 20, 422: 40}
    assert client.get("/wallet", headers=user.headers).json()["balance"] == 0
    assert audit(sync_engine(client)).violations == []


def test_crossed_transfers_conserve_the_total_without_errors(
    client: TestClient, signer: Signer, auth_fake: AuthFake
) -> None:
    a, b = new_user(signer, auth_fake), new_user(signer, auth_fake)
    wa, wb = open_wallet(client, a, balance=500)["id"], open_wallet(client, b, balance=500)["id"]
    jobs = []
    for i in range(40):
        sender, to = (a, wb) if i % 2 else (b, wa)
        jobs.append(
            lambda sender=sender, to=to: call(client, sender, "transfer", uuid.uuid4().hex, amount=7, to_account_id=to)
        )
    results = run_all(jobs)
    assert {status for status, _ in results} == {200}
    balances = [client.get("/wallet", headers=u.headers).json()["balance"] for u in (a, b)]
    assert balances == [500, 500]  # 20 each way
    assert audit(sync_engine(client)).violations == []


def test_thirty_requests_with_one_key_move_money_once(client: TestClient, signer: Signer, auth_fake: AuthFake) -> None:
    user = new_user(signer, auth_fake)
    open_wallet(client, user)
    key = uuid.uuid4().hex
    results = run_all([lambda: call(client, user, "deposit", key, amount=100)] * 30)
    successes = {body for status, body in results if status == 200}
    assert len(successes) == 1  # every 200 is the same bytes
    assert {status for status, _ in results} <= {200, 409}
    assert client.get("/wallet", headers=user.headers).json()["balance"] == 100


CONNECTIONS = (aiodb._PgConnection, aiodb._SqliteConnection)


def test_a_movement_whose_connection_dies_is_run_again_once(
    client: TestClient, signer: Signer, auth_fake: AuthFake, monkeypatch: pytest.MonkeyPatch
) -> None:
    if client.app.state.db.dialect_name != "postgresql":  # type: ignore[attr-defined]
        pytest.skip("needs Postgres (TEST_DATABASE_URL): a server that can drop our connection")
    user = new_user(signer, auth_fake)
    open_wallet(client, user, balance=100)
    locks: list[int] = []
    real_execute = aiodb._PgConnection.execute

    async def dropped_once(self: Any, statement: Any, params: Any = None) -> Any:
        if "FOR UPDATE" in aiodb.compile_for_asyncpg(statement).sql:
            locks.append(len(locks) + 1)
            if len(locks) == 1:  # the server kills this backend half way through the request
                with contextlib.suppress(OperationalError):  # the kill ends its own statement too
                    await real_execute(self, text("SELECT pg_terminate_backend(pg_backend_pid())"))
        return await real_execute(self, statement, params)

    monkeypatch.setattr(aiodb._PgConnection, "execute", dropped_once)
    status, body = call(client, user, "withdraw", uuid.uuid4().hex, amount=30)
    monkeypatch.undo()
    assert (status, len(locks)) == (200, 2)
    assert json.loads(body)["current_balance"] == 70
    assert client.get("/wallet", headers=user.headers).json()["balance"] == 70
    assert audit(sync_engine(client)).violations == []


@contextmanager
def first_record_commit_answer_lost(
    monkeypatch: pytest.MonkeyPatch, on_lost: Callable[[], None] = lambda: None
) -> Iterator[list[Exception]]:
    """The first COMMIT of a transaction that wrote an idempotency record reaches the
    database, but its connection dies before the answer arrives: the driver raises a lost
    connection (connection_invalidated), as when the server or the network goes away at
    that moment. `on_lost` runs just before."""
    wrote_record: set[int] = set()
    lost: list[Exception] = []

    def patch(cls: Any) -> None:
        real_execute, real_execute_many, real_commit = cls.execute, cls.execute_many, cls.commit

        def note(self: Any, statement: Any) -> None:
            if getattr(statement, "table", None) is not None and statement.table.name == "idempotency_records":
                wrote_record.add(id(self))
            if "booked_record" in str(statement.compile()):
                wrote_record.add(id(self))

        async def execute(self: Any, statement: Any, params: Any = None) -> Any:
            note(self, statement)
            return await real_execute(self, statement, params)

        async def execute_many(self: Any, statement: Any, params: Any) -> None:
            note(self, statement)
            await real_execute_many(self, statement, params)

        async def commit(self: Any) -> None:
            await real_commit(self)  # committed, for good
            if id(self) in wrote_record and not lost:
                on_lost()
                lost.append(
                    OperationalError(
                        "COMMIT",
                        None,
                        ConnectionResetError("server closed the connection"),
                        connection_invalidated=True,
                    )
                )  # type: ignore[arg-type]
                raise lost[0]
            wrote_record.discard(id(self))

        monkeypatch.setattr(cls, "execute", execute)
        monkeypatch.setattr(cls, "execute_many", execute_many)
        monkeypatch.setattr(cls, "commit", commit)

    for cls in CONNECTIONS:
        patch(cls)
    try:
        yield lost
    finally:
        monkeypatch.undo()


def _counted(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_movement_whose_commit_answer_is_lost_answers_once_as_a_first_answer(
    client: TestClient, signer: Signer, auth_fake: AuthFake, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The re-run finds the record the lost COMMIT wrote: it is this request's own, so the
    client gets a first answer (no Idempotent-Replayed), counted as a movement; money
    moved once; the next request with the key is the replay."""
    user = new_user(signer, auth_fake)
    open_wallet(client, user, balance=100)
    k = uuid.uuid4().hex
    ok = {"name": "wallet_movements_total", "type": "withdrawal", "outcome": "ok"}
    movements, replays = _counted(**ok), _counted("wallet_idempotency_events_total", event="replay")
    with first_record_commit_answer_lost(monkeypatch) as lost:
        first = move(client, user, "withdraw", idem=k, amount=30)
    assert len(lost) == 1  # the commit's answer was lost once, after the commit
    assert (first.status_code, first.json()["current_balance"]) == (200, 70)
    assert "idempotent-replayed" not in first.headers
    assert (_counted(**ok), _counted("wallet_idempotency_events_total", event="replay")) == (movements + 1, replays)
    again = move(client, user, "withdraw", idem=k, amount=30)
    assert again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content
    assert client.get("/wallet", headers=user.headers).json()["balance"] == 70
    assert audit(sync_engine(client)).violations == []
