"""Every query of the wallet service.

The money-moving path uses Core statements rather than the ORM's unit of work. A movement
locks both wallets (SELECT ... FOR UPDATE) and then draws its transaction id and time, and
once the rules are checked writes everything as one `Booking` (wallet.domain): on Postgres a
single statement of named data-modifying CTEs (balances, transaction, ledger entries, outbox
rows and the idempotency record), so the row locks are held for one round trip and the commit.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    BindParameter,
    Executable,
    Insert,
    Select,
    Table,
    bindparam,
    case,
    func,
    insert,
    literal_column,
    or_,
    select,
    true,
    union_all,
    update,
)
from sqlalchemy.orm import aliased
from sqlmodel import Session, col

from svckit.db import UTCDateTime, utcnow
from wallet.domain import Booking, Locked, LockedWallet
from wallet.ledger import signed
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

W: Table = Wallet.__table__  # type: ignore[attr-defined]
T: Table = Transaction.__table__  # type: ignore[attr-defined]
L: Table = LedgerEntry.__table__  # type: ignore[attr-defined]
I: Table = IdempotencyRecord.__table__  # type: ignore[attr-defined]  # noqa: E741
Outbox: Table = OutboxMessage.__table__  # type: ignore[attr-defined]


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


def _bind(table: Table, column: str, name: str) -> BindParameter[Any]:
    """A bind parameter typed like the column it fills (psycopg renders each as a cast)."""
    return bindparam(name, type_=table.c[column].type)


def _row_binds(table: Table, prefix: str, columns: Sequence[str]) -> dict[str, BindParameter[Any]]:
    return {c: _bind(table, c, prefix + c) for c in columns}


def _insert_rows(table: Table, prefixes: Sequence[str], columns: Sequence[str]) -> Insert:
    rows = [select(*(_bind(table, c, prefix + c).label(c) for c in columns)) for prefix in prefixes]
    return insert(table).from_select(list(columns), rows[0] if len(rows) == 1 else union_all(*rows))


_ENTRY_COLUMNS = [c.name for c in L.c if c.name != "id"]
_RECORD_COLUMNS = [c.name for c in I.c if c.name != "id"]


@functools.cache
def _booking_statements(dialect: str, outbox_rows: int, with_record: bool) -> list[Executable]:
    """The booking's statements, built once per shape, in Core with typed binds. The first
    moves the balances and returns the new ones; the others insert the transaction, its two
    entries, its outbox rows and the record. On Postgres they are one statement of named
    data-modifying CTEs: one round trip while the rows are locked (foreign keys are checked
    at its end, when the transaction row exists). On SQLite, in process, they run one by one."""
    a, b = _bind(W, "id", "a"), _bind(W, "id", "b")
    delta = case(
        (W.c.id == a, bindparam("delta_a", type_=BigInteger())), else_=bindparam("delta_b", type_=BigInteger())
    )
    moved = (
        update(W)
        .where(W.c.id.in_([a, b]))
        .values(balance=W.c.balance + delta, updated_at=_bind(W, "updated_at", "now"))
        .returning(W.c.id, W.c.balance)
    )
    # Several rows as INSERT ... SELECT of a UNION ALL, in order (the debit first): SQLAlchemy
    # caches the compiled form of that, not of a multi-row VALUES.
    inserts: dict[str, Any] = {
        "booked_transaction": insert(T).values(_row_binds(T, "t_", list(T.c.keys()))),
        "booked_entries": _insert_rows(L, [f"e{i}_" for i in range(2)], _ENTRY_COLUMNS),
    }
    if outbox_rows:
        inserts["booked_receipts"] = _insert_rows(Outbox, [f"o{i}_" for i in range(outbox_rows)], list(Outbox.c.keys()))
    if with_record:
        inserts["booked_record"] = insert(I).values(_row_binds(I, "r_", _RECORD_COLUMNS))
    if dialect == "postgresql":
        balances = moved.cte("moved_balances")
        ctes = [statement.cte(name) for name, statement in inserts.items()]
        return [select(balances.c.id, balances.c.balance).add_cte(*ctes)]
    return [moved, *inserts.values()]


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
