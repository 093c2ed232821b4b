"""Every query of the wallet service.

The money-moving path uses Core statements (one round trip each) rather than the ORM's
unit of work: a transfer is SELECT ... FOR UPDATE, one UPDATE, two INSERTs and the
idempotency record.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import bindparam, case, func, insert, or_, select, update
from sqlalchemy.orm import aliased
from sqlmodel import Session, col

from svckit.db import UTCDateTime, utcnow
from wallet.ledger import Posting, signed
from wallet.models import CLOSED, OPEN, SYSTEM, USER, IdempotencyRecord, LedgerEntry, Transaction, Wallet

W = Wallet.__table__  # type: ignore[attr-defined]
T = Transaction.__table__  # type: ignore[attr-defined]
L = LedgerEntry.__table__  # type: ignore[attr-defined]
I = IdempotencyRecord.__table__  # type: ignore[attr-defined]  # noqa: E741


@dataclass(frozen=True)
class LockedWallet:
    id: int
    user_id: int | None
    kind: str
    status: str
    currency: str
    balance: int
    owner_name: str


def open_wallet_of(session: Session, user_id: int, *, lock: bool = False) -> Wallet | None:
    query = select(Wallet).where(col(Wallet.user_id) == user_id, col(Wallet.status) == OPEN)
    if lock:
        query = query.with_for_update()
    return session.execute(query).scalars().first()


def add_wallet(session: Session, wallet: Wallet) -> Wallet:
    session.add(wallet)
    session.flush()
    return wallet


def close_wallet(session: Session, wallet: Wallet) -> None:
    now = utcnow()
    wallet.status = CLOSED
    wallet.closed_at = now
    wallet.updated_at = now
    session.flush()


def system_wallet_ids(session: Session) -> dict[str, int]:
    rows = session.execute(select(W.c.currency, W.c.id).where(W.c.kind == SYSTEM))
    return {currency: wallet_id for currency, wallet_id in rows}


def add_system_wallet(session: Session, currency: str) -> None:
    now = utcnow()
    session.execute(
        insert(W).values(
            user_id=None,
            kind=SYSTEM,
            status=OPEN,
            currency=currency,
            balance=0,
            owner_name="External",
            created_at=now,
            updated_at=now,
        )
    )


# The money path runs these statements thousands of times a second: they are built once
# (bind parameters, no per-call construction or cache-key work beyond the lookup) and run on
# the session's Core connection, skipping the ORM's per-statement bookkeeping.
_MOVE_BALANCES = (
    update(W)
    .where(W.c.id.in_([bindparam("a"), bindparam("b")]))
    .values(
        balance=W.c.balance + case((W.c.id == bindparam("a"), bindparam("delta_a")), else_=bindparam("delta_b")),
        updated_at=bindparam("now", type_=UTCDateTime()),
    )
    .returning(W.c.id, W.c.balance)
)
_ADD_TRANSACTION = insert(T).returning(T.c.id)
_ADD_ENTRIES = insert(L)
_ADD_IDEMPOTENCY_RECORD = insert(I)
_LOCK_FOR_MOVEMENT = (
    select(W.c.id, W.c.user_id, W.c.kind, W.c.status, W.c.currency, W.c.balance, W.c.owner_name)
    .where(or_((W.c.user_id == bindparam("user_id")) & (W.c.status == OPEN), W.c.id == bindparam("other_id")))
    .order_by(W.c.id)
    .with_for_update()
)


def apply_postings(session: Session, postings: tuple[Posting, Posting], now: datetime) -> dict[int, int]:
    """Move both balances in one statement; returns each wallet's new balance."""
    a, b = postings
    rows = session.connection().execute(
        _MOVE_BALANCES, {"a": a.wallet_id, "b": b.wallet_id, "delta_a": signed(a), "delta_b": signed(b), "now": now}
    )
    return {wallet_id: balance for wallet_id, balance in rows}


def add_transaction(
    session: Session,
    *,
    type: str,
    amount: int,
    currency: str,
    from_wallet_id: int,
    to_wallet_id: int,
    initiated_by: int,
    now: datetime,
) -> int:
    result = session.connection().execute(
        _ADD_TRANSACTION,
        {
            "type": type,
            "amount": amount,
            "currency": currency,
            "from_wallet_id": from_wallet_id,
            "to_wallet_id": to_wallet_id,
            "initiated_by": initiated_by,
            "created_at": now,
        },
    )
    return int(result.scalar_one())


def add_entries(
    session: Session,
    *,
    transaction_id: int,
    postings: Sequence[Posting],
    snapshots: dict[int, int],
    currency: str,
    now: datetime,
) -> None:
    session.connection().execute(
        _ADD_ENTRIES,
        [
            {
                "transaction_id": transaction_id,
                "wallet_id": p.wallet_id,
                "entry_type": p.entry_type,
                "amount": p.amount,
                "currency": currency,
                "balance_snapshot": snapshots[p.wallet_id],
                "created_at": now,
            }
            for p in postings
        ],
    )


def get_idempotency_record(session: Session, *, user_id: int, endpoint: str, key: str) -> IdempotencyRecord | None:
    return (
        session.execute(
            select(IdempotencyRecord).where(
                col(IdempotencyRecord.user_id) == user_id,
                col(IdempotencyRecord.endpoint) == endpoint,
                col(IdempotencyRecord.key) == key,
            )
        )
        .scalars()
        .first()
    )


def add_idempotency_record(
    session: Session,
    *,
    user_id: int,
    endpoint: str,
    key: str,
    fingerprint: str,
    status_code: int,
    response_body: str,
    transaction_id: int | None,
    now: datetime,
) -> None:
    session.connection().execute(
        _ADD_IDEMPOTENCY_RECORD,
        {
            "user_id": user_id,
            "endpoint": endpoint,
            "key": key,
            "fingerprint": fingerprint,
            "status_code": status_code,
            "response_body": response_body,
            "transaction_id": transaction_id,
            "created_at": now,
        },
    )


def user_wallet_ids(session: Session, user_id: int) -> list[int]:
    return list(session.execute(select(W.c.id).where(W.c.user_id == user_id, W.c.kind == USER)).scalars())


def history(session: Session, *, wallet_ids: Sequence[int], limit: int, offset: int) -> list[tuple]:  # type: ignore[type-arg]
    """The transactions touching these wallets, newest first, with both sides' names.

    Driven by the (wallet_id, transaction_id) index of ledger_entries, read backwards, so a
    page costs limit + offset index entries however long the history (one entry per
    transaction and user: a user's wallets never trade with each other).
    """
    if not wallet_ids:
        return []
    src, dst = aliased(W), aliased(W)
    query = (
        select(
            T.c.id,
            T.c.amount,
            T.c.currency,
            T.c.type,
            T.c.created_at,
            src.c.owner_name,
            src.c.kind,
            dst.c.owner_name,
            dst.c.kind,
        )
        .select_from(L)
        .join(T, T.c.id == L.c.transaction_id)
        .join(src, src.c.id == T.c.from_wallet_id)
        .join(dst, dst.c.id == T.c.to_wallet_id)
        .where(L.c.wallet_id.in_(wallet_ids))
        .order_by(L.c.transaction_id.desc())
        .limit(limit)
        .offset(offset)
    )
    return [tuple(row) for row in session.execute(query)]


def ledger_entries(session: Session, *, transaction_id: int, visible_to: Sequence[int]) -> list[LedgerEntry]:
    """The transaction's entries, if one of `visible_to`'s wallets is part of it."""
    if not visible_to:
        return []
    part_of = session.execute(
        select(func.count())
        .select_from(T)
        .where(T.c.id == transaction_id, or_(T.c.from_wallet_id.in_(visible_to), T.c.to_wallet_id.in_(visible_to)))
    ).scalar_one()
    if not part_of:
        return []
    return list(
        session.execute(
            select(LedgerEntry).where(col(LedgerEntry.transaction_id) == transaction_id).order_by(col(LedgerEntry.id))
        ).scalars()
    )


def lock_for_movement(session: Session, *, user_id: int, other_id: int) -> dict[int, LockedWallet]:
    """Lock the caller's open wallet and the other wallet, in id order, in one round trip."""
    rows = session.connection().execute(_LOCK_FOR_MOVEMENT, {"user_id": user_id, "other_id": other_id})
    return {row.id: LockedWallet(*row) for row in rows}
