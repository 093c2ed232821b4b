"""The queries of holds, refunds and balances (contract: Extensions), in SQLAlchemy Core
like wallet.repository, each statement built once at import.

Every change to a hold, and to a wallet's `held`, runs under that wallet's row lock (a
movement's `lock_for_movement`, or the sweeper's `lock_wallet`), so `held` always equals
what the wallet's active holds reserve, and a capture, a void and an expiry of one hold
are serialized: whichever locks first wins, the others find it no longer active.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Integer, Select, Table, and_, bindparam, func, insert, or_, select, update
from sqlalchemy.orm import aliased

from svckit.aiodb import Connection
from wallet.domain import LockedWallet
from wallet.models import ACTIVE, EXPIRED, Hold, Refund
from wallet.repository import L, T, W, _among, _bind, _prefixed, _row_binds

H: Table = Hold.__table__  # type: ignore[attr-defined]
R: Table = Refund.__table__  # type: ignore[attr-defined]

_NOW = _bind(H, "updated_at", "now")

# --- holds --------------------------------------------------------------------------------

_HOLD_COLUMNS = [c.name for c in H.c if c.name != "id"]
_ADD_HOLD = insert(H).values(_row_binds(H, "h_", _HOLD_COLUMNS)).returning(H.c.id)
_HELD = (
    update(W)
    .where(W.c.id == _bind(W, "id", "wallet_id"))
    .values(held=W.c.held + bindparam("delta", type_=H.c.amount.type))
)
_EXPIRE_OVERDUE = (
    update(H)
    .where(
        H.c.wallet_id == _bind(H, "wallet_id", "hold_wallet_id"),
        H.c.status == ACTIVE,
        H.c.expires_at <= _bind(H, "expires_at", "now"),
    )
    .values(status=EXPIRED, updated_at=_NOW)
    .returning(H.c.amount)
)
_SET_HOLD = (
    update(H)
    .where(H.c.id == _bind(H, "id", "hold_id"), H.c.status == ACTIVE)
    .values(
        status=_bind(H, "status", "s_status"),
        captured_amount=_bind(H, "captured_amount", "s_captured_amount"),
        recipient_wallet_id=_bind(H, "recipient_wallet_id", "s_recipient_wallet_id"),
        transaction_id=_bind(H, "transaction_id", "s_transaction_id"),
        updated_at=_NOW,
    )
    .returning(H.c.id)
)


def _holds(dialect: str) -> Select[Any]:
    return select(H).where(_among(H.c.wallet_id, "wallet_ids", dialect))


_HOLD = {d: _holds(d).where(H.c.id == _bind(H, "id", "hold_id")) for d in ("postgresql", "sqlite")}
_LIST = {d: _holds(d).order_by(H.c.id.desc()) for d in ("postgresql", "sqlite")}
_LIST_STATUS = {d: _LIST[d].where(H.c.status == _bind(H, "status")) for d in ("postgresql", "sqlite")}
_OVERDUE = or_(H.c.status == EXPIRED, and_(H.c.status == ACTIVE, H.c.expires_at <= _bind(H, "expires_at", "now")))
_LIST_EXPIRED = {d: _LIST[d].where(_OVERDUE) for d in ("postgresql", "sqlite")}
_LIST_ACTIVE = {
    d: _LIST[d].where(H.c.status == ACTIVE, H.c.expires_at > _bind(H, "expires_at", "now"))
    for d in ("postgresql", "sqlite")
}
_OVERDUE_WALLETS = (
    select(H.c.wallet_id)
    .where(H.c.status == ACTIVE, H.c.expires_at <= _bind(H, "expires_at", "now"))
    .group_by(H.c.wallet_id)
    .limit(bindparam("limit", type_=Integer()))
)
_LOCK_WALLET = select(W.c.held).where(W.c.id == _bind(W, "id", "wallet_id")).with_for_update(skip_locked=True)


async def add_hold(conn: Connection, row: dict[str, Any]) -> int:
    return int((await conn.execute(_ADD_HOLD, _prefixed("h_", row))).scalar_one())


async def change_held(conn: Connection, *, wallet_id: int, delta: int) -> None:
    """Add `delta` to the wallet's held amount (under its row lock; the CHECK keeps it
    between 0 and the balance)."""
    await conn.execute(_HELD, {"wallet_id": wallet_id, "delta": delta})


async def release_overdue(conn: Connection, *, wallet_id: int, held: int, now: datetime) -> int:
    """Mark the wallet's overdue active holds expired and release what they reserved, under
    the wallet's row lock: an overdue hold reserves nothing from the moment it expires,
    swept or not. Returns the wallet's held amount after. Nothing to do when nothing is held
    (the common case: no round trip)."""
    if held == 0:
        return 0
    released = sum((await conn.execute(_EXPIRE_OVERDUE, {"hold_wallet_id": wallet_id, "now": now})).scalars())
    if released:
        await change_held(conn, wallet_id=wallet_id, delta=-released)
    return held - released


async def available(conn: Connection, wallet: LockedWallet, now: datetime) -> int:
    """A locked wallet's balance minus what its active, unexpired holds reserve."""
    return wallet.balance - await release_overdue(conn, wallet_id=wallet.id, held=wallet.held, now=now)


async def get_hold(conn: Connection, *, hold_id: int, wallet_ids: Sequence[int]) -> Any:
    """The hold, if it is on one of these wallets."""
    if not wallet_ids:
        return None
    params = {"hold_id": hold_id, "wallet_ids": list(wallet_ids)}
    return (await conn.execute(_HOLD[conn.dialect_name], params)).first()


async def list_holds(conn: Connection, *, wallet_ids: Sequence[int], status: str | None, now: datetime) -> list[Any]:
    """The holds on these wallets, newest first; an active hold past its expiry is expired
    already (the sweeper may not have marked it yet)."""
    if not wallet_ids:
        return []
    params: dict[str, Any] = {"wallet_ids": list(wallet_ids), "now": now, "status": status}
    queries = {None: _LIST, ACTIVE: _LIST_ACTIVE, EXPIRED: _LIST_EXPIRED}
    statement = queries.get(status, _LIST_STATUS)[conn.dialect_name]
    return list((await conn.execute(statement, params)).all())


async def set_hold(
    conn: Connection,
    *,
    hold_id: int,
    status: str,
    now: datetime,
    captured_amount: int = 0,
    recipient_wallet_id: int | None = None,
    transaction_id: int | None = None,
) -> None:
    """Settle an active hold (captured or voided), under its wallet's row lock."""
    params = {
        "hold_id": hold_id,
        "s_status": status,
        "s_captured_amount": captured_amount,
        "s_recipient_wallet_id": recipient_wallet_id,
        "s_transaction_id": transaction_id,
        "now": now,
    }
    if (
        await conn.execute(_SET_HOLD, params)
    ).first() is None:  # the wallet lock makes this impossible; refuse to commit if not
        raise RuntimeError(f"hold {hold_id} was no longer active")


async def overdue_wallet_ids(conn: Connection, *, now: datetime, limit: int) -> list[int]:
    """Wallets with active holds past their expiry (the partial index of active holds)."""
    return list((await conn.execute(_OVERDUE_WALLETS, {"now": now, "limit": limit})).scalars())


async def lock_wallet(conn: Connection, wallet_id: int) -> int | None:
    """The wallet's held amount, its row locked; None when another transaction holds the
    lock (SKIP LOCKED, Postgres): that one is a movement, which releases the overdue holds
    itself, or another sweeper."""
    row = (await conn.execute(_LOCK_WALLET, {"wallet_id": wallet_id})).first()
    return None if row is None else int(row[0])


# --- refunds and transactions ---------------------------------------------------------------

_REFUNDED = select(func.coalesce(func.sum(R.c.amount), 0)).where(R.c.refund_of == _bind(R, "refund_of"))
_REFUND_OF = select(R.c.refund_of).where(R.c.transaction_id == _bind(R, "transaction_id"))
_ADD_REFUND = insert(R).values(_row_binds(R, "", ["transaction_id", "refund_of", "amount"]))


def _transaction(dialect: str) -> Select[Any]:
    source, destination = aliased(W, name="source"), aliased(W, name="destination")
    return (
        select(
            T.c.id,
            T.c.amount,
            T.c.currency,
            T.c.type,
            T.c.created_at,
            T.c.from_wallet_id,
            T.c.to_wallet_id,
            source.c.owner_name.label("source_name"),
            source.c.kind.label("source_kind"),
            destination.c.owner_name.label("destination_name"),
            destination.c.kind.label("destination_kind"),
            select(func.coalesce(func.sum(R.c.amount), 0))
            .where(R.c.refund_of == T.c.id)
            .scalar_subquery()
            .label("refunded_total"),
            select(R.c.refund_of).where(R.c.transaction_id == T.c.id).scalar_subquery().label("refund_of"),
        )
        .join_from(T, source, source.c.id == T.c.from_wallet_id)
        .join(destination, destination.c.id == T.c.to_wallet_id)
        .where(
            T.c.id == _bind(T, "id", "transaction_id"),
            or_(_among(T.c.from_wallet_id, "wallet_ids", dialect), _among(T.c.to_wallet_id, "wallet_ids", dialect)),
        )
    )


_TRANSACTION = {d: _transaction(d) for d in ("postgresql", "sqlite")}


async def transaction_of(conn: Connection, *, transaction_id: int, wallet_ids: Sequence[int]) -> Any:
    """The transaction with both sides' names, its refunded total and what it refunds, if
    one of these wallets is part of it."""
    if not wallet_ids:
        return None
    params = {"transaction_id": transaction_id, "wallet_ids": list(wallet_ids)}
    return (await conn.execute(_TRANSACTION[conn.dialect_name], params)).first()


async def refunded_total(conn: Connection, transaction_id: int) -> int:
    return int((await conn.execute(_REFUNDED, {"refund_of": transaction_id})).scalar_one())


async def refund_of(conn: Connection, transaction_id: int) -> int | None:
    row = (await conn.execute(_REFUND_OF, {"transaction_id": transaction_id})).first()
    return None if row is None else int(row[0])


async def add_refund(conn: Connection, *, transaction_id: int, refund_of: int, amount: int) -> None:
    await conn.execute(_ADD_REFUND, {"transaction_id": transaction_id, "refund_of": refund_of, "amount": amount})


# --- balances ------------------------------------------------------------------------------

_HELD_NOW = (
    select(func.coalesce(func.sum(H.c.amount), 0))
    .where(H.c.wallet_id == W.c.id, H.c.status == ACTIVE, H.c.expires_at > _bind(H, "expires_at", "now"))
    .scalar_subquery()
)
# One statement, so the balance and the holds are read from one snapshot.
_BALANCE_NOW = select(W.c.id, W.c.currency, W.c.balance, W.c.created_at, _HELD_NOW.label("held")).where(
    W.c.user_id == _bind(W, "user_id"), W.c.status == "open"
)
# One lookup in ix_ledger_wallet_created_at, read backwards.
_BALANCE_AT = (
    select(L.c.balance_snapshot)
    .where(L.c.wallet_id == _bind(L, "wallet_id"), L.c.created_at <= _bind(L, "created_at", "at"))
    .order_by(L.c.created_at.desc(), L.c.id.desc())
    .limit(1)
)


async def balance_now(conn: Connection, *, user_id: int, now: datetime) -> Any:
    """The user's open wallet (id, currency, balance, created_at) and what its unexpired
    active holds reserve, or None."""
    return (await conn.execute(_BALANCE_NOW, {"user_id": user_id, "now": now})).first()


async def balance_at(conn: Connection, *, wallet_id: int, at: datetime) -> int:
    """The wallet's balance right after its last entry at or before `at` (0 before any)."""
    row = (await conn.execute(_BALANCE_AT, {"wallet_id": wallet_id, "at": at})).first()
    return 0 if row is None else int(row[0])
