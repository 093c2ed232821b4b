"""Use cases of holds (two-phase payments) and balances, one function each, unit of work
first, like wallet.service.

A hold reserves money on the caller's open wallet: `wallets.held` grows by its amount, and
withdrawals, transfers and new holds check the available balance (balance - held) under
the wallet's row lock. Nothing is posted to the ledger; a capture books an ordinary
transfer. Why a `held` column beside the holds table: the check then reads one locked row
(no sum over holds per movement), and a CHECK constraint (held <= balance) refuses an
overdraft whatever the code does. Every change of a hold and of `held` happens under the
wallet's row lock, so:

- a movement releases the wallet's overdue holds first (status expired, held reduced), in
  its own transaction: an expired hold reserves nothing at once, swept or not;
- a capture, a void and an expiry of one hold are serialized on that lock, and each
  re-reads the hold once it holds the lock: exactly one of them settles it, the others
  answer 409 hold_not_active;
- the sweeper (`expire_overdue_holds`, a background task of every replica) locks each
  wallet with overdue holds with SKIP LOCKED, so it never waits for a movement (which
  releases them itself) nor for another replica's sweeper.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

from svckit.aiodb import transaction
from svckit.db import utcnow
from wallet import holds_repository as holds
from wallet import repository
from wallet.domain import Party, book
from wallet.errors import (
    BalanceTimeInvalid,
    CaptureExceedsHold,
    HoldNotActive,
    HoldNotFound,
    InsufficientFunds,
    RecipientMismatch,
    RecipientRequired,
    WalletNotFound,
)
from wallet.idempotency import Answer, Once
from wallet.models import ACTIVE, CAPTURED, EXPIRED, VOIDED
from wallet.schemas import BalanceRead, HoldList, HoldRead
from wallet.service import _own_wallet, _recipient
from wallet.uow import UnitOfWork

log = logging.getLogger("wallet.holds")

NO_WALLET = 0  # lock_for_movement's "other" wallet when there is none: no wallet has id 0


def hold_read(row: Any, now: datetime, **changes: Any) -> HoldRead:
    """The hold as clients see it: an active hold past its expiry is expired already."""
    hold = HoldRead.model_validate({**row._mapping, **changes})
    if hold.status == ACTIVE and hold.expires_at <= now:
        hold.status = EXPIRED
    return hold


async def create_hold(
    uow: UnitOfWork,
    *,
    user_id: int,
    key: str,
    amount: int,
    currency: str,
    to_wallet_id: int | None,
    expires_in_s: int,
) -> Answer:
    """Reserve `amount` of the caller's available balance until `expires_in_s` from now."""
    payload = {"amount": amount, "currency": currency, "to_account_id": to_wallet_id, "expires_in_s": expires_in_s}
    once = Once(uow, user_id=user_id, endpoint="hold", key=key, payload=payload)
    async for attempt in once:
        async with attempt as conn:
            locked = await repository.lock_for_movement(conn, user_id=user_id, other_id=to_wallet_id or NO_WALLET)
            own = _own_wallet(locked, user_id, currency)
            if to_wallet_id is not None:
                _recipient(locked, own, to_wallet_id, currency)  # checked now, and again at capture
            if await holds.available(conn, own, locked.now) < amount:
                raise InsufficientFunds("The amount exceeds the wallet's available balance (balance minus holds).")
            row = {
                "wallet_id": own.id,
                "recipient_wallet_id": to_wallet_id,
                "amount": amount,
                "captured_amount": 0,
                "currency": currency,
                "status": ACTIVE,
                "transaction_id": None,
                "initiated_by": user_id,
                "expires_at": locked.now + timedelta(seconds=expires_in_s),
                "created_at": locked.now,
                "updated_at": locked.now,
            }
            hold_id = await holds.add_hold(conn, row)
            await holds.change_held(conn, wallet_id=own.id, delta=amount)
            attempt.answered(HoldRead.model_validate({**row, "id": hold_id}), status_code=201)
    return once.answer


async def _hold_of(conn: Any, user_id: int, hold_id: int) -> Any:
    hold = await holds.get_hold(conn, hold_id=hold_id, wallet_ids=await repository.user_wallet_ids(conn, user_id))
    if hold is None:
        raise HoldNotFound()
    return hold


def _capture_recipient(hold: Any, to_wallet_id: int | None) -> int:
    if hold.recipient_wallet_id is None:
        if to_wallet_id is None:
            raise RecipientRequired()
        return to_wallet_id
    if to_wallet_id is not None and to_wallet_id != hold.recipient_wallet_id:
        raise RecipientMismatch()
    return int(hold.recipient_wallet_id)


async def capture_hold(
    uow: UnitOfWork, *, user_id: int, key: str, hold_id: int, amount: int | None, to_wallet_id: int | None
) -> Answer:
    """Move `amount` of an active hold (default all) to its recipient as a transfer, and
    release the rest."""
    payload = {"hold_id": hold_id, "amount": amount, "to_account_id": to_wallet_id}
    once = Once(uow, user_id=user_id, endpoint="capture", key=key, payload=payload)
    async for attempt in once:
        async with attempt as conn:
            hold = await _hold_of(conn, user_id, hold_id)
            if hold.status != ACTIVE:
                raise HoldNotActive()
            recipient_id = _capture_recipient(hold, to_wallet_id)
            locked = await repository.lock_for_movement(conn, user_id=user_id, other_id=recipient_id)
            own = _own_wallet(locked, user_id, hold.currency)
            await holds.release_overdue(conn, wallet_id=own.id, held=own.held, now=locked.now)
            # Once more under the wallet's lock: a void, a capture or the expiry before ours wins.
            hold = await _hold_of(conn, user_id, hold_id)
            if hold.status != ACTIVE or hold.wallet_id != own.id:
                raise HoldNotActive()
            captured = hold.amount if amount is None else amount
            if captured > hold.amount:
                raise CaptureExceedsHold()
            recipient = _recipient(locked, own, recipient_id, hold.currency)
            # Release the whole hold before the booking moves the balance: held <= balance
            # (the CHECK) then holds at every statement. The balance covers it: held did.
            await holds.change_held(conn, wallet_id=own.id, delta=-hold.amount)
            booking = book(
                kind="transfer",
                source=Party.of(own),
                destination=Party.of(recipient),
                amount=captured,
                currency=hold.currency,
                locked=locked,
                user_id=user_id,
            )
            settled = {
                "status": CAPTURED,
                "captured_amount": captured,
                "recipient_wallet_id": recipient_id,
                "transaction_id": booking.transaction_id,
            }
            # The hold names the capture's transaction: written after the booking.
            then = partial(holds.set_hold, hold_id=hold_id, now=locked.now, **settled)
            attempt.booked(hold_read(hold, locked.now, **settled), booking, then=then)
    return once.answer


async def void_hold(uow: UnitOfWork, *, user_id: int, key: str, hold_id: int) -> Answer:
    """Release an active hold entirely."""
    once = Once(uow, user_id=user_id, endpoint="void", key=key, payload={"hold_id": hold_id})
    async for attempt in once:
        async with attempt as conn:
            hold = await _hold_of(conn, user_id, hold_id)
            if hold.status != ACTIVE:
                raise HoldNotActive()
            locked = await repository.lock_for_movement(conn, user_id=user_id, other_id=NO_WALLET)
            own = _own_wallet(locked, user_id, hold.currency)
            await holds.release_overdue(conn, wallet_id=own.id, held=own.held, now=locked.now)
            hold = await _hold_of(conn, user_id, hold_id)  # under the lock, as for a capture
            if hold.status != ACTIVE or hold.wallet_id != own.id:
                raise HoldNotActive()
            await holds.change_held(conn, wallet_id=own.id, delta=-hold.amount)
            await holds.set_hold(conn, hold_id=hold_id, status=VOIDED, now=locked.now)
            attempt.answered(hold_read(hold, locked.now, status=VOIDED))
    return once.answer


async def get_hold(uow: UnitOfWork, *, user_id: int, hold_id: int) -> HoldRead:
    async with transaction(uow.db, read_only=True) as conn:
        hold = await _hold_of(conn, user_id, hold_id)
    return hold_read(hold, utcnow())


async def list_holds(uow: UnitOfWork, *, user_id: int, status: str | None) -> HoldList:
    now = utcnow()
    async with transaction(uow.db, read_only=True) as conn:
        wallet_ids = await repository.user_wallet_ids(conn, user_id)
        rows = await holds.list_holds(conn, wallet_ids=wallet_ids, status=status, now=now)
    return HoldList(holds=[hold_read(row, now) for row in rows])


async def expire_overdue_holds(uow: UnitOfWork, *, batch: int = 100) -> int:
    """Mark overdue active holds expired, one wallet per transaction under its row lock
    (skipped when locked: see the module docstring). Returns how many wallets it swept."""
    now = utcnow()
    async with transaction(uow.db, read_only=True) as conn:
        wallet_ids = await holds.overdue_wallet_ids(conn, now=now, limit=batch)
    swept = 0
    for wallet_id in wallet_ids:
        async with transaction(uow.db) as conn:
            held = await holds.lock_wallet(conn, wallet_id)
            if held is not None:
                await holds.release_overdue(conn, wallet_id=wallet_id, held=held, now=now)
                swept += 1
    return swept


async def sweep_forever(uow: UnitOfWork, *, interval_s: float) -> None:
    """The wallet process's sweeper: overdue holds show `expired` within `interval_s` (plus
    a sweep's duration); every replica runs one, SKIP LOCKED keeps them apart."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            while await expire_overdue_holds(uow) >= 100:
                pass  # a full batch: more may be waiting
        except Exception:  # a database hiccup must not end the sweeper
            log.exception("hold sweep failed; retrying in %.0f s", interval_s)


async def balance(uow: UnitOfWork, *, user_id: int, at: datetime | None) -> BalanceRead:
    """The open wallet's balance now (with held and available), or right after its last
    entry at or before `at`."""
    now = utcnow()
    async with transaction(uow.db, read_only=True) as conn:
        wallet = await holds.balance_now(conn, user_id=user_id, now=now)
        if wallet is None:
            raise WalletNotFound()
        if at is None:
            held = int(wallet.held)
            return BalanceRead(
                wallet_id=wallet.id,
                currency=wallet.currency,
                balance=wallet.balance,
                held=held,
                available=wallet.balance - held,
                at=now,
            )
        try:
            at = at.astimezone(UTC)
        except OverflowError:  # an offset that takes the time past year 1 or 9999
            raise BalanceTimeInvalid("`at` is out of range.") from None
        if at < wallet.created_at:
            raise BalanceTimeInvalid(f"`at` is before the wallet opened ({wallet.created_at.isoformat()}).")
        if at > now:
            raise BalanceTimeInvalid("`at` is in the future.")
        past = await holds.balance_at(conn, wallet_id=wallet.id, at=at)
    return BalanceRead(wallet_id=wallet.id, currency=wallet.currency, balance=past, held=None, available=None, at=at)
