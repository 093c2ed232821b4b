"""Use cases of refunds and of one transaction's detail, unit of work first, like
wallet.service.

A refund is an ordinary transfer from the original transfer's recipient back to its sender,
linked to it in `refunds`. The refunds of one transfer never total more than it, however
many race: each refund of transfer X debits X's recipient wallet and credits X's sender
wallet, so it locks those two rows (lock_for_movement) before it sums X's refunds, and the
sum it reads includes every refund committed before its lock was granted. The same lock
serializes them on SQLite (one writer) and on Postgres (row locks, across replicas).
"""

from __future__ import annotations

from functools import partial

from svckit.aiodb import transaction
from wallet import holds_repository as holds
from wallet import repository
from wallet.domain import EXTERNAL_DESTINATION, EXTERNAL_SOURCE, Party, book
from wallet.errors import (
    InsufficientFunds,
    NotRefundable,
    RecipientNotFound,
    RefundExceedsTransfer,
    RefundNotAllowed,
    TransactionNotFound,
    WalletNotFound,
)
from wallet.idempotency import Answer, Once
from wallet.models import OPEN, USER
from wallet.schemas import RefundResult, TransactionRead
from wallet.service import _own_wallet
from wallet.uow import UnitOfWork


async def refund(uow: UnitOfWork, *, user_id: int, key: str, transaction_id: int, amount: int | None) -> Answer:
    """Send (part of) a transfer the caller received back to its sender."""
    payload = {"transaction_id": transaction_id, "amount": amount}
    once = Once(uow, user_id=user_id, endpoint="refund", key=key, payload=payload)
    async for attempt in once:
        async with attempt as conn:
            wallet_ids = await repository.user_wallet_ids(conn, user_id)
            original = await holds.transaction_of(conn, transaction_id=transaction_id, wallet_ids=wallet_ids)
            if original is None:
                raise TransactionNotFound()
            # A refund is not refunded in turn: that would only send the money round again.
            if original.type != "transfer" or original.refund_of is not None:
                raise NotRefundable()
            if original.to_wallet_id not in wallet_ids:
                raise RefundNotAllowed()  # the caller sent it
            locked = await repository.lock_for_movement(conn, user_id=user_id, other_id=original.from_wallet_id)
            own = _own_wallet(locked, user_id, original.currency)
            if own.id != original.to_wallet_id:
                raise WalletNotFound("The wallet that received this transfer is closed.")
            sender = locked.wallets.get(original.from_wallet_id)
            if sender is None or sender.kind != USER or sender.status != OPEN:
                raise RecipientNotFound("The sender's wallet is closed.")
            refunded = await holds.refunded_total(conn, transaction_id)  # under both locks: see the docstring
            left = original.amount - refunded
            amount_now = left if amount is None else amount
            if amount_now > left or amount_now < 1:
                raise RefundExceedsTransfer(f"{refunded} of {original.amount} is refunded already.")
            if await holds.available(conn, own, locked.now) < amount_now:
                raise InsufficientFunds()
            booking = book(
                kind="transfer",
                source=Party.of(own),
                destination=Party.of(sender),
                amount=amount_now,
                currency=original.currency,
                locked=locked,
                user_id=user_id,
            )
            result = RefundResult(
                refund_id=booking.transaction_id,
                transaction_id=transaction_id,
                amount=amount_now,
                refunded_total=refunded + amount_now,
                current_balance=booking.snapshots[own.id],
            )
            # The link names the refund's transaction row: written after the booking.
            then = partial(
                holds.add_refund, transaction_id=booking.transaction_id, refund_of=transaction_id, amount=amount_now
            )
            attempt.booked(result, booking, then=then)
    return once.answer


async def transaction_detail(uow: UnitOfWork, *, user_id: int, transaction_id: int) -> TransactionRead:
    """One of the caller's transactions as a history item, with its refunds."""
    async with transaction(uow.db, read_only=True) as conn:
        wallet_ids = await repository.user_wallet_ids(conn, user_id)
        row = await holds.transaction_of(conn, transaction_id=transaction_id, wallet_ids=wallet_ids)
    if row is None:
        raise TransactionNotFound()
    return TransactionRead(
        id=row.id,
        amount=row.amount,
        currency=row.currency,
        type=row.type,
        date=row.created_at,
        sender=EXTERNAL_SOURCE if row.source_kind != USER else row.source_name,
        receiver=EXTERNAL_DESTINATION if row.destination_kind != USER else row.destination_name,
        refunded_total=int(row.refunded_total),
        refund_of=row.refund_of,
    )
