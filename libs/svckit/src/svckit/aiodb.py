"""A database for code on the event loop: asyncpg on Postgres, a SQLite file in process
(sqlite3 under SQLAlchemy's synchronous engine, its lock waits made cooperative), behind
one small interface.

Statements are SQLAlchemy Core, written once. On Postgres each is compiled once (SQLAlchemy's
asyncpg dialect: `$n` placeholders, each bind cast to its column's type) and run by asyncpg,
which prepares it once per connection. Going through SQLAlchemy's asyncio layer instead costs
about three times the CPU per statement (greenlet hops, the execution context), more than the
worker-thread hop it would save. Only static statements are compiled this way: a list
parameter is one array bind (`= ANY(:ids)`), never an expanding IN. On SQLite each static
statement is compiled once too and run on the sqlite3 connection itself; the rest (an
expanding IN, Python-side column defaults) goes through SQLAlchemy's execution.

Errors come back as SQLAlchemy's, so callers handle one family on both databases:
IntegrityError for a violated constraint, OperationalError for a timeout, a deadlock, a
serialization failure or a lost connection (then `connection_invalidated`), each with the
driver's exception as `.orig` and its SQLSTATE as `.orig.sqlstate`.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import asyncpg
from sqlalchemy import Connection as SyncConnection
from sqlalchemy import Engine, Executable, event
from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, StatementError

from svckit.db import READ_ONLY, SessionLimits, make_engine


class Result(Protocol):
    def all(self) -> Sequence[Any]: ...
    def first(self) -> Any: ...
    def one(self) -> Any: ...
    def scalar_one(self) -> Any: ...
    def scalars(self) -> Iterator[Any]: ...


class Connection(Protocol):
    """A connection with its transaction begun: execute, then commit, and close in any case
    (closing rolls back whatever was not committed)."""

    dialect_name: str

    async def execute(self, statement: Executable, params: dict[str, Any] | None = None) -> Result: ...
    async def execute_many(self, statement: Executable, params: Sequence[dict[str, Any]]) -> None: ...
    async def commit(self) -> None: ...
    async def close(self) -> None: ...


class Database(Protocol):
    dialect_name: str

    async def connect(self, *, read_only: bool = False) -> Connection: ...
    async def dispose(self) -> None: ...


@asynccontextmanager
async def transaction(db: Database, *, read_only: bool = False) -> AsyncIterator[Connection]:
    """A transaction that commits if the block ends normally; closed (rolled back) if not."""
    conn = await db.connect(read_only=read_only)
    try:
        yield conn
        await conn.commit()
    finally:
        await conn.close()


class _Rows:
    """A statement's rows, fetched (asyncpg's records, or SqliteRow)."""

    def __init__(self, rows: list[Any]) -> None:
        self._rows = rows

    def all(self) -> list[Any]:
        return self._rows

    def first(self) -> Any:
        return self._rows[0] if self._rows else None

    def one(self) -> Any:
        if len(self._rows) != 1:
            raise LookupError(f"expected one row, got {len(self._rows)}")
        return self._rows[0]

    def scalar_one(self) -> Any:
        return self.one()[0]

    def scalars(self) -> Iterator[Any]:
        return (row[0] for row in self._rows)


_MAX_COMPILED = 1024  # static statements only; past this, something builds them per call

# --- SQLite: in process, on the loop ------------------------------------------------------

# A write transaction waits for SQLite's write lock (held by another process: the relay, a
# second replica) this long at most, polling without blocking the loop.
SQLITE_LOCK_WAIT_S = 30.0


class SqliteRow(tuple):  # type: ignore[type-arg]
    """A result row: a tuple, also by attribute (`row.id`) and as `row._mapping`, like
    SQLAlchemy's. Each statement's rows are of a subclass that names its columns."""

    __slots__ = ()
    _index: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        try:
            return self[self._index[name]]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def _mapping(self) -> dict[str, Any]:
        return {name: self[i] for name, i in self._index.items()}


def _row_class(keys: tuple[str, ...]) -> type[SqliteRow]:
    index: dict[str, int] = {}
    for i, key in enumerate(keys):
        index.setdefault(key, i)
    return type("SqliteRow", (SqliteRow,), {"__slots__": (), "_index": index})


@dataclass(frozen=True)
class _SqliteCompiled:
    sql: str
    names: tuple[str, ...]  # the bind of each ?, in order
    defaults: dict[str, Any]  # values the statement carries itself (literals)
    binds: tuple[Callable[[Any], Any] | None, ...]  # each ?'s type conversion (datetimes to text, ...)
    row_class: type[SqliteRow] | None  # None: named from the cursor (textual SQL)
    results: tuple[Callable[[Any], Any] | None, ...]  # each column's conversion (text to datetimes, ...)


_sqlite_compiled: dict[Executable, _SqliteCompiled | None] = {}


def compile_for_sqlite(statement: Executable, dialect: Any) -> _SqliteCompiled | None:
    """The statement compiled once for the sqlite3 connection itself, with each bind's and
    each column's type conversion, or None for what only SQLAlchemy's execution handles
    (expanding or literal-execute binds, Python-side column defaults). SQLAlchemy's
    execution of a cached statement costs about as much CPU again as SQLite running it
    (an execution context, parameter and result processing, events): a transfer runs six."""
    try:
        return _sqlite_compiled[statement]
    except KeyError:
        pass
    compiled: Any = statement.compile(dialect=dialect)  # type: ignore[attr-defined]
    binds = compiled.binds
    found = None
    if not (
        compiled.insert_prefetch
        or compiled.update_prefetch
        or compiled.post_compile_params
        or compiled.literal_execute_params
        or any(bind.expanding for bind in binds.values())
    ):
        names = tuple(compiled.positiontup or ())
        processors = compiled._bind_processors
        columns = compiled._result_columns
        found = _SqliteCompiled(
            sql=compiled.string,
            names=names,
            defaults={n: binds[n].effective_value for n in names if n in binds and not binds[n].required},
            binds=tuple(processors.get(n) for n in names),
            row_class=_row_class(tuple(c.keyname for c in columns)) if columns else None,
            results=tuple(c.type._cached_result_processor(dialect, None) for c in columns),
        )
    if len(_sqlite_compiled) < _MAX_COMPILED:
        _sqlite_compiled[statement] = found
    return found


def _no_busy_wait(dbapi_conn: Any, _: Any) -> None:
    # After make_engine's pragmas: a locked database answers SQLITE_BUSY at once instead of
    # blocking the event loop in sqlite3's busy handler; _SqliteDatabase waits instead.
    dbapi_conn.execute("PRAGMA busy_timeout=0")


class _SqliteConnection:
    dialect_name = "sqlite"

    def __init__(self, conn: SyncConnection, release: Callable[[], None]) -> None:
        self._conn = conn
        self._release = release

    async def execute(self, statement: Executable, params: dict[str, Any] | None = None) -> Result:
        compiled = compile_for_sqlite(statement, self._conn.dialect)
        if compiled is None:  # expanding IN, Python-side defaults, ...: SQLAlchemy's own path
            return self._conn.execute(statement, params)  # type: ignore[return-value]
        values = {**compiled.defaults, **params} if params else compiled.defaults
        try:
            args = [
                value if process is None else process(value)
                for value, process in zip((values[name] for name in compiled.names), compiled.binds, strict=True)
            ]
        except KeyError as missing:
            raise StatementError(f"no value for bind parameter {missing}", compiled.sql, None, None) from None
        dbapi = self._conn.connection.dbapi_connection
        if dbapi is None:
            raise OperationalError(compiled.sql, None, RuntimeError("connection closed"))  # type: ignore[arg-type]
        try:
            cursor = dbapi.execute(compiled.sql, args)
            raw = cursor.fetchall() if cursor.description else []
        except sqlite3.Error as exc:
            raise DBAPIError.instance(
                compiled.sql, None, exc, sqlite3.Error, hide_parameters=True, dialect=self._conn.dialect
            ) from exc
        if not raw:
            return _Rows([])
        row_class = compiled.row_class or _row_class(tuple(d[0] for d in cursor.description))
        if any(compiled.results):
            processors = compiled.results
            return _Rows([row_class(p(v) if p else v for p, v in zip(processors, r, strict=True)) for r in raw])
        return _Rows([row_class(r) for r in raw])

    async def execute_many(self, statement: Executable, params: Sequence[dict[str, Any]]) -> None:
        """The statement once per set of parameters, in order, its rows dropped (in process:
        nothing to save by sending them together)."""
        for one in params:
            await self.execute(statement, one)

    async def commit(self) -> None:
        self._conn.commit()

    async def close(self) -> None:
        try:
            self._conn.close()
        finally:
            self._release()


class SqliteDatabase:
    """The SQLite file through SQLAlchemy's synchronous engine, run on the event loop.

    SQLite runs in this process, so a statement costs microseconds of CPU and nothing to
    wait on, except the write lock: a write transaction (BEGIN IMMEDIATE) never blocks the
    loop for it. Within the process, writers queue on an asyncio lock; against other
    processes, a refused BEGIN is retried after a short sleep, up to SQLITE_LOCK_WAIT_S.
    Reads (BEGIN) take no lock in WAL mode. Measured against aiosqlite, whose thread hop per
    statement cost about 1.7 times the CPU per transfer (see the README). SQLAlchemy's
    Connection holds the transaction (BEGIN IMMEDIATE, COMMIT, the pool's rollback); the
    statements run on its sqlite3 connection (compile_for_sqlite)."""

    dialect_name = "sqlite"

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        event.listen(engine, "connect", _no_busy_wait)
        self._reads = engine.execution_options(**READ_ONLY)
        self._writer = asyncio.Lock()

    async def connect(self, *, read_only: bool = False) -> Connection:
        if read_only:
            conn = self._reads.connect()
            try:
                conn.begin()
            except BaseException:
                conn.close()
                raise
            return _SqliteConnection(conn, lambda: None)
        await self._writer.acquire()
        try:
            conn = self.engine.connect()
            deadline = time.monotonic() + SQLITE_LOCK_WAIT_S
            delay = 0.001
            while True:
                try:
                    conn.begin()  # BEGIN IMMEDIATE (svckit.db): the write lock, or SQLITE_BUSY at once
                    break
                except OperationalError as exc:
                    if "locked" not in str(exc.orig) or time.monotonic() > deadline:
                        conn.close()
                        raise
                    conn.rollback()
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 0.02)
        except BaseException:
            self._writer.release()
            raise
        return _SqliteConnection(conn, self._writer.release)

    async def dispose(self) -> None:
        self.engine.dispose()


# --- Postgres: asyncpg ----------------------------------------------------------------------

_DIALECT = PGDialect_asyncpg()


@dataclass(frozen=True)
class _Compiled:
    sql: str
    names: tuple[str, ...]  # the bind of each $n, in order
    defaults: dict[str, Any]  # values the statement carries itself (literals)


_compiled: dict[Executable, _Compiled] = {}


def compile_for_asyncpg(statement: Executable) -> _Compiled:
    found = _compiled.get(statement)
    if found is not None:
        return found
    compiled = statement.compile(dialect=_DIALECT)  # type: ignore[attr-defined]
    names = tuple(compiled.positiontup or ())
    binds = compiled.binds
    defaults = {name: binds[name].effective_value for name in names if name in binds and not binds[name].required}
    found = _Compiled(compiled.string, names, defaults)
    if len(_compiled) < _MAX_COMPILED:
        _compiled[statement] = found
    return found


class Row(asyncpg.Record):
    """asyncpg's row, also by attribute (`row.id`) and as `row._mapping`, like SQLAlchemy's."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def _mapping(self) -> dict[str, Any]:
        return dict(self.items())


_LOST = (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, ConnectionError, OSError)


def _translated(exc: BaseException, sql: str) -> DBAPIError:
    if isinstance(exc, asyncpg.IntegrityConstraintViolationError):
        return IntegrityError(sql, None, exc)  # type: ignore[arg-type]
    if isinstance(exc, TimeoutError):  # asyncpg's command_timeout; an OSError, but not a lost connection
        return OperationalError(sql, None, TimedOut("57014", "the client's command timeout"))  # type: ignore[arg-type]
    if isinstance(exc, _LOST):
        return OperationalError(sql, None, exc, connection_invalidated=True)  # type: ignore[arg-type]
    return OperationalError(sql, None, exc)  # type: ignore[arg-type]


class _PgConnection:
    dialect_name = "postgresql"

    def __init__(self, pool: asyncpg.Pool, raw: asyncpg.Connection) -> None:
        self._pool = pool
        self._raw: asyncpg.Connection | None = raw
        self._open = True  # a transaction is open on it

    async def execute(self, statement: Executable, params: dict[str, Any] | None = None) -> Result:
        compiled = compile_for_asyncpg(statement)
        values = {**compiled.defaults, **params} if params else compiled.defaults
        raw = self._raw
        if raw is None:
            raise OperationalError(compiled.sql, None, RuntimeError("connection closed"))  # type: ignore[arg-type]
        try:
            rows = await raw.fetch(compiled.sql, *(values[name] for name in compiled.names))
        except (asyncpg.PostgresError, *_LOST) as exc:
            raise _translated(exc, compiled.sql) from exc
        return _Rows(rows)

    async def execute_many(self, statement: Executable, params: Sequence[dict[str, Any]]) -> None:
        """The statement once per set of parameters, in order, its rows dropped: asyncpg
        sends them all before it reads the answers, one round trip for the lot."""
        compiled = compile_for_asyncpg(statement)
        raw = self._raw
        if raw is None:
            raise OperationalError(compiled.sql, None, RuntimeError("connection closed"))  # type: ignore[arg-type]
        args = [
            [values[name] for name in compiled.names] for values in ({**compiled.defaults, **one} for one in params)
        ]
        try:
            await raw.executemany(compiled.sql, args)
        except (asyncpg.PostgresError, *_LOST) as exc:
            raise _translated(exc, compiled.sql) from exc

    async def commit(self) -> None:
        raw = self._raw
        if raw is None:
            raise OperationalError("COMMIT", None, RuntimeError("connection closed"))  # type: ignore[arg-type]
        try:
            status = await raw.execute("COMMIT")
        except (asyncpg.PostgresError, *_LOST) as exc:
            raise _translated(exc, "COMMIT") from exc
        self._open = False
        if status != "COMMIT":  # Postgres rolls back a transaction that failed, and says so here
            raise OperationalError("COMMIT", None, RuntimeError(f"the transaction was not committed ({status})"))  # type: ignore[arg-type]

    async def close(self) -> None:
        raw, self._raw = self._raw, None
        if raw is None:
            return
        try:
            if self._open and not raw.is_closed():
                await raw.execute("ROLLBACK")
        except asyncpg.InterfaceError:
            return  # lost: asyncpg has handed it back to the pool already
        except BaseException:
            # Broken, or interrupted (cancelled) mid-ROLLBACK: no await may stand between
            # here and the release, so drop the connection (the pool opens a new one).
            with contextlib.suppress(asyncpg.InterfaceError):
                raw.terminate()
            with contextlib.suppress(asyncpg.InterfaceError):
                await self._pool.release(raw)
            raise
        with contextlib.suppress(asyncpg.InterfaceError):
            await self._pool.release(raw)


class TimedOut(Exception):
    """A wait ended on this side: no pooled connection came free (sqlstate 55P03, as for a
    row lock past lock_timeout), or a statement outlived the client's command timeout (57014,
    as for statement_timeout). Neither is a lost connection."""

    def __init__(self, sqlstate: str, what: str) -> None:
        super().__init__(what)
        self.sqlstate = sqlstate


class PgDatabase:
    """Postgres through an asyncpg pool. A request that finds every connection taken waits
    for one at most `acquire_timeout_s` (None: as long as it takes)."""

    dialect_name = "postgresql"

    def __init__(self, pool: asyncpg.Pool, *, acquire_timeout_s: float | None = None) -> None:
        self.pool = pool
        self.acquire_timeout_s = acquire_timeout_s

    async def connect(self, *, read_only: bool = False) -> Connection:
        try:
            raw = await self.pool.acquire(timeout=self.acquire_timeout_s)
        except TimeoutError as exc:
            raise OperationalError("connect", None, TimedOut("55P03", "no pooled connection came free")) from exc  # type: ignore[arg-type]
        except (asyncpg.PostgresError, *_LOST) as exc:
            raise _translated(exc, "connect") from exc
        try:
            await raw.execute("BEGIN READ ONLY" if read_only else "BEGIN")
        except BaseException as exc:
            await _PgConnection(self.pool, raw).close()  # terminated and released, even when cancelled
            if isinstance(exc, (asyncpg.PostgresError, *_LOST)):
                raise _translated(exc, "BEGIN") from exc
            raise
        return _PgConnection(self.pool, raw)

    async def dispose(self) -> None:
        await self.pool.close()


async def _no_reset(_: asyncpg.Connection) -> None:
    return None


def _server_settings(limits: SessionLimits) -> dict[str, str]:
    settings = {
        "lock_timeout": limits.lock_timeout_ms,
        "statement_timeout": limits.statement_timeout_ms,
        "idle_in_transaction_session_timeout": limits.idle_in_transaction_timeout_ms,
        # The server finds a vanished client (whose transaction would keep its row locks).
        "tcp_keepalives_idle": 30,
        "tcp_keepalives_interval": 10,
        "tcp_keepalives_count": 3,
    }
    return {name: str(value) for name, value in settings.items() if value is not None}


_OPTION = re.compile(r"-c\s*([\w.-]+)=(\S+)")


def _asyncpg_dsn(url: URL, limits: SessionLimits) -> tuple[str, dict[str, str], float]:
    """The URL as a libpq-style DSN for asyncpg, which reads sslmode, sslrootcert, sslcert,
    sslkey and the rest itself; the two parameters it does not take are turned into its own:
    `options` (`-c name=value ...`) into server settings, after which the limits win as in
    svckit.db, and `connect_timeout` into its connect timeout."""
    query = dict(url.query)
    options = query.pop("options", "")
    text = " ".join(options if isinstance(options, tuple) else [options])
    if _OPTION.sub("", text).strip():
        raise ValueError(f"database URL options: only -c name=value is understood, not {text!r}")
    settings = {name.replace("-", "_"): value for name, value in _OPTION.findall(text)}
    timeout = query.pop("connect_timeout", None)
    connect_timeout = float(timeout if isinstance(timeout, str) else limits.connect_timeout_s)
    dsn = url.set(drivername="postgresql", query=query).render_as_string(hide_password=False)
    return dsn, {**settings, **_server_settings(limits)}, connect_timeout


async def make_database(
    url: str, *, pool_size: int = 10, max_overflow: int = 10, limits: SessionLimits | None = None
) -> Database:
    """A Database for a SQLite file or Postgres, with the same limits as svckit.db's engines.
    On Postgres, up to pool_size + max_overflow connections, opened as needed; a request
    waits for one at most the lock timeout, as it would for a row lock; a statement
    waits at most statement_timeout plus a margin on the client side too (a dead server
    cannot hold a request forever)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return SqliteDatabase(make_engine(url))
    limits = limits or SessionLimits()
    command_timeout = (limits.statement_timeout_ms / 1000 + 5) if limits.statement_timeout_ms else None
    dsn, server_settings, connect_timeout = _asyncpg_dsn(parsed, limits)
    pool = await asyncpg.create_pool(
        dsn,
        min_size=0,  # connect on demand (the first request, or the service's start-up)
        max_size=pool_size + max_overflow,
        timeout=connect_timeout,
        command_timeout=command_timeout,
        server_settings=server_settings,
        record_class=Row,
        # Every connection comes back with its transaction ended (see _PgConnection.close):
        # no RESET round trip on each release.
        reset=_no_reset,
    )
    acquire_timeout_s = limits.lock_timeout_ms / 1000 if limits.lock_timeout_ms else None
    return PgDatabase(pool, acquire_timeout_s=acquire_timeout_s)
