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
idempotency record (the refusals' records too), then commit. On Postgres that is five
round trips for the batch, where a movement alone takes four.

Batches form by themselves: a movement starts a batch at once when fewer than
`in_flight` are being written by this process, and otherwise waits for the next one, which
takes up to `max_batch` of the waiting movements in the order they came. At low load every
batch is one movement and nothing waits; under load the batches grow with the queue.

Each movement is still exactly once. A batch that fails as a whole (a deadlock, a lost
connection, one movement's key already recorded by another request) commits none of its
movements, and each of them runs again alone, as a retry: it first looks up its key's
record, since a connection lost at COMMIT may have committed the batch. A movement whose
plan fails with a bug fails alone (its 500); the others in its batch go on.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

from pydantic import BaseModel

from svckit.aiodb import Database
from svckit.problems import ProblemError
from wallet import holds_repository, repository
from wallet.domain import Booking, Locked
from wallet.idempotency import Answer, Once, Outcome

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


class Movements:
    """The process's batcher (one per database). `run` a movement under its key."""

    def __init__(self, db: Database, *, max_batch: int = 32, in_flight: int = 1) -> None:
        self.db = db
        self.max_batch = max_batch
        self.in_flight = in_flight
        self._waiting: deque[_Waiting] = deque()
        self._batches: set[asyncio.Task[None]] = set()

    async def run(self, once: Once, movement: Movement) -> Answer:
        """The movement at most once under `once`'s key: its answer, first sent or replayed."""
        alone = False  # after a failed attempt, the movement runs in a batch of its own
        async for _ in once:
            try:
                try:
                    outcome = await (self._alone(once, movement) if alone else self._batched(once, movement))
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

    async def _alone(self, once: Once, movement: Movement) -> Outcome:
        (outcome,) = await self._book([(once, movement)])
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def _batched(self, once: Once, movement: Movement) -> Outcome:
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Waiting(once, movement, future))
        self._start()
        return await future

    def _start(self) -> None:
        while self._waiting and len(self._batches) < self.in_flight:
            batch = [self._waiting.popleft() for _ in range(min(self.max_batch, len(self._waiting)))]
            task = asyncio.create_task(self._write(batch))
            self._batches.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._batches.discard(task)
        self._start()

    async def _write(self, batch: list[_Waiting]) -> None:
        live = [w for w in batch if not w.future.done()]  # a cancelled request's movement is dropped
        if not live:
            return
        try:
            outcomes = await self._book([(w.once, w.movement) for w in live])
        except Exception as failure:  # noqa: BLE001 (handed to the batch's requests, each deciding)
            if len(live) > 1:
                log.warning("a batch of %d movements failed (%r): each runs again alone", len(live), failure)
            for w in live:
                if not w.future.done():
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
        conn = await self.db.connect()
        try:
            pairs = [(movement.user_id, movement.other_id) for _, movement in items]
            wallets, ids, now = await repository.lock_for_movements(conn, pairs)
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
