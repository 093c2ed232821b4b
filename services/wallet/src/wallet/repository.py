"""Every query of the wallet service, in SQLAlchemy Core, run on the event loop
(svckit.aiodb: asyncpg on Postgres, sqlite3 in process on SQLite). Every statement is built once, at
import, with a bind for each value, so it is compiled once (a list is one array bind on
Postgres).

A movement locks both wallets (SELECT ... FOR UPDATE) and then draws its transaction id and
time (`lock_for_movement`; a batch of movements, every wallet of the batch and an id each:
`lock_for_movements`), and once the rules are checked writes everything as one `Booking`
(`write_booking`; a batch's, `write_bookings`): on Postgres a single statement of named
data-modifying CTEs (balances, transaction, ledger entries, outbox rows and the idempotency
record), so the row locks are held for one round trip and the commit. Every bind is typed like its column, so
the driver never guesses (psycopg renders each as a cast).
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
    Integer,
    Select,
    Table,
    Text,
    any_,
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
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import aliased

from svckit.aiodb import Connection
from svckit.db import UTCDateTime, utcnow
from svckit.messages import Recipient
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


def _bind(table: Table, column: str, name: str | None = None) -> BindParameter[Any]:
    """A bind parameter typed like the column it fills."""
    return bindparam(name or column, type_=table.c[column].type)


def _row_binds(table: Table, prefix: str, columns: Sequence[str]) -> dict[str, BindParameter[Any]]:
    return {c: _bind(table, c, prefix + c) for c in columns}


def _prefixed(prefix: str, row: dict[str, Any]) -> dict[str, Any]:
    return {prefix + key: value for key, value in row.items()}


def _among(column: Any, name: str, dialect: str) -> Any:
    """`column` is one of the list bound as `name`: one array bind on Postgres (a static
    statement), an expanding IN on SQLite."""
    if dialect == "postgresql":
        return column == any_(bindparam(name, type_=ARRAY(column.type)))
    return column.in_(bindparam(name, expanding=True))


# --- wallets ------------------------------------------------------------------------------

# The receipts' recipient (svckit.messages.Recipient), column by column.
_OWNER = ("owner_email", "owner_first_name", "owner_last_name")
_WALLET_COLUMNS = (
    W.c.id,
    W.c.user_id,
    W.c.currency,
    W.c.balance,
    W.c.owner_name,
    W.c.created_at,
    W.c.updated_at,
)


_OPEN_WALLET = select(*_WALLET_COLUMNS).where(W.c.user_id == _bind(W, "user_id"), W.c.status == OPEN)
_OPEN_WALLET_LOCKED = _OPEN_WALLET.with_for_update()
_ADD_WALLET = insert(W).values(
    _row_binds(W, "w_", ["user_id", "currency", "owner_name", *_OWNER, "created_at", "updated_at"])
)
_ADD_WALLET = _ADD_WALLET.values(kind=USER, status=OPEN, balance=0).returning(*_WALLET_COLUMNS)
_CLOSE_WALLET = (
    update(W)
    .where(W.c.id == _bind(W, "id", "wallet_id"))
    .values(status=CLOSED, closed_at=_bind(W, "closed_at", "now"), updated_at=_bind(W, "updated_at", "now"))
)
_SYSTEM_WALLETS = select(W.c.currency, W.c.shard, W.c.id).where(W.c.kind == SYSTEM)
_ADD_SYSTEM_WALLET = insert(W).values(
    user_id=None,
    kind=SYSTEM,
    status=OPEN,
    currency=_bind(W, "currency", "w_currency"),
    balance=0,
    owner_name="External",
    shard=_bind(W, "shard", "w_shard"),
    created_at=_bind(W, "created_at", "now"),
    updated_at=_bind(W, "updated_at", "now"),
)


async def open_wallet_of(conn: Connection, user_id: int, *, lock: bool = False) -> Any:
    return (await conn.execute(_OPEN_WALLET_LOCKED if lock else _OPEN_WALLET, {"user_id": user_id})).first()


async def add_wallet(
    conn: Connection, *, user_id: int, currency: str, owner_name: str, recipient: Recipient | None = None
) -> Any:
    now = utcnow()
    params = {"user_id": user_id, "currency": currency, "owner_name": owner_name, "created_at": now, "updated_at": now}
    params |= {
        "owner_email": recipient.email if recipient else None,
        "owner_first_name": recipient.first_name if recipient else None,
        "owner_last_name": recipient.last_name if recipient else None,
    }
    return (await conn.execute(_ADD_WALLET, _prefixed("w_", params))).one()


async def close_wallet(conn: Connection, wallet_id: int) -> None:
    await conn.execute(_CLOSE_WALLET, {"wallet_id": wallet_id, "now": utcnow()})


async def system_wallet_ids(conn: Connection) -> dict[tuple[str, int], int]:
    """The system wallets' ids, by (currency, shard)."""
    rows = (await conn.execute(_SYSTEM_WALLETS)).all()
    return {(currency, shard): wallet_id for currency, shard, wallet_id in rows}


async def add_system_wallet(conn: Connection, currency: str, shard: int) -> None:
    await conn.execute(_ADD_SYSTEM_WALLET, {"w_currency": currency, "w_shard": shard, "now": utcnow()})


# --- money movement -----------------------------------------------------------------------

# In LockedWallet's field order (rows are unpacked by position), with each wallet's chain
# head: the booking extends the chains under these locks (wallet.chain).
_LOCKED_COLUMNS = (
    *(W.c.id, W.c.user_id, W.c.kind, W.c.status, W.c.currency, W.c.balance, W.c.owner_name, W.c.held),
    W.c.chain_head,
    *(W.c[c] for c in _OWNER),
    W.c.updated_at,
)


def _lock_then_draw_postgres() -> Select[Any]:
    """Lock the wallets of one or more movements (each caller's open wallet and the other
    wallet), then (once every lock is granted) draw a transaction id for each movement and
    the time, in one statement.

    The order matters: history is ordered by transaction id, so of two movements on a
    wallet the one that locks it later must draw the larger id and the later time. An id
    drawn in the locking SELECT's own target list is drawn when its first row is projected,
    before the rows are locked, so a movement that waits for a lock keeps the smaller id
    while a movement on another pair of wallets books over it. Here the locking SELECT is a
    materialized CTE, and the ids and the time are drawn in a second one over the count of
    its rows (the ids' subquery refers to that count, so it runs for its row): an aggregate
    has read, and so locked, every row before it yields, and a CTE runs once, so the ids
    are drawn once, whatever plan joins the two.
    """
    users = bindparam("user_ids", type_=ARRAY(BigInteger()))
    others = bindparam("other_ids", type_=ARRAY(BigInteger()))
    where = or_((W.c.user_id == any_(users)) & (W.c.status == OPEN), W.c.id == any_(others))
    # In id order, as every movement locks, so two movements never deadlock.
    locking = select(*_LOCKED_COLUMNS).where(where).order_by(W.c.id).with_for_update()
    locked = locking.cte("locked").prefix_with("MATERIALIZED")
    held = select(func.count().label("n")).select_from(locked).subquery("held")
    series = func.generate_series(1, bindparam("movements", type_=Integer())).table_valued("g")
    nextval = func.nextval(literal_column("pg_get_serial_sequence('transactions', 'id')"))
    ids = select(func.array_agg(nextval)).select_from(series).where(held.c.n >= 0).scalar_subquery()
    drawn = (
        select(
            ids.label("transaction_ids"),
            func.clock_timestamp(type_=UTCDateTime()).label("now"),  # the database's clock, not each replica's
        )
        .select_from(held)
        .cte("drawn")
        .prefix_with("MATERIALIZED")
    )
    return select(locked, drawn).select_from(locked.join(drawn, true()))


def _lock_sqlite() -> Select[Any]:
    # Every writer holds the database write lock for its whole transaction (BEGIN
    # IMMEDIATE), so max + 1 (and the ids after it) are ours, and the time is read after.
    next_id = select(func.coalesce(func.max(T.c.id), 0) + 1).scalar_subquery()
    columns = (*_LOCKED_COLUMNS, next_id.label("next_transaction_id"))
    where = or_((W.c.user_id == _bind(W, "user_id")) & (W.c.status == OPEN), W.c.id == _bind(W, "id", "other_id"))
    return select(*columns).where(where).order_by(W.c.id)


# The Postgres ids are sequence values, never handed out twice (one a refused movement
# draws is skipped).
_LOCK_POSTGRES = _lock_then_draw_postgres()
_LOCK_SQLITE = _lock_sqlite()


async def lock_for_movements(
    conn: Connection, pairs: Sequence[tuple[int, int]]
) -> tuple[dict[int, LockedWallet], list[int], datetime]:
    """Lock the wallets of these movements, each a (caller's user id, other wallet id), then
    draw a transaction id for each, in order, and the time: on Postgres in one round trip
    (see _lock_then_draw_postgres). The wallets by id, the ids, the time."""
    if conn.dialect_name == "postgresql":
        params = {"user_ids": [u for u, _ in pairs], "other_ids": [o for _, o in pairs], "movements": len(pairs)}
        rows = (await conn.execute(_LOCK_POSTGRES, params)).all()
        wallets = {row.id: LockedWallet(*row[: len(_LOCKED_COLUMNS)]) for row in rows}
        if not rows:
            return wallets, [0] * len(pairs), utcnow()
        return wallets, sorted(rows[0].transaction_ids), rows[0].now
    # SQLite, in process: a statement per movement costs microseconds, and locks nothing
    # (the write lock is the database's).
    wallets, first = {}, 0
    for user_id, other_id in pairs:
        for row in (await conn.execute(_LOCK_SQLITE, {"user_id": user_id, "other_id": other_id})).all():
            wallets[row.id] = LockedWallet(*row[: len(_LOCKED_COLUMNS)])
            first = int(row.next_transaction_id)
    return wallets, [first + i for i in range(len(pairs))] if first else [0] * len(pairs), utcnow()


async def lock_for_movement(conn: Connection, *, user_id: int, other_id: int) -> Locked:
    """Lock the caller's open wallet and the other wallet, then draw the movement's
    transaction id and time, in one round trip (see _lock_then_draw_postgres)."""
    wallets, ids, now = await lock_for_movements(conn, [(user_id, other_id)])
    return Locked.of(wallets, user_id=user_id, other_id=other_id, transaction_id=ids[0], now=now)


def _insert_rows(table: Table, prefixes: Sequence[str], columns: Sequence[str]) -> Insert:
    rows = [select(*(_bind(table, c, prefix + c).label(c) for c in columns)) for prefix in prefixes]
    return insert(table).from_select(list(columns), rows[0] if len(rows) == 1 else union_all(*rows))


_ENTRY_COLUMNS = [c.name for c in L.c if c.name != "id"]
_RECORD_COLUMNS = [c.name for c in I.c if c.name != "id"]


@functools.cache
def _booking_statements(dialect: str, outbox_rows: int, with_record: bool) -> list[Executable]:
    """The booking's statements, built once per shape. The first moves the balances and the
    chain heads and returns the new balances; the others insert the transaction, its two entries, its outbox
    rows and the record. On Postgres they are one statement of named data-modifying CTEs:
    one round trip while the rows are locked (foreign keys are checked at its end, when the
    transaction row exists). On SQLite, in process, they run one by one."""
    a, b = _bind(W, "id", "a"), _bind(W, "id", "b")
    delta = case(
        (W.c.id == a, bindparam("delta_a", type_=BigInteger())), else_=bindparam("delta_b", type_=BigInteger())
    )
    head = case((W.c.id == a, _bind(W, "chain_head", "head_a")), else_=_bind(W, "chain_head", "head_b"))
    moved = (
        update(W)
        .where(W.c.id.in_([a, b]))
        .values(balance=W.c.balance + delta, chain_head=head, updated_at=_bind(W, "updated_at", "now"))
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


def _booking_params(booking: Booking, record: dict[str, Any] | None) -> dict[str, Any]:
    source, destination = booking.source, booking.destination
    params: dict[str, Any] = {
        "a": source.wallet_id,
        "b": destination.wallet_id,
        "delta_a": signed(source),
        "delta_b": signed(destination),
        "head_a": booking.links[source.wallet_id][1],
        "head_b": booking.links[destination.wallet_id][1],
        "now": booking.now,
        **_prefixed("t_", booking.transaction_row()),
        **_prefixed("r_", record or {}),
    }
    for i, row in enumerate(booking.entry_rows()):
        params.update(_prefixed(f"e{i}_", row))
    for i, row in enumerate(booking.outbox):
        params.update(_prefixed(f"o{i}_", row))
    return params


async def write_booking(conn: Connection, booking: Booking, record: dict[str, Any] | None = None) -> None:
    """Write the movement (and the idempotency record that answers for it) in the caller's
    transaction: balances, the transaction row, its ledger entries, its outbox rows."""
    params = _booking_params(booking, record)
    first, *rest = _booking_statements(conn.dialect_name, len(booking.outbox), record is not None)
    balances = {wallet_id: balance for wallet_id, balance in (await conn.execute(first, params)).all()}
    for statement in rest:
        await conn.execute(statement, params)
    if balances != booking.snapshots:  # the locks make this impossible; refuse to commit if not
        raise RuntimeError(f"balances {balances} differ from the booked snapshots {booking.snapshots}")


_BALANCES = {d: select(W.c.id, W.c.balance).where(_among(W.c.id, "wallet_ids", d)) for d in ("postgresql", "sqlite")}


async def write_bookings(
    conn: Connection, bookings: Sequence[tuple[Booking, dict[str, Any]]], refusals: Sequence[dict[str, Any]]
) -> None:
    """Write several movements in the caller's transaction, in order, each with the
    idempotency record that answers for it, and the records of the refused ones: on Postgres
    one round trip per run of bookings of one shape (asyncpg sends a statement's executions
    together), one for the refusals, and one to read back the balances, which must be each
    wallet's last snapshot (the locks make anything else impossible; refuse to commit if not)."""
    if len(bookings) == 1:  # alone: its statement returns the balances it leaves
        await write_booking(conn, *bookings[0])
        bookings = []
    expected: dict[int, int] = {}
    run: list[dict[str, Any]] = []
    receipts: int | None = None  # the run's shape: its bookings' outbox rows
    for booking, record in bookings:
        if receipts is not None and receipts != len(booking.outbox):
            await _write_run(conn, receipts, run)
            run = []
        receipts = len(booking.outbox)
        run.append(_booking_params(booking, record))
        expected.update(booking.snapshots)
    if receipts is not None:
        await _write_run(conn, receipts, run)
    if refusals:
        await conn.execute_many(_ADD_RECORD, [_prefixed("r_", record) for record in refusals])
    if expected:
        params = {"wallet_ids": list(expected)}
        balances = dict((await conn.execute(_BALANCES[conn.dialect_name], params)).all())
        if balances != expected:
            raise RuntimeError(f"balances {balances} differ from the booked snapshots {expected}")


async def _write_run(conn: Connection, receipts: int, params: list[dict[str, Any]]) -> None:
    # A wallet's chain head is the last booking's: the runs go in order, as do their rows.
    for statement in _booking_statements(conn.dialect_name, receipts, True):
        await conn.execute_many(statement, params)


# --- idempotency records ------------------------------------------------------------------

_RECORD_LOOKUP = select(I.c.status_code, I.c.response_body, I.c.fingerprint, I.c.request_token).where(
    I.c.user_id == _bind(I, "user_id"), I.c.endpoint == _bind(I, "endpoint"), I.c.key == _bind(I, "key")
)


def _recorded_postgres() -> Select[Any]:
    # Through migration 0012's function, whose plan is a unique-index look-up per key
    # whatever the table's size: as a plain statement, the generic plan Postgres caches
    # per connection was planned for the table as it was then, and once planned on a small
    # table it read the whole table on every batch as it grew.
    asked = func.idempotency_keys_recorded(
        bindparam("user_ids", type_=ARRAY(BigInteger())),
        bindparam("endpoints", type_=ARRAY(Text())),
        bindparam("keys", type_=ARRAY(Text())),
    ).table_valued("user_id", "endpoint", "key")
    return select(asked.c.user_id, asked.c.endpoint, asked.c.key)


_RECORDED = _recorded_postgres()


async def recorded_keys(conn: Connection, keys: Sequence[tuple[int, str, str]]) -> set[tuple[int, str, str]]:
    """Which of these (user id, endpoint, key) have a record: on Postgres one statement (an
    index lookup each), on SQLite one per key, in process."""
    if conn.dialect_name == "postgresql":
        params = {"user_ids": [k[0] for k in keys], "endpoints": [k[1] for k in keys], "keys": [k[2] for k in keys]}
        return {(u, e, k) for u, e, k in (await conn.execute(_RECORDED, params)).all()}
    found = set()
    for user_id, endpoint, key in keys:
        if await get_idempotency_record(conn, user_id=user_id, endpoint=endpoint, key=key) is not None:
            found.add((user_id, endpoint, key))
    return found


async def get_idempotency_record(conn: Connection, *, user_id: int, endpoint: str, key: str) -> Any:
    """(status_code, response_body, fingerprint, request_token) under the key, if any."""
    return (await conn.execute(_RECORD_LOOKUP, {"user_id": user_id, "endpoint": endpoint, "key": key})).first()


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


_ADD_RECORD = insert(I).values(_row_binds(I, "r_", _RECORD_COLUMNS))


async def add_idempotency_record(conn: Connection, record: dict[str, Any]) -> None:
    await conn.execute(_ADD_RECORD, _prefixed("r_", record))


# --- reads --------------------------------------------------------------------------------


_USER_WALLETS = select(W.c.id).where(W.c.user_id == _bind(W, "user_id"), W.c.kind == USER)


async def user_wallet_ids(conn: Connection, user_id: int) -> list[int]:
    return list((await conn.execute(_USER_WALLETS, {"user_id": user_id})).scalars())


@functools.cache
def _history(dialect: str, *, one: bool, after: bool, kind: bool, since: bool, until: bool) -> Select[Any]:
    """History's page, one statement per shape (each compiled once): of `one` wallet (a
    bound id) or of a list of them, with whichever filters are given.

    Without a time filter it walks the (wallet_id, transaction_id) index backwards; with
    `from` or `to`, the (wallet_id, created_at) index (migration 0008), ties in id order.
    Both orders are the same: a wallet's movements draw their id and time under its row
    lock, so later ids have later times. `after` is a keyset bound, an index range (not an
    offset); on the time index the range also starts at that transaction's time, so the
    entries skipped are never read. The bound is repeated on the transactions side so that
    a merge join starts there too.
    """
    source, destination = aliased(W, name="source"), aliased(W, name="destination")
    timed = since or until
    wallets = L.c.wallet_id == _bind(L, "wallet_id") if one else _among(L.c.wallet_id, "wallet_ids", dialect)
    query = (
        select(
            T.c.id,
            T.c.amount,
            T.c.currency,
            T.c.type,
            T.c.created_at,
            source.c.owner_name,
            source.c.kind,
            destination.c.owner_name,
            destination.c.kind,
        )
        .select_from(L)
        .join(T, T.c.id == L.c.transaction_id)
        .join(source, source.c.id == T.c.from_wallet_id)
        .join(destination, destination.c.id == T.c.to_wallet_id)
        .where(wallets)
    )
    if after:
        query = query.where(L.c.transaction_id < _bind(L, "transaction_id", "after"), T.c.id < _bind(T, "id", "after"))
        if timed:
            after_time = select(T.c.created_at).where(T.c.id == _bind(T, "id", "after")).scalar_subquery()
            # An `after` naming no transaction bounds nothing by time (NULL would match none).
            query = query.where(L.c.created_at <= func.coalesce(after_time, L.c.created_at))
    if kind:
        query = query.where(T.c.type == _bind(T, "type", "kind"))
    if since:
        query = query.where(L.c.created_at >= _bind(L, "created_at", "since"))
    if until:
        query = query.where(L.c.created_at <= _bind(L, "created_at", "until"))
    order = (L.c.created_at.desc(), L.c.transaction_id.desc()) if timed else (L.c.transaction_id.desc(),)
    return (
        query.order_by(*order)
        .limit(bindparam("limit", type_=Integer()))
        .offset(bindparam("offset", type_=BigInteger()))
    )


async def history(
    conn: Connection,
    *,
    wallet_ids: Sequence[int],
    limit: int,
    offset: int = 0,
    after: int | None = None,
    kind: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[Any]:
    """The transactions touching these wallets, newest first, with both sides' names.

    Driven by an index of ledger_entries read backwards (see _history): one entry per
    transaction and user, a user's wallets never trade with each other. Without an offset
    the page is read one wallet at a time, newest wallet first, each an ordered index range
    of that wallet (a user has one open wallet at a time, and a new one's movements all
    follow the old one's, so the concatenation is in order), so a page costs `limit` index
    entries however long the ledger and wherever `after` is. (One ordered scan over a list
    of wallets is not something Postgres's btree gives before version 17: it would sort
    the user's matching entries.) With an offset, the same for a user of one wallet (the
    offset's entries are read too), and for one of several wallets a statement over the
    list (`offset` and `after` never come together). A `kind` filter is checked on the way, so a rare
    kind costs the entries passed over.
    """
    if not wallet_ids:
        return []
    shape = {
        "after": after is not None,
        "kind": kind is not None,
        "since": since is not None,
        "until": until is not None,
    }
    params = {k: v for k, v in {"after": after, "kind": kind, "since": since, "until": until}.items() if v is not None}
    if offset and len(wallet_ids) > 1:
        query = _history(conn.dialect_name, one=False, **shape)
        rows = await conn.execute(query, {**params, "wallet_ids": list(wallet_ids), "limit": limit, "offset": offset})
        return list(rows.all())
    page: list[Any] = []
    for wallet_id in sorted(wallet_ids, reverse=True):  # newest wallet first
        query = _history(conn.dialect_name, one=True, **shape)
        wanted = {"wallet_id": wallet_id, "limit": limit - len(page), "offset": offset}  # one wallet if offset
        page += (await conn.execute(query, {**params, **wanted})).all()
        if len(page) == limit:
            break
    return page


# A statement reads one wallet's entries in a time range from the (wallet_id, created_at)
# index (migration 0008; ties, if any, in id order): the opening balance is the last entry before the range, the lines
# are the range oldest first, at most `limit` of them (the caller asks for one more than it
# answers, to know the range holds more).
_OPENING = (
    select(L.c.balance_snapshot)
    .where(L.c.wallet_id == _bind(L, "wallet_id"), L.c.created_at < _bind(L, "created_at", "since"))
    .order_by(L.c.created_at.desc(), L.c.transaction_id.desc())
    .limit(1)
)


def _statement_lines() -> Select[Any]:
    other = aliased(W, name="other")
    other_id = case((T.c.from_wallet_id == L.c.wallet_id, T.c.to_wallet_id), else_=T.c.from_wallet_id)
    return (
        select(
            L.c.transaction_id,
            L.c.created_at,
            T.c.type,
            L.c.entry_type,
            L.c.amount,
            L.c.balance_snapshot,
            other.c.owner_name,
            other.c.kind,
        )
        .select_from(L)
        .join(T, T.c.id == L.c.transaction_id)
        .join(other, other.c.id == other_id)
        .where(
            L.c.wallet_id == _bind(L, "wallet_id"),
            L.c.created_at >= _bind(L, "created_at", "since"),
            L.c.created_at <= _bind(L, "created_at", "until"),
        )
        .order_by(L.c.created_at, L.c.transaction_id)
        .limit(bindparam("limit", type_=Integer()))
    )


_STATEMENT_LINES = _statement_lines()


async def opening_balance(conn: Connection, *, wallet_id: int, since: datetime) -> int:
    """The wallet's balance just before `since`: its last entry's snapshot (0 if none)."""
    found = (await conn.execute(_OPENING, {"wallet_id": wallet_id, "since": since})).first()
    return int(found[0]) if found is not None else 0


async def statement_lines(
    conn: Connection, *, wallet_id: int, since: datetime, until: datetime, limit: int
) -> list[Any]:
    """The wallet's entries from `since` to `until` (both included), oldest first, at most
    `limit`, each with its transaction's type and the other side's name and kind."""
    params = {"wallet_id": wallet_id, "since": since, "until": until, "limit": limit}
    return list((await conn.execute(_STATEMENT_LINES, params)).all())


def _ledger(dialect: str) -> tuple[Select[Any], Select[Any], Select[Any]]:
    txn = _bind(T, "id", "transaction_id")
    part_of = (
        select(func.count())
        .select_from(T)
        .where(
            T.c.id == txn,
            or_(_among(T.c.from_wallet_id, "visible_to", dialect), _among(T.c.to_wallet_id, "visible_to", dialect)),
        )
    )
    entries = select(L).where(L.c.transaction_id == _bind(L, "transaction_id")).order_by(L.c.id)
    own = entries.where(_among(L.c.wallet_id, "visible_to", dialect))
    return part_of, entries, own


_LEDGER = {dialect: _ledger(dialect) for dialect in ("postgresql", "sqlite")}


async def ledger_entries(
    conn: Connection, *, transaction_id: int, visible_to: Sequence[int], own_only: bool = False
) -> list[Any]:
    """The transaction's entries, if one of `visible_to`'s wallets is part of it: all of
    them, or with `own_only` only those of `visible_to`'s wallets."""
    if not visible_to:
        return []
    part_of, entries, own = _LEDGER[conn.dialect_name]
    params = {"transaction_id": transaction_id, "visible_to": list(visible_to)}
    if not (await conn.execute(part_of, params)).scalar_one():
        return []
    return list((await conn.execute(own if own_only else entries, params)).all())
