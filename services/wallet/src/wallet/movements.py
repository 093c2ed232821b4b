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
several takes six round trips (BEGIN, the locks, the keys' records, the writes, the
balances read back, COMMIT), where a movement alone takes four.

Batches form by themselves: a movement starts a batch at once when fewer than
`in_flight` are being written by this process, and otherwise waits for the next one, which
takes up to `max_batch` of the waiting movements in the order they came. At low load every
batch is one movement and nothing waits; under load the batches grow with the queue. A
batch that has been written for more than STALLED_S is waiting for a lock (or a pooled
connection) and stops counting, so one stuck wallet does not hold up the process.

Each movement is still exactly once. A movement whose key is recorded already (its
stored answer gone from Redis) leaves the batch before it books and finds its record; so
does a lone movement whose record's unique key fires. A batch that fails as a whole (a
deadlock, a lost connection) commits none of its movements, and each of them runs again
in a batch of its own, within `in_flight`, as a retry: it first looks up its key's
record, since a connection lost at COMMIT may have committed the batch. A batch that timed
out (a row lock or a pooled connection past the lock timeout, a statement past its own)
answers every movement in it a retryable 503 at once, nothing recorded, as a movement
alone would be answered: running each again would wait as long again. A movement whose
plan fails with a bug fails alone (its 500); the others in its batch go on.
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
from wallet.metrics import BATCH_FAILURES, BATCH_SIZE

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
    """A batch of several movements did not commit: each runs again alone."""


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
        self, db: Database, *, max_batch: int = 32, in_flight: int = 1, max_wait_s: float | None = None
    ) -> None:
        self.db = db
        self.max_batch = max_batch
        self.in_flight = in_flight
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
                except BatchFailed:
                    alone = True
                    continue
                except Exception as failure:
                    alone = True
                    if await once.failed(failure):
                        continue
                    raise  # once.failed raises what it does not answer; never reached
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
    # transaction holds, a pooled connection): it stops counting against `in_flight`, so the
    # movements on other wallets do not queue behind it, up to STALLED_TIMES times `in_flight`
    # batches at once (each holds a pooled connection, and gets one within the lock timeout).
    STALLED_S = 0.1
    STALLED_TIMES = 4

    def _start(self) -> None:
        while self._waiting:
            now = time.monotonic()
            going = sum(1 for since in self._batches.values() if now - since < self.STALLED_S)
            if going >= self.in_flight or len(self._batches) >= self.in_flight * self.STALLED_TIMES:
                if self._timer is None:  # look again once the youngest may count as stalled
                    self._timer = asyncio.get_running_loop().call_later(self.STALLED_S, self._look_again)
                return
            batch = [self._waiting.popleft()]
            while self._waiting and len(batch) < self.max_batch and not (batch[0].alone or self._waiting[0].alone):
                batch.append(self._waiting.popleft())
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
        if self.max_wait_s is not None:
            now = time.monotonic()
            for late in [w for w in live if now - w.since > self.max_wait_s]:
                log.warning("%s waited %.2f s for its batch: busy", late.once.endpoint, now - late.since)
                late.future.set_exception(WalletBusy())
                live.remove(late)
        if not live:
            return
        BATCH_SIZE.observe(len(live))
        try:
            outcomes = await self._book([(w.once, w.movement) for w in live])
        except Exception as failure:  # noqa: BLE001 (handed to the batch's requests, each deciding)
            # A timeout (a row lock or a pooled connection waited for past the lock
            # timeout, a statement past its own) is every movement's retryable 503 at once:
            # running each again would wait as long again. Anything else: each alone.
            busy = isinstance(failure, OperationalError) and timed_out(failure)
            BATCH_FAILURES.labels("timeout" if busy else "other").inc()
            if len(live) > 1:
                then = "each answers busy" if busy else "each runs again alone"
                log.warning("a batch of %d movements failed (%r): %s", len(live), failure, then)
            for w in live:
                if not w.future.done():
                    w.future.set_exception(failure if busy or len(live) == 1 else BatchFailed())
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
        conn = await self.db.connect()
        try:
            pairs = [(movement.user_id, movement.other_id) for _, movement in items]
            wallets, ids, now = await repository.lock_for_movements(conn, pairs)
            # A key recorded already (its stored answer gone from Redis: expired, flushed,
            # failed over) would fail the whole batch at COMMIT: under the callers' wallet
            # locks, which a request under the same key takes too, look first, and let
            # those movements go and find their record. A lone movement's constraint does
            # that instead (no round trip).
            recorded = (
                await repository.recorded_keys(conn, [once.key_of for once, _ in items]) if len(items) > 1 else set()
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
                if once.key_of in recorded:
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
            await conn.commit()
        finally:
            await conn.close()
        return outcomes
