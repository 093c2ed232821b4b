"""Every query of the wallet service.

The money-moving path uses Core statements rather than the ORM's unit of work. A movement
locks both wallets (SELECT ... FOR UPDATE) and then draws its transaction id and time, and
once the rules are checked writes everything as one `Booking`: on Postgres a single statement (balances,
transaction, ledger entries, outbox rows and the idempotency record), so the row locks are
held for one round trip and the commit.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BindParameter,
    Select,
    Table,
    TextClause,
    bindparam,
    func,
    insert,
    literal_column,
    or_,
    select,
    text,
    true,
)
from sqlalchemy.orm import aliased
from sqlmodel import Session, col

from svckit.db import UTCDateTime, utcnow
from wallet.ledger import Posting, signed
from wallet.models import (
    CLOSED,
    OPEN,
    SYSTEM,
    USER,
    IdempotencyRecord,
    LedgerEntry,
    OutboxMessage,
    Transaction,
    Wallet,
)

W = Wallet.__table__  # type: ignore[attr-defined]
T = Transaction.__table__  # type: ignore[attr-defined]
L = LedgerEntry.__table__  # type: ignore[attr-defined]
I = IdempotencyRecord.__table__  # type: ignore[attr-defined]  # noqa: E741
Outbox = OutboxMessage.__table__  # type: ignore[attr-defined]


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


def system_wallet_ids(session: Session) -> dict[tuple[str, int], int]:
    """The system wallets' ids, by (currency, shard)."""
    rows = session.execute(select(W.c.currency, W.c.shard, W.c.id).where(W.c.kind == SYSTEM))
    return {(currency, shard): wallet_id for currency, shard, wallet_id in rows}


def add_system_wallet(session: Session, currency: str, shard: int) -> None:
    now = utcnow()
    session.execute(
        insert(W).values(
            user_id=None,
            kind=SYSTEM,
            status=OPEN,
            currency=currency,
            balance=0,
            owner_name="External",
            shard=shard,
            created_at=now,
            updated_at=now,
        )
    )


@dataclass(frozen=True)
class Booking:
    """Every row one money movement writes, worked out in full while the wallets are locked
    (their balances are known, and the transaction id and time are drawn), so that all of
    it goes to the database in one statement just before the commit. The locks are then
    held for one round trip instead of five."""

    transaction_id: int
    type: str
    amount: int
    currency: str
    source: Posting
    destination: Posting
    snapshots: dict[int, int]  # each wallet's balance after the movement
    initiated_by: int
    now: datetime
    outbox: list[dict[str, Any]] = field(default_factory=list)

    def transaction_row(self) -> dict[str, Any]:
        return {
            "id": self.transaction_id,
            "type": self.type,
            "amount": self.amount,
            "currency": self.currency,
            "from_wallet_id": self.source.wallet_id,
            "to_wallet_id": self.destination.wallet_id,
            "initiated_by": self.initiated_by,
            "created_at": self.now,
        }

    def entry_rows(self) -> list[dict[str, Any]]:
        return [
            {
                "transaction_id": self.transaction_id,
                "wallet_id": p.wallet_id,
                "entry_type": p.entry_type,
                "amount": p.amount,
                "currency": self.currency,
                "balance_snapshot": self.snapshots[p.wallet_id],
                "created_at": self.now,
            }
            for p in (self.source, self.destination)
        ]


_LOCKED_COLUMNS = (W.c.id, W.c.user_id, W.c.kind, W.c.status, W.c.currency, W.c.balance, W.c.owner_name)
_LOCK_WHERE = or_((W.c.user_id == bindparam("user_id")) & (W.c.status == OPEN), W.c.id == bindparam("other_id"))


def _lock_then_draw_postgres() -> Select[Any]:
    """Lock both wallets, then (once both locks are granted) draw the transaction id and the
    time, in one statement.

    The order matters: history is ordered by transaction id, so of two movements on a
    wallet the one that locks it later must draw the larger id and the later time. An id
    drawn in the locking SELECT's own target list is drawn when its first row is projected,
    before the rows are locked, so a movement that waits for a lock keeps the smaller id
    while a movement on another pair of wallets books over it. Here the locking SELECT is a
    materialized CTE, and the id and the time are drawn in a second one over the count of
    its rows: an aggregate has read, and so locked, every row before it yields, and a CTE
    runs once, so the id is drawn once, whatever plan joins the two.
    """
    # In id order, as every movement locks, so two movements never deadlock.
    locking = select(*_LOCKED_COLUMNS).where(_LOCK_WHERE).order_by(W.c.id).with_for_update()
    locked = locking.cte("locked").prefix_with("MATERIALIZED")
    held = select(func.count()).select_from(locked).subquery("held")
    drawn = (
        select(
            func.nextval(literal_column("pg_get_serial_sequence('transactions', 'id')")).label("next_transaction_id"),
            func.clock_timestamp(type_=UTCDateTime()).label("now"),  # the database's clock, not each replica's
        )
        .select_from(held)
        .cte("drawn")
        .prefix_with("MATERIALIZED")
    )
    return select(locked, drawn).select_from(locked.join(drawn, true()))


def _lock_then_draw_sqlite() -> Select[Any]:
    # Every writer holds the database write lock for its whole transaction (BEGIN
    # IMMEDIATE), so max + 1 is ours, and the time is read after this statement.
    next_id = literal_column("(SELECT coalesce(max(id), 0) + 1 FROM transactions)")
    columns = (*_LOCKED_COLUMNS, next_id.label("next_transaction_id"))
    return select(*columns).where(_LOCK_WHERE).order_by(W.c.id).with_for_update()


# The Postgres id is a sequence value, never handed out twice (one a refused movement draws
# is skipped).
_LOCK_FOR_MOVEMENT = {"postgresql": _lock_then_draw_postgres(), "sqlite": _lock_then_draw_sqlite()}


def write_booking(session: Session, booking: Booking, record: dict[str, Any] | None = None) -> None:
    """Write the movement (and the idempotency record that answers for it) in the caller's
    transaction: balances, the transaction row, its ledger entries, its outbox rows."""
    conn = session.connection()
    a, b = booking.source, booking.destination
    params: dict[str, Any] = {
        "a": a.wallet_id,
        "b": b.wallet_id,
        "delta_a": signed(a),
        "delta_b": signed(b),
        "now": booking.now,
        **_prefixed("t_", booking.transaction_row()),
        **_prefixed("r_", record or {}),
    }
    for i, row in enumerate(booking.entry_rows()):
        params.update(_prefixed(f"e{i}_", row))
    for i, row in enumerate(booking.outbox):
        params.update(_prefixed(f"o{i}_", row))
    first, *rest = _booking_statements(conn.dialect.name, len(booking.outbox), record is not None)
    balances = dict(conn.execute(first, params).all())
    for statement in rest:
        conn.execute(statement, params)
    if balances != booking.snapshots:  # the locks make this impossible; refuse to commit if not
        raise RuntimeError(f"balances {balances} differ from the booked snapshots {booking.snapshots}")


def _prefixed(prefix: str, row: dict[str, Any]) -> dict[str, Any]:
    return {prefix + key: value for key, value in row.items()}


_Part = tuple[str, list[BindParameter[Any]]]  # SQL with :name placeholders, its typed binds


def _insert(table: Table, rows: list[tuple[str, list[str]]]) -> _Part:
    """An INSERT of one row per (bind prefix, columns); each value a bind parameter typed like
    its column, so values are stored exactly as Core stores them (datetimes on SQLite)."""
    columns = rows[0][1]
    values = ", ".join(f"({', '.join(':' + prefix + c for c in cols)})" for prefix, cols in rows)
    binds = [bindparam(prefix + c, type_=table.c[c].type) for prefix, cols in rows for c in cols]
    return f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES {values}", binds  # noqa: S608  # nosec B608


_ENTRY_COLUMNS = [c.name for c in L.c if c.name != "id"]
_RECORD_COLUMNS = [c.name for c in I.c if c.name != "id"]
_MOVE_BALANCES: _Part = (
    "UPDATE wallets SET balance = balance + CASE WHEN id = :a THEN :delta_a ELSE :delta_b END,"
    " updated_at = :now WHERE id IN (:a, :b) RETURNING id, balance",
    [bindparam("now", type_=W.c.updated_at.type)],
)


@functools.cache
def _booking_statements(dialect: str, outbox_rows: int, with_record: bool) -> list[TextClause]:
    """The booking's statements, built once per shape. The first moves the balances and
    returns the new ones; the others insert the transaction, its two entries, its outbox
    rows and the record. On Postgres they are one statement of data-modifying CTEs: one
    round trip while the rows are locked (foreign keys are checked at its end, when the
    transaction row exists). On SQLite, in process, they run one by one."""
    parts = [
        _MOVE_BALANCES,
        _insert(T, [("t_", list(T.c.keys()))]),
        _insert(L, [("e0_", _ENTRY_COLUMNS), ("e1_", _ENTRY_COLUMNS)]),
    ]
    if outbox_rows:
        parts.append(_insert(Outbox, [(f"o{i}_", list(Outbox.c.keys())) for i in range(outbox_rows)]))
    if with_record:
        parts.append(_insert(I, [("r_", _RECORD_COLUMNS)]))
    if dialect == "postgresql":
        ctes = ", ".join(f"part{i} AS ({sql})" for i, (sql, _) in enumerate(parts))
        binds = [bind for _, part_binds in parts for bind in part_binds]
        statement = f"WITH {ctes} SELECT id, balance FROM part0"  # noqa: S608  # nosec B608 (no values)
        return [text(statement).bindparams(*binds)]
    return [text(sql).bindparams(*binds) for sql, binds in parts]


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


def idempotency_record(
    *,
    user_id: int,
    endpoint: str,
    key: str,
    fingerprint: str,
    status_code: int,
    response_body: str,
    transaction_id: int | None,
    now: datetime,
    request_token: str | None = None,
) -> dict[str, Any]:
    """The row that keeps a request's outcome under its key (see write_booking), marked
    with the token of the request that wrote it."""
    return {
        "user_id": user_id,
        "endpoint": endpoint,
        "key": key,
        "fingerprint": fingerprint,
        "status_code": status_code,
        "response_body": response_body,
        "transaction_id": transaction_id,
        "created_at": now,
        "request_token": request_token,
    }


def add_idempotency_record(session: Session, record: dict[str, Any]) -> None:
    session.execute(insert(I), record)


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


def ledger_entries(
    session: Session, *, transaction_id: int, visible_to: Sequence[int], own_only: bool = False
) -> list[LedgerEntry]:
    """The transaction's entries, if one of `visible_to`'s wallets is part of it: all of
    them, or with `own_only` only those of `visible_to`'s wallets."""
    if not visible_to:
        return []
    part_of = session.execute(
        select(func.count())
        .select_from(T)
        .where(T.c.id == transaction_id, or_(T.c.from_wallet_id.in_(visible_to), T.c.to_wallet_id.in_(visible_to)))
    ).scalar_one()
    if not part_of:
        return []
    query = select(LedgerEntry).where(col(LedgerEntry.transaction_id) == transaction_id)
    if own_only:
        query = query.where(col(LedgerEntry.wallet_id).in_(visible_to))
    return list(session.execute(query.order_by(col(LedgerEntry.id))).scalars())


@dataclass(frozen=True)
class Locked:
    wallets: dict[int, LockedWallet]
    transaction_id: int  # the id this movement's transaction row will have
    now: datetime  # the movement's time, read once both locks were held

    @property
    def balances(self) -> dict[int, int]:
        return {w.id: w.balance for w in self.wallets.values()}


def lock_for_movement(session: Session, *, user_id: int, other_id: int) -> Locked:
    """Lock the caller's open wallet and the other wallet, then draw the movement's
    transaction id and time, in one round trip (see _lock_then_draw_postgres)."""
    conn = session.connection()
    rows = conn.execute(_LOCK_FOR_MOVEMENT[conn.dialect.name], {"user_id": user_id, "other_id": other_id}).all()
    first = rows[0]._mapping if rows else {}
    return Locked(
        wallets={row.id: LockedWallet(*row[: len(_LOCKED_COLUMNS)]) for row in rows},
        transaction_id=int(first.get("next_transaction_id", 0)),
        now=first.get("now") or utcnow(),
    )
