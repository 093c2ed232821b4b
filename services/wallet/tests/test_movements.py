"""Group commit (wallet.movements): movements that arrive together are booked in one
transaction, each exactly once with its own record, snapshots, chain links and receipts;
a refusal refuses only its own; a batch that fails runs each of its movements again alone.

Each test holds the process's only batch slot (WALLET_BATCHES_IN_FLIGHT=1, and no batch
counted as stalled) with a first movement until the others have queued, so they form one
batch of known size."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Connection, create_engine, select, text
from sqlalchemy.exc import OperationalError

from svckit import aiodb
from svckit.problems import ProblemError
from svckit.testing import alembic, fresh_database
from wallet import chain, repository, service
from wallet.audit import audit
from wallet.config import Settings
from wallet.errors import WalletBusy
from wallet.idempotency import Once
from wallet.models import LedgerEntry, OutboxMessage
from wallet.movements import Movement, Movements

from .conftest import INI, app_client
from .factories import AuthFake, Signer, User, call, new_user, open_wallet, sync_engine
from .test_concurrency import CONNECTIONS, first_record_commit_answer_lost

L = LedgerEntry.__table__  # type: ignore[attr-defined]
O = OutboxMessage.__table__  # type: ignore[attr-defined]  # noqa: E741


@pytest.fixture
def client(settings: Settings, signer: Signer, auth_fake: AuthFake) -> Iterator[TestClient]:
    with app_client(settings.model_copy(update={"batches_in_flight": 1}), signer, auth_fake) as c:
        c.app.state.uow.movements.STALLED_S = 60  # type: ignore[attr-defined]  # a held batch is not stalled
        yield c


@pytest.fixture
def batches(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of every batch the app books, in order."""
    movements: Movements = client.app.state.uow.movements  # type: ignore[attr-defined]
    real = movements._book
    sizes: list[int] = []

    async def book(items: list[Any]) -> Any:
        sizes.append(len(items))
        return await real(items)

    monkeypatch.setattr(movements, "_book", book)
    return sizes


Job = Callable[[], Awaitable[Any]]


def together(client: TestClient, first: Job, rest: list[Job]) -> list[Any]:
    """Run `first`, and hold its batch until every one of `rest` waits for the next, queued
    in the order given: the results (an answer, or the exception raised), `first`'s first."""
    movements: Movements = client.app.state.uow.movements  # type: ignore[attr-defined]
    real = movements._book

    async def run() -> list[Any]:
        released = asyncio.Event()

        async def held(items: list[Any]) -> Any:
            entered.set()
            await released.wait()
            return await real(items)

        entered = asyncio.Event()
        movements._book = held  # type: ignore[method-assign]
        try:
            head = asyncio.ensure_future(first())
            await entered.wait()
            movements._book = real  # type: ignore[method-assign]
            tail = []
            for job in rest:  # one after another, so they queue in this order
                tail.append(asyncio.ensure_future(job()))
                while len(movements._waiting) < len(tail) and not tail[-1].done():
                    await asyncio.sleep(0.001)
        finally:
            movements._book = real  # type: ignore[method-assign]
            released.set()
        return list(await asyncio.gather(head, *tail, return_exceptions=True))

    # The spy of `batches` (if any) wraps the real _book: `held` runs it once released.
    return client.portal.call(run)  # type: ignore[union-attr]


def uow(client: TestClient) -> Any:
    return client.app.state.uow  # type: ignore[attr-defined]


def deposit(client: TestClient, user: User, amount: int, key: str | None = None) -> Job:
    return lambda: service.deposit(
        uow(client), user_id=user.id, key=key or uuid.uuid4().hex, amount=amount, currency="USD"
    )


def withdraw(client: TestClient, user: User, amount: int) -> Job:
    return lambda: service.withdraw(uow(client), user_id=user.id, key=uuid.uuid4().hex, amount=amount, currency="USD")


def transfer(client: TestClient, user: User, to: int, amount: int, key: str) -> Job:
    return lambda: service.transfer(
        uow(client), user_id=user.id, key=key, to_wallet_id=to, amount=amount, currency="USD"
    )


def buggy(client: TestClient, user: User) -> Job:
    """A deposit whose plan has a bug: it raises, books nothing, records nothing."""

    def broken(_: Any) -> Any:
        raise RuntimeError("a bug in one plan")

    async def run() -> Any:
        once = Once(uow(client), user_id=user.id, endpoint="deposit", key=uuid.uuid4().hex, payload={"amount": 5})
        system = uow(client).system_wallets.for_user("USD", user.id)
        return await uow(client).movements.run(once, Movement(user.id, system, broken))

    return run


def test_movements_that_arrive_together_are_one_transaction_each_booked_once(
    client: TestClient, signer: Signer, auth_fake: AuthFake, batches: list[int]
) -> None:
    a, b = new_user(signer, auth_fake), new_user(signer, auth_fake)
    wa, wb = open_wallet(client, a, balance=1000)["id"], open_wallet(client, b, balance=1000)["id"]
    keys = [uuid.uuid4().hex for _ in range(9)]
    # Nine transfers on the same two wallets, crossing: each sees the balances the ones
    # before it in the batch left.
    jobs = [
        transfer(client, a, wb, 10 + i, k) if i % 2 else transfer(client, b, wa, 10 + i, k) for i, k in enumerate(keys)
    ]
    answers = together(client, deposit(client, a, 1), jobs)
    assert batches == [1, 9]
    assert all(not answer.replayed and answer.outcome.status_code == 200 for answer in answers)
    moved = sum(10 + i if i % 2 else -(10 + i) for i in range(9))
    balances = [client.get("/wallet", headers=u.headers).json()["balance"] for u in (a, b)]
    assert balances == [1000 + 1 - moved, 1000 + moved]
    # Each answer's balance is its own snapshot, in the order they were booked.
    sender_balances = [json.loads(answer.outcome.body)["current_balance"] for answer in answers[1:]]
    expected, running = [], {a.id: 1001, b.id: 1000}
    for i in range(9):
        sender, receiver = (a, b) if i % 2 else (b, a)
        running[sender.id] -= 10 + i
        running[receiver.id] += 10 + i
        expected.append(running[sender.id])
    assert sender_balances == expected
    with sync_engine(client).connect() as conn:
        entries = conn.execute(
            select(L.c.transaction_id, L.c.created_at).where(L.c.wallet_id == wa).order_by(L.c.id)
        ).all()
        payloads = conn.execute(select(O.c.payload)).scalars().all()
        assert (
            list(
                chain.verify(
                    conn, wallets_where=[chain.W.c.id.in_([wa, wb])], entries_where=[L.c.wallet_id.in_([wa, wb])]
                )
            )
            == []
        )
    # A wallet's entries go forward in id and in time, one microsecond apart at least.
    assert [e.transaction_id for e in entries] == sorted({e.transaction_id for e in entries})
    assert all(x.created_at < y.created_at for x, y in itertools.pairwise(entries))
    receipts = [json.loads(p)["kwargs"]["message"] for p in payloads]
    booked = {e.transaction_id for e in entries}
    mine = Counter((r["user_id"], r["kind"]) for r in receipts if r.get("transaction_id") in booked)
    # a's opening deposit, the deposit that held the batch, and each transfer on both sides
    assert mine == {
        (a.id, "deposit"): 2,
        (a.id, "transfer_sent"): 4,
        (a.id, "transfer_received"): 5,
        (b.id, "transfer_sent"): 5,
        (b.id, "transfer_received"): 4,
    }
    for k, answer in zip(keys, answers[1:], strict=True):  # each key answers its own outcome ever after
        sender = a if keys.index(k) % 2 else b
        to = wb if sender is a else wa
        status, body = call(client, sender, "transfer", k, amount=10 + keys.index(k), to_account_id=to)
        assert (status, body) == (200, answer.outcome.body.encode())
    assert audit(sync_engine(client)).violations == []


def test_a_refusal_in_a_batch_refuses_only_itself_and_is_recorded(
    client: TestClient, signer: Signer, auth_fake: AuthFake, batches: list[int]
) -> None:
    user = new_user(signer, auth_fake)
    open_wallet(client, user, balance=50)
    answers = together(client, deposit(client, user, 0 + 1), [withdraw(client, user, 20) for _ in range(5)])
    assert batches == [1, 5]
    codes = [answer.outcome.status_code for answer in answers[1:]]
    assert codes == [200, 200, 422, 422, 422]  # 51 holds two of 20, in the order they came
    refusal = json.loads(answers[-1].outcome.body)
    assert refusal["code"] == "insufficient_funds"
    assert client.get("/wallet", headers=user.headers).json()["balance"] == 11
    assert audit(sync_engine(client)).violations == []


def test_a_key_recorded_already_leaves_its_batch_and_replays(
    client: TestClient, signer: Signer, auth_fake: AuthFake, batches: list[int]
) -> None:
    """One movement's key is recorded already, but Redis forgot it (expired, flushed,
    failed over): the batch sees the record under the wallet locks and books the others;
    that one finds its record and answers its first answer as a replay."""
    user = new_user(signer, auth_fake)
    open_wallet(client, user)
    k = uuid.uuid4().hex
    status, first = call(client, user, "deposit", k, amount=7)
    assert status == 200
    redis = uow(client).idempotency.redis
    client.portal.call(redis.delete, f"idem:resp:{user.id}:deposit:{k}")  # type: ignore[union-attr]
    others = [deposit(client, user, 100) for _ in range(3)]
    batches.clear()
    answers = together(client, deposit(client, user, 1), [*others[:1], deposit(client, user, 7, key=k), *others[1:]])
    assert batches == [1, 4]  # no batch failed, none ran again
    again = answers[2]
    assert (again.replayed, again.outcome.body) == (True, first.decode())
    assert [a.outcome.status_code for a in answers] == [200] * 5
    assert not any(a.replayed for i, a in enumerate(answers) if i != 2)
    assert client.get("/wallet", headers=user.headers).json()["balance"] == 7 + 1 + 300
    assert audit(sync_engine(client)).violations == []


@pytest.mark.skipif(not os.environ.get("TEST_DATABASE_URL"), reason="Postgres' plan cache: needs TEST_DATABASE_URL")
def test_the_batchs_record_look_up_stays_an_index_look_up_as_the_records_grow(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Planned (and cached, as a generic plan) while the table is small, the look-up of a
    batch's keys must not go on reading the whole table as the records grow: no
    sequential scan of idempotency_records, one index look-up per key (migration 0012)."""
    with fresh_database("wallet_plan", tmp_path_factory.mktemp("plan")) as url:
        alembic(INI, url, "upgrade", "head")
        engine = create_engine(url, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:  # no ANALYZE meanwhile: it would replan any statement
            conn.execute(text("ALTER TABLE idempotency_records SET (autovacuum_enabled = off)"))

        def add_records(first: int, n: int) -> None:
            with engine.connect() as conn:
                conn.execute(
                    text(
                        "INSERT INTO idempotency_records (user_id, endpoint, key, fingerprint, status_code,"
                        " response_body, created_at) SELECT i, 'deposit', md5(i::text), 'f', 200, '{}', now()"
                        " FROM generate_series(CAST(:first AS integer), CAST(:last AS integer)) AS i"
                    ),
                    {"first": first, "last": first + n - 1},
                )

        def scans() -> tuple[int, int]:
            with engine.connect() as conn:
                row = conn.execute(
                    text("SELECT seq_scan, idx_scan FROM pg_stat_user_tables WHERE relname = 'idempotency_records'")
                ).one()
            return int(row.seq_scan), int(row.idx_scan or 0)

        known = (3, "deposit", hashlib.md5(b"3").hexdigest())
        # As many keys as a batch under load holds.
        asked = [known, *((i, "transfer", hashlib.md5(str(i).encode()).hexdigest()) for i in range(20, 32))]

        async def scenario() -> None:
            db = await aiodb.make_database(url, pool_size=1, max_overflow=0)  # one connection: one plan cache

            async def look_ups(times: int) -> list[set[tuple[int, str, str]]]:
                found = []
                for _ in range(times):
                    async with aiodb.transaction(db, read_only=True) as conn:
                        found.append(await repository.recorded_keys(conn, asked))
                async with aiodb.transaction(db, read_only=True) as conn:
                    await conn.execute(text("SELECT pg_stat_force_next_flush()"))
                return found

            try:
                add_records(1, 100)  # a small table, as a new deployment's
                # Past the five runs after which Postgres caches a generic plan for the statement.
                assert await look_ups(8) == [{known}] * 8
                add_records(101, 20_000)
                before = scans()
                assert await look_ups(8) == [{known}] * 8
                seq, idx = scans()
            finally:
                await db.dispose()
            assert seq == before[0]  # not one pass over the table
            assert idx - before[1] >= 8 * len(asked)  # a unique-index look-up per key

        asyncio.run(scenario())
        engine.dispose()


def test_a_batch_that_fails_runs_each_movement_again_alone_one_batch_at_a_time(
    client: TestClient, signer: Signer, auth_fake: AuthFake, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch whose write fails (here: the first write of a batch of four loses a
    serialization race) commits nothing; each of its movements runs again alone, within
    WALLET_BATCHES_IN_FLIGHT (1: one transaction at a time), and books once."""
    user = new_user(signer, auth_fake)
    open_wallet(client, user)
    movements: Movements = uow(client).movements
    real = movements._book
    at_once = {"now": 0, "most": 0, "sizes": []}

    async def counted(items: list[Any]) -> Any:
        at_once["now"] += 1
        at_once["most"] = max(at_once["most"], at_once["now"])
        at_once["sizes"].append(len(items))
        try:
            if len(items) == 4:
                raise OperationalError("UPDATE", None, _Serialization())  # type: ignore[arg-type]
            return await real(items)
        finally:
            at_once["now"] -= 1

    monkeypatch.setattr(movements, "_book", counted)
    answers = together(client, deposit(client, user, 1), [deposit(client, user, 10 + i) for i in range(4)])
    assert at_once["sizes"] == [1, 4, 1, 1, 1, 1]
    assert at_once["most"] == 1
    assert [a.outcome.status_code for a in answers] == [200] * 5
    assert client.get("/wallet", headers=user.headers).json()["balance"] == 1 + 10 + 11 + 12 + 13
    assert audit(sync_engine(client)).violations == []


class _Serialization(Exception):
    sqlstate = "40001"


def test_a_batch_whose_commit_answer_is_lost_answers_each_movement_once_as_a_first_answer(
    client: TestClient, signer: Signer, auth_fake: AuthFake, batches: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch committed, but its connection died before the answer: each movement runs
    again alone, finds its own record (its request's token) and answers it as a first answer."""
    user = new_user(signer, auth_fake)
    open_wallet(client, user)
    with first_record_commit_answer_lost(monkeypatch) as lost:  # the batch of four's commit
        answers = together(client, buggy(client, user), [deposit(client, user, 10 + i) for i in range(4)])
    assert len(lost) == 1
    assert batches == [1, 4]  # each of the four then finds its record, and books nothing again
    assert isinstance(answers[0], RuntimeError)
    assert [a.outcome.status_code for a in answers[1:]] == [200] * 4
    assert not any(a.replayed for a in answers[1:])
    assert client.get("/wallet", headers=user.headers).json()["balance"] == 10 + 11 + 12 + 13
    assert audit(sync_engine(client)).violations == []


def test_a_movement_whose_plan_fails_fails_alone(
    client: TestClient, signer: Signer, auth_fake: AuthFake, batches: list[int]
) -> None:
    user = new_user(signer, auth_fake)
    open_wallet(client, user)
    answers = together(
        client, deposit(client, user, 1), [deposit(client, user, 2), buggy(client, user), deposit(client, user, 3)]
    )
    assert batches == [1, 3]
    assert isinstance(answers[2], RuntimeError)
    assert [answers[i].outcome.status_code for i in (0, 1, 3)] == [200, 200, 200]
    assert client.get("/wallet", headers=user.headers).json()["balance"] == 6
    assert not isinstance(answers[2], ProblemError)
    assert audit(sync_engine(client)).violations == []


def timed(job: Job) -> Job:
    async def run() -> Any:
        start = time.monotonic()
        try:
            return await job(), time.monotonic() - start
        except Exception as exc:
            return exc, time.monotonic() - start

    return run


def postgres_client(settings: Settings, signer: Signer, auth_fake: AuthFake, **limits: int) -> Iterator[TestClient]:
    if not settings.database_url.startswith("postgresql"):
        pytest.skip("needs Postgres (TEST_DATABASE_URL): row lock and pool timeouts")
    with app_client(settings.model_copy(update={"batches_in_flight": 1, **limits}), signer, auth_fake) as c:
        c.app.state.uow.movements.STALLED_S = 60  # type: ignore[attr-defined]
        yield c


@pytest.fixture
def short_locks(settings: Settings, signer: Signer, auth_fake: AuthFake) -> Iterator[TestClient]:
    yield from postgres_client(settings, signer, auth_fake, db_lock_timeout_ms=500)


def test_a_wallet_locked_past_the_lock_timeout_is_busy_and_its_batch_books_the_others(
    short_locks: TestClient, signer: Signer, auth_fake: AuthFake, holder: Connection
) -> None:
    """Another session holds a's wallet past the lock timeout: the batch with a's
    withdrawal and b's deposit times out, each runs again alone, b's books and a's answers
    a retryable 503 (after its own lock timeout), nothing moved from a's wallet."""
    client = short_locks
    client.app.state.uow.movements.STALLED_S = 0.2  # type: ignore[attr-defined]  # a's batch alone stalls
    a, b, c = (new_user(signer, auth_fake) for _ in range(3))
    wa = open_wallet(client, a, balance=100)["id"]
    open_wallet(client, b)
    open_wallet(client, c)
    holder.execute(text("SELECT id FROM wallets WHERE id = :id FOR UPDATE"), {"id": wa})
    try:
        answers = together(
            client, timed(deposit(client, c, 1)), [timed(withdraw(client, a, 10)), timed(deposit(client, b, 5))]
        )
    finally:
        holder.rollback()
    (first, _), (busy, busy_s), (ok, ok_s) = answers
    assert first.outcome.status_code == 200
    assert isinstance(busy, WalletBusy)
    assert ok.outcome.status_code == 200
    assert ok_s < 0.95  # the batch's lock timeout (0.5 s), then its own once a's alone counts as stalled
    assert busy_s < 1.45  # two lock timeouts at most
    assert [client.get("/wallet", headers=u.headers).json()["balance"] for u in (a, b)] == [100, 5]


@pytest.fixture
def small_pool(settings: Settings, signer: Signer, auth_fake: AuthFake) -> Iterator[TestClient]:
    yield from postgres_client(settings, signer, auth_fake, db_lock_timeout_ms=300, db_pool_size=2, db_max_overflow=0)


def test_movements_queued_past_the_lock_timeout_are_busy_without_waiting_again(
    small_pool: TestClient, signer: Signer, auth_fake: AuthFake
) -> None:
    """Every pooled connection is taken: the first batch waits one lock timeout for one and
    answers 503; the movements queued behind it have waited that long already, and answer
    503 at once instead of waiting for a connection again."""
    client = small_pool
    user = new_user(signer, auth_fake)
    open_wallet(client, user, balance=100)
    db = uow(client).db
    taken = [client.portal.call(db.connect) for _ in range(2)]  # type: ignore[union-attr]
    try:
        answers = together(client, timed(deposit(client, user, 1)), [timed(deposit(client, user, 2)) for _ in range(3)])
    finally:
        for conn in taken:
            client.portal.call(conn.close)  # type: ignore[union-attr]
    assert all(isinstance(answer, WalletBusy) for answer, _ in answers)
    first_s, rest_s = answers[0][1], max(s for _, s in answers[1:])
    assert rest_s - first_s < 0.2, f"the first 503 after {first_s:.2f} s, the queued ones' after {rest_s:.2f} s"
    assert client.get("/wallet", headers=user.headers).json()["balance"] == 100


def test_a_batch_stalled_on_a_lock_does_not_hold_up_movements_on_other_wallets(
    short_locks: TestClient, signer: Signer, auth_fake: AuthFake, holder: Connection
) -> None:
    """WALLET_BATCHES_IN_FLIGHT=1, and another session holds a's wallet: a's withdrawal
    waits for it in its batch, and once that batch counts as stalled b's deposit starts a
    batch of its own and books, long before a's lock timeout."""
    client = short_locks
    client.app.state.uow.movements.STALLED_S = 0.05  # type: ignore[attr-defined]
    a, b = new_user(signer, auth_fake), new_user(signer, auth_fake)
    wa = open_wallet(client, a, balance=100)["id"]
    open_wallet(client, b)
    holder.execute(text("SELECT id FROM wallets WHERE id = :id FOR UPDATE"), {"id": wa})

    async def both() -> list[Any]:
        stuck = asyncio.ensure_future(timed(withdraw(client, a, 10))())
        await asyncio.sleep(0.01)
        other = await timed(deposit(client, b, 5))()
        return [other, await stuck]

    try:
        (other, other_s), (stuck, _) = client.portal.call(both)  # type: ignore[union-attr]
    finally:
        holder.rollback()
    assert other.outcome.status_code == 200
    assert other_s < 0.4  # the lock timeout is 0.5 s
    assert isinstance(stuck, WalletBusy)
    assert client.get("/wallet", headers=b.headers).json()["balance"] == 5


def test_a_commit_that_times_out_after_committing_answers_the_booking_not_busy(
    client: TestClient, signer: Signer, auth_fake: AuthFake, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The COMMIT went through, but its answer outlived the client's command timeout (a
    stalled synchronous standby, say): a 503 'nothing was done' would be false, so the
    movement looks up its record and answers its booking, once, as a first answer."""
    user = new_user(signer, auth_fake)
    open_wallet(client, user)
    timed_out_once: list[int] = []
    for cls in CONNECTIONS:
        real_commit = cls.commit

        async def commit(self: Any, real_commit: Any = real_commit) -> None:
            await real_commit(self)
            if not timed_out_once:
                timed_out_once.append(1)
                raise OperationalError("COMMIT", None, aiodb.TimedOut("57014", "the client's command timeout"))  # type: ignore[arg-type]

        monkeypatch.setattr(cls, "commit", commit)
    k = uuid.uuid4().hex
    status, body = call(client, user, "deposit", k, amount=25)
    assert timed_out_once == [1]
    assert status == 200
    assert json.loads(body)["current_balance"] == 25
    assert client.get("/wallet", headers=user.headers).json()["balance"] == 25
    assert call(client, user, "deposit", k, amount=25) == (200, body)


def test_the_batches_in_flight_never_exceed_what_the_pool_leaves() -> None:
    """main.py passes the pool's size less one as the cap (stalled batches included); a pool
    of one connection leaves one batch at a time, not four."""
    assert Movements(None, in_flight=1, max_batches=0).max_batches == 1  # type: ignore[arg-type]
    assert Movements(None, in_flight=2, max_batches=5).max_batches == 5  # type: ignore[arg-type]
    assert Movements(None, in_flight=2).max_batches == 8  # type: ignore[arg-type]
