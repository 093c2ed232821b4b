"""Many requests at once on the same wallets: no lost update, no overdraft, no deadlock,
and one idempotency key moves money once. Real threads, real database, real Redis."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from pydantic import BaseModel
from sqlalchemy import Engine, event
from sqlalchemy.engine import ExceptionContext
from sqlmodel import Session

from wallet import service
from wallet.audit import audit
from wallet.domain import Booking

from .factories import AuthFake, Signer, call, move, new_user, open_wallet, run_all


def test_sixty_withdrawals_of_50_from_1000_exactly_twenty_succeed(
    client: TestClient, signer: Signer, auth_fake: AuthFake
) -> None:
    user = new_user(signer, auth_fake)
    open_wallet(client, user, balance=1000)
    system = client.app.state.system_wallets.for_user("USD", user.id)  # type: ignore[attr-defined]
    op = service.withdraw_op(user_id=user.id, amount=50, currency="USD", system_wallet_id=system)
    payload = {"amount": 50, "currency": "USD"}
    results = run_all([lambda: call(client, user, "withdraw", uuid.uuid4().hex, payload, op) for _ in range(60)])
    codes = Counter(status for status, _ in results)
    assert codes == {200: 20, 422: 40}
    assert client.get("/wallet", headers=user.headers).json()["balance"] == 0
    assert audit(client.app.state.engine).violations == []  # type: ignore[attr-defined]


def test_crossed_transfers_conserve_the_total_without_errors(
    client: TestClient, signer: Signer, auth_fake: AuthFake
) -> None:
    a, b = new_user(signer, auth_fake), new_user(signer, auth_fake)
    wa, wb = open_wallet(client, a, balance=500)["id"], open_wallet(client, b, balance=500)["id"]
    jobs = []
    for i in range(40):
        sender, to = (a, wb) if i % 2 else (b, wa)
        op = service.transfer_op(user_id=sender.id, to_wallet_id=to, amount=7, currency="USD")
        payload = {"amount": 7, "currency": "USD", "to_account_id": to}
        jobs.append(
            lambda sender=sender, op=op, payload=payload: call(
                client, sender, "transfer", uuid.uuid4().hex, payload, op
            )
        )
    results = run_all(jobs)
    assert {status for status, _ in results} == {200}
    balances = [client.get("/wallet", headers=u.headers).json()["balance"] for u in (a, b)]
    assert balances == [500, 500]  # 20 each way
    assert audit(client.app.state.engine).violations == []  # type: ignore[attr-defined]


def test_thirty_requests_with_one_key_move_money_once(client: TestClient, signer: Signer, auth_fake: AuthFake) -> None:
    user = new_user(signer, auth_fake)
    open_wallet(client, user)
    system = client.app.state.system_wallets.for_user("USD", user.id)  # type: ignore[attr-defined]
    op = service.deposit_op(user_id=user.id, amount=100, currency="USD", system_wallet_id=system)
    key = uuid.uuid4().hex
    results = run_all([lambda: call(client, user, "deposit", key, {"amount": 100, "currency": "USD"}, op)] * 30)
    successes = {body for status, body in results if status == 200}
    assert len(successes) == 1  # every 200 is the same bytes
    assert {status for status, _ in results} <= {200, 409}
    assert client.get("/wallet", headers=user.headers).json()["balance"] == 100


def test_a_movement_whose_connection_dies_is_run_again_once(
    client: TestClient, signer: Signer, auth_fake: AuthFake
) -> None:
    engine = client.app.state.engine  # type: ignore[attr-defined]
    if engine.dialect.name != "postgresql":
        pytest.skip("needs Postgres (TEST_DATABASE_URL): a server that can drop our connection")
    user = new_user(signer, auth_fake)
    open_wallet(client, user, balance=100)
    system = client.app.state.system_wallets.for_user("USD", user.id)  # type: ignore[attr-defined]
    withdraw = service.withdraw_op(user_id=user.id, amount=30, currency="USD", system_wallet_id=system)
    attempts: list[int] = []

    def dropped_once(session: Session) -> tuple[BaseModel, Booking]:
        attempts.append(len(attempts) + 1)
        if len(attempts) == 1:  # the server kills this backend half way through the request
            session.connection().exec_driver_sql("SELECT pg_terminate_backend(pg_backend_pid())")
        return withdraw(session)

    status, body = call(client, user, "withdraw", uuid.uuid4().hex, {"amount": 30, "currency": "USD"}, dropped_once)
    assert (status, len(attempts)) == (200, 2)
    assert json.loads(body)["current_balance"] == 70
    assert client.get("/wallet", headers=user.headers).json()["balance"] == 70
    assert audit(engine).violations == []


@contextmanager
def first_record_commit_answer_lost(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Exception]]:
    """The first COMMIT of a transaction that wrote an idempotency record reaches the
    database, but its connection dies before the answer arrives: the driver raises, and
    SQLAlchemy sees a disconnect (connection_invalidated), as when the server or the
    network goes away at that moment."""
    dialect = engine.dialect
    real_commit = dialect.do_commit
    wrote_record: list[bool] = []
    lost: list[Exception] = []

    def note_record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "INSERT INTO idempotency_records" in statement:
            wrote_record.append(True)

    def commit(dbapi_connection: Any) -> None:
        real_commit(dbapi_connection)  # committed, for good
        if wrote_record and not lost:
            lost.append(dialect.loaded_dbapi.OperationalError("server closed the connection unexpectedly"))
            raise lost[0]
        wrote_record.clear()

    def is_disconnect(context: ExceptionContext) -> None:
        if lost and context.original_exception is lost[0]:
            context.is_disconnect = True

    monkeypatch.setattr(dialect, "do_commit", commit)
    event.listen(engine, "before_cursor_execute", note_record)
    event.listen(engine, "handle_error", is_disconnect)
    try:
        yield lost
    finally:
        event.remove(engine, "handle_error", is_disconnect)
        event.remove(engine, "before_cursor_execute", note_record)
        monkeypatch.setattr(dialect, "do_commit", real_commit)


def _counted(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_movement_whose_commit_answer_is_lost_answers_once_as_a_first_answer(
    client: TestClient, signer: Signer, auth_fake: AuthFake, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The re-run finds the record the lost COMMIT wrote: it is this request's own, so the
    client gets a first answer (no Idempotent-Replayed), counted as a movement; money
    moved once; the next request with the key is the replay."""
    engine = client.app.state.engine  # type: ignore[attr-defined]
    user = new_user(signer, auth_fake)
    open_wallet(client, user, balance=100)
    k = uuid.uuid4().hex
    ok = {"name": "wallet_movements_total", "type": "withdrawal", "outcome": "ok"}
    movements, replays = _counted(**ok), _counted("wallet_idempotency_events_total", event="replay")
    with first_record_commit_answer_lost(engine, monkeypatch) as lost:
        first = move(client, user, "withdraw", idem=k, amount=30)
    assert len(lost) == 1  # the commit's answer was lost once, after the commit
    assert (first.status_code, first.json()["current_balance"]) == (200, 70)
    assert "idempotent-replayed" not in first.headers
    assert (_counted(**ok), _counted("wallet_idempotency_events_total", event="replay")) == (movements + 1, replays)
    again = move(client, user, "withdraw", idem=k, amount=30)
    assert again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content
    assert client.get("/wallet", headers=user.headers).json()["balance"] == 70
    assert audit(engine).violations == []
