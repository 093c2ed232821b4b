"""Group commit: a process's deposits, withdrawals and transfers, booked several to a
database transaction.

A movement is handed over as a `Movement`: whose wallet, which other wallet, and its plan,
a pure function from the locked wallets to the response and the booking (or a ProblemError
refusing it). Each request still runs under its own idempotency key (wallet.idempotency's
`Once`: the Redis lock before, the stored answer after); only the database part is shared.
A batch is one transaction: lock every wallet of its movements in one statement (in id
order, as every movement locks, so batches never deadlock), draw a transaction id for each
movement, release overdue holds, then plan the movements one after another, each seeing
the balances and chain heads the ones before it left, and write them all with each one's
idempotency record (the refusals' records too), then commit. On Postgres a batch of
several takes at least six round trips (BEGIN, the locks, the keys' records, one per
shape of booking and one for the refusals, the balances read back, COMMIT), where a
movement alone takes four.

Batches form by themselves: a movement starts a batch at once when fewer than
`in_flight` are being written by this process, and otherwise waits for the next one, which
takes up to `max_batch` of the waiting movements in the order they came. At low load every
batch is one movement and nothing waits; under load the batches grow with the queue. A
batch that has been written for more than STALLED_S is waiting for a lock (or a pooled
connection) and stops counting, so one stuck wallet does not hold up the process.

Each movement is still exactly once. A movement whose key is recorded already (its
stored answer gone from Redis) leaves the batch before it books and finds its record; so
does a lone movement whose record's unique key fires. A batch that fails as a whole (a
deadlock, a lost connection, a row lock or a statement past its timeout) commits none of
its movements, and each of them runs again in a batch of its own, as a retry: it first
looks up its key's record. So does a movement, alone or not, whose COMMIT's answer did not
come, since the batch may have committed. No pooled connection within the lock timeout
answers every movement of the batch a retryable 503 at once, nothing written. A movement
whose plan fails with a bug fails alone (its 500); the others in its batch go on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

from pydantic import BaseModel
from sqlalchemy.exc import OperationalError

from svckit.aiodb import Database
from svckit.problems import ProblemError
from wallet import holds_repository, repository
from wallet.domain import Booking, Locked
from wallet.errors import WalletBusy
from wallet.idempotency import Answer, Once, Outcome, timed_out
from wallet.metrics import BATCH_FAILURES, BATCH_SIZE, QUEUE_TIMEOUTS

log = logging.getLogger("wallet.movements")

Plan = Callable[[Locked], tuple[BaseModel, Booking]]


@dataclass(frozen=True)
class Movement:
    """A deposit, a withdrawal or a transfer, as the batch sees it: the caller's open wallet,
    the other wallet, and the plan, which is run on each attempt (so it must be pure)."""

    user_id: int
    other_id: int
    plan: Plan


class BatchFailed(Exception):
    """The movement's batch did not commit, or may have (its COMMIT's answer was lost): it
    runs again in a batch of its own, after looking up its key's record."""

    def __init__(self, failure: BaseException | None = None) -> None:
        super().__init__(repr(failure) if failure else "batch failed")
        self.failure = failure


class _Failed(Exception):
    """Where a batch's transaction failed, when that decides its movements' answers:
    `no_connection` (no pooled connection came free in time: nothing was written) or
    `commit` (the COMMIT's answer did not come: the batch may have committed)."""

    def __init__(self, reason: str, failure: OperationalError) -> None:
        super().__init__(repr(failure))
        self.reason, self.failure = reason, failure


@dataclass(frozen=True)
class _Waiting:
    once: Once
    movement: Movement
    future: asyncio.Future[Outcome]
    alone: bool  # a batch of its own (after a failed attempt)
    since: float  # when it began to wait (time.monotonic)


class Movements:
    """The process's batcher (one per database). `run` a movement under its key.

    A movement that waited `max_wait_s` (the lock timeout) for its batch to start is
    answered WalletBusy (a retryable 503, nothing recorded) instead, as it would have been
    waiting for a pooled connection or a row lock that long: the queue stays as long as a
    lock timeout's arrivals, and no movement waits past its key's Redis lock."""

    def __init__(
        self,
        db: Database,
        *,
        max_batch: int = 32,
        in_flight: int = 1,
        max_batches: int | None = None,
        max_wait_s: float | None = None,
    ) -> None:
        self.db = db
        self.max_batch = max_batch
        self.in_flight = in_flight
        self.max_batches = max(in_flight, in_flight * 4 if max_batches is None else max_batches)  # stalled included
        self.max_wait_s = max_wait_s
        self._waiting: deque[_Waiting] = deque()
        self._batches: dict[asyncio.Task[None], float] = {}  # each batch being written, from when
        self._timer: asyncio.TimerHandle | None = None

    async def run(self, once: Once, movement: Movement) -> Answer:
        """The movement at most once under `once`'s key: its answer, first sent or replayed."""
        alone = False  # after a failed attempt, the movement runs in a batch of its own
        async for _ in once:
            try:
                try:
                    outcome = await self._batched(once, movement, alone=alone)
                except BatchFailed as failed:
                    if failed.failure is not None and once.attempts > once.uow.retries:
                        raise failed.failure from failed
                    alone = True
                    continue
                except Exception as failure:  # noqa: BLE001 (Once.failed answers it or raises it)
                    alone = True
                    await once.failed(failure)  # the record answers, or another attempt; else it raises
                    continue
                await once.done(outcome)
            except BaseException:
                await once.abandon()
                raise
        return once.answer

    async def _batched(self, once: Once, movement: Movement, *, alone: bool) -> Outcome:
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Waiting(once, movement, future, alone, time.monotonic()))
        self._start()
        return await future

    # A batch written for longer than this is waiting for something (a row lock another
    # transaction holds): it stops counting against `in_flight`, so the movements on other
    # wallets do not queue behind it, up to `max_batches` at once (each holds a pooled
    # connection). A healthy batch takes milliseconds, tens of them on a saturated machine.
    STALLED_S = 0.25

    def _start(self) -> None:
        while self._waiting:
            now = time.monotonic()
            going = sum(1 for since in self._batches.values() if now - since < self.STALLED_S)
            if going >= self.in_flight or len(self._batches) >= self.max_batches:
                if self._timer is None:  # look again once the youngest may count as stalled
                    self._timer = asyncio.get_running_loop().call_later(self.STALLED_S, self._look_again)
                return
            batch: list[_Waiting] = []
            while self._waiting and len(batch) < self.max_batch:
                w = self._waiting[0]
                if batch and (batch[0].alone or w.alone):
                    break
                self._waiting.popleft()
                if w.future.done():  # its request was cancelled
                    continue
                if self.max_wait_s is not None and now - w.since > self.max_wait_s:
                    QUEUE_TIMEOUTS.inc()  # answered busy, as after a pool or lock timeout
                    w.future.set_exception(WalletBusy())
                    continue
                batch.append(w)
            if not batch:
                continue
            task = asyncio.create_task(self._write(batch))
            self._batches[task] = now
            task.add_done_callback(self._finished)

    def _look_again(self) -> None:
        self._timer = None
        self._start()

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._batches.pop(task, None)
        self._start()

    async def _write(self, batch: list[_Waiting]) -> None:
        live = [w for w in batch if not w.future.done()]  # a cancelled request's movement is dropped
        if not live:
            return
        BATCH_SIZE.observe(len(live))
        try:
            outcomes = await self._book([(w.once, w.movement) for w in live])
        except Exception as exc:  # noqa: BLE001 (handed to the batch's requests, each deciding)
            reason, failure = (exc.reason, exc.failure) if isinstance(exc, _Failed) else ("other", exc)
            BATCH_FAILURES.labels(reason).inc()
            if len(live) > 1 or reason == "commit":
                log.warning("a batch of %d movements failed (%r): %s", len(live), failure, reason)
            for w in live:
                if w.future.done():
                    continue
                if reason == "no_connection":
                    # The process is swamped: each movement's retryable 503 at once.
                    w.future.set_exception(failure)
                elif reason == "commit":
                    # It may have committed: alone or not, the movement looks up its record.
                    w.future.set_exception(BatchFailed(failure))
                else:
                    # Alone, the failure is the movement's own (Once.failed decides); in a
                    # batch, the locked wallet, the deadlock or the lost connection may be one
                    # movement's: each runs again alone, and the others book.
                    w.future.set_exception(failure if len(live) == 1 else BatchFailed())
            return
        except BaseException:
            for w in live:
                w.future.cancel()
            raise
        for w, outcome in zip(live, outcomes, strict=True):
            if w.future.done():
                continue
            if isinstance(outcome, Exception):
                w.future.set_exception(outcome)
            else:
                w.future.set_result(outcome)

    async def _book(self, items: list[tuple[Once, Movement]]) -> list[Outcome | Exception]:
        """One transaction for these movements, in order: each one's outcome (or the bug its
        plan raised), committed; or the transaction's failure raised, nothing committed."""
        try:
            conn = await self.db.connect()
        except OperationalError as failure:
            if timed_out(failure):
                raise _Failed("no_connection", failure) from failure
            raise
        try:
            pairs = [(movement.user_id, movement.other_id) for _, movement in items]
            wallets, ids, now = await repository.lock_for_movements(conn, pairs)
            # A key recorded already (its stored answer gone from Redis: expired, flushed,
            # failed over) would fail the whole batch at COMMIT: under the callers' wallet
            # locks, which a request under the same key takes too, look first, and let
            # those movements go and find their record. A lone movement's constraint does
            # that instead (no round trip).
            recorded = (
                await repository.recorded_keys(conn, [once.record_key for once, _ in items])
                if len(items) > 1
                else set()
            )
            # Held money cannot be spent: what overdue holds reserved is released first, so
            # a wallet's `available` is its balance less what its active holds reserve.
            for wallet in list(wallets.values()):
                if wallet.held:
                    held = await holds_repository.release_overdue(conn, wallet_id=wallet.id, held=wallet.held, now=now)
                    wallets[wallet.id] = replace(wallet, held=held)
            bookings: list[tuple[Booking, dict[str, object]]] = []
            refusals: list[dict[str, object]] = []
            outcomes: list[Outcome | Exception] = []
            for (once, movement), transaction_id in zip(items, ids, strict=True):
                if once.record_key in recorded:
                    outcomes.append(BatchFailed())
                    continue
                locked = Locked.of(
                    wallets,
                    user_id=movement.user_id,
                    other_id=movement.other_id,
                    transaction_id=transaction_id,
                    now=now,
                )
                try:
                    result, booking = movement.plan(locked)
                except ProblemError as refusal:
                    outcome = once.refused(refusal)
                    refusals.append(once.record(outcome, None))
                except Exception as bug:  # noqa: BLE001 (this movement's 500; the others in the batch go on)
                    outcomes.append(bug)
                    continue
                else:
                    outcome = once.outcome(result)
                    bookings.append((booking, once.record(outcome, booking)))
                    for wallet_id, balance in booking.snapshots.items():
                        head = booking.links[wallet_id][1]
                        wallets[wallet_id] = replace(
                            wallets[wallet_id], balance=balance, chain_head=head, updated_at=booking.now
                        )
                outcomes.append(outcome)
            await repository.write_bookings(conn, bookings, refusals)
            try:
                await conn.commit()
            except OperationalError as failure:
                raise _Failed("commit", failure) from failure
        finally:
            await conn.close()
        return outcomes
