"""Every query of the wallet service.

The money-moving path uses Core statements rather than the ORM's unit of work. A movement
draws its transaction id, locks both wallets (SELECT ... FOR UPDATE), and once the rules
are checked writes everything as one `Booking`: on Postgres a single statement (balances,
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
    Select,
    Table,
    TextClause,
    bindparam,
    case,
    func,
    insert,
    literal_column,
    or_,
    select,
    text,
    update,
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
    (their balances are known, and the transaction id is drawn beforehand), so that all of
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


# The money path runs these statements thousands of times a second: they are built once
# (bind parameters, no per-call construction) and run on the session's Core connection,
# skipping the ORM's per-statement bookkeeping.
_MOVE_BALANCES = (
    update(W)
    .where(W.c.id.in_([bindparam("a"), bindparam("b")]))
    .values(
        balance=W.c.balance + case((W.c.id == bindparam("a"), bindparam("delta_a")), else_=bindparam("delta_b")),
        updated_at=bindparam("now", type_=UTCDateTime()),
    )
    .returning(W.c.id, W.c.balance)
)
_ADD_TRANSACTION = insert(T)
_ADD_ENTRIES = insert(L)
_ADD_IDEMPOTENCY_RECORD = insert(I)


def _lock_for_movement(next_transaction_id: str) -> Select[Any]:
    # The next transaction id rides along with the locks: an uncorrelated scalar subquery
    # is evaluated once per statement, so the booking needs no round trip of its own.
    return (
        select(
            W.c.id,
            W.c.user_id,
            W.c.kind,
            W.c.status,
            W.c.currency,
            W.c.balance,
            W.c.owner_name,
            literal_column(f"({next_transaction_id})").label("next_transaction_id"),
        )
        .where(or_((W.c.user_id == bindparam("user_id")) & (W.c.status == OPEN), W.c.id == bindparam("other_id")))
        .order_by(W.c.id)
        .with_for_update()
    )


_LOCK_FOR_MOVEMENT = {
    # A sequence value, never handed out twice (one a refused movement draws is skipped).
    "postgresql": _lock_for_movement("SELECT nextval(pg_get_serial_sequence('transactions', 'id'))"),
    # SQLite: every writer holds the database lock (BEGIN IMMEDIATE), so max + 1 is ours.
    "sqlite": _lock_for_movement("SELECT coalesce(max(id), 0) + 1 FROM transactions"),
}


def write_booking(session: Session, booking: Booking, record: dict[str, Any] | None = None) -> None:
    """Write the movement (and the idempotency record that answers for it) in the caller's
    transaction: balances, the transaction row, its ledger entries, its outbox rows."""
    conn = session.connection()
    a, b = booking.source, booking.destination
    moves = {"a": a.wallet_id, "b": b.wallet_id, "delta_a": signed(a), "delta_b": signed(b), "now": booking.now}
    if conn.dialect.name == "postgresql":
        statement = _booking_statement(len(booking.outbox), record is not None)
        params: dict[str, Any] = {**moves, **_prefixed("t_", booking.transaction_row())}
        for i, row in enumerate(booking.entry_rows()):
            params.update(_prefixed(f"e{i}_", row))
        for i, row in enumerate(booking.outbox):
            params.update(_prefixed(f"o{i}_", row))
        if record is not None:
            params.update(_prefixed("r_", record))
        balances = dict(conn.execute(statement, params).all())
    else:
        balances = dict(conn.execute(_MOVE_BALANCES, moves).all())
        conn.execute(_ADD_TRANSACTION, booking.transaction_row())
        conn.execute(_ADD_ENTRIES, booking.entry_rows())
        if booking.outbox:
            conn.execute(insert(Outbox), booking.outbox)
        if record is not None:
            conn.execute(_ADD_IDEMPOTENCY_RECORD, record)
    if balances != booking.snapshots:  # the locks make this impossible; refuse to commit if not
        raise RuntimeError(f"balances {balances} differ from the booked snapshots {booking.snapshots}")


def _prefixed(prefix: str, row: dict[str, Any]) -> dict[str, Any]:
    return {prefix + key: value for key, value in row.items()}


def _values(table: Table, prefix: str, columns: Sequence[str]) -> str:
    # Names come from our own table metadata; every value is a bind parameter.
    return f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES ({', '.join(':' + prefix + c for c in columns)})"  # noqa: S608  # nosec B608


@functools.cache
def _booking_statement(outbox_rows: int, with_record: bool) -> TextClause:
    """Postgres: the whole booking as one statement of data-modifying CTEs. (Foreign keys
    are checked at the end of the statement, when the transaction row exists.)"""
    parts = [
        "moved AS (UPDATE wallets SET balance = balance + CASE WHEN id = :a THEN :delta_a ELSE :delta_b END,"
        " updated_at = :now WHERE id IN (:a, :b) RETURNING id, balance)",
        f"txn AS ({_values(T, 't_', list(T.c.keys()))})",
        f"entries AS ({_values(L, 'e0_', _ENTRY_COLUMNS)}, ({', '.join(':e1_' + c for c in _ENTRY_COLUMNS)}))",
    ]
    parts += [f"outbox{i} AS ({_values(Outbox, f'o{i}_', _OUTBOX_COLUMNS)})" for i in range(outbox_rows)]
    if with_record:
        parts.append(f"record AS ({_values(I, 'r_', _RECORD_COLUMNS)})")
    return text("WITH " + ",\n".join(parts) + "\nSELECT id, balance FROM moved")  # nosec B608 (names only)


_ENTRY_COLUMNS = [c.name for c in L.c if c.name != "id"]
_OUTBOX_COLUMNS = list(Outbox.c.keys())
_RECORD_COLUMNS = [c.name for c in I.c if c.name != "id"]


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
) -> dict[str, Any]:
    """The row that keeps a request's outcome under its key (see write_booking)."""
    return {
        "user_id": user_id,
        "endpoint": endpoint,
        "key": key,
        "fingerprint": fingerprint,
        "status_code": status_code,
        "response_body": response_body,
        "transaction_id": transaction_id,
        "created_at": now,
    }


def add_idempotency_record(session: Session, record: dict[str, Any]) -> None:
    session.connection().execute(_ADD_IDEMPOTENCY_RECORD, record)


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


@dataclass(frozen=True)
class Locked:
    wallets: dict[int, LockedWallet]
    transaction_id: int  # the id this movement's transaction row will have

    @property
    def balances(self) -> dict[int, int]:
        return {w.id: w.balance for w in self.wallets.values()}


def lock_for_movement(session: Session, *, user_id: int, other_id: int) -> Locked:
    """Lock the caller's open wallet and the other wallet, in id order, and draw the
    movement's transaction id, in one round trip."""
    conn = session.connection()
    rows = conn.execute(_LOCK_FOR_MOVEMENT[conn.dialect.name], {"user_id": user_id, "other_id": other_id}).all()
    return Locked(
        wallets={row.id: LockedWallet(*row[:-1]) for row in rows},
        transaction_id=int(rows[0].next_transaction_id) if rows else 0,
    )
