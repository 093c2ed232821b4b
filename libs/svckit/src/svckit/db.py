"""Engine factory: the same code runs on a SQLite file (local) and on Postgres (production)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import DateTime, Engine, TypeDecorator, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

if TYPE_CHECKING:
    from svckit.settings import BaseServiceSettings

# TCP keepalives, both ways: the client finds a dead server (a pooled connection would
# otherwise wait on it forever) and the server a vanished client (whose transaction would
# otherwise keep its row locks), each within idle + interval * count, about a minute.
_KEEPALIVE_IDLE_S, _KEEPALIVE_INTERVAL_S, _KEEPALIVE_COUNT = 30, 10, 3


@dataclass(frozen=True)
class SessionLimits:
    """How long a Postgres session may wait or hold on: 0 turns a limit off, None leaves it
    to the server (or the role's own setting). The services' values: BaseServiceSettings."""

    lock_timeout_ms: int | None = None
    statement_timeout_ms: int | None = None
    idle_in_transaction_timeout_ms: int | None = None
    connect_timeout_s: int = 10

    @classmethod
    def from_settings(cls, settings: BaseServiceSettings, **overrides: int | None) -> SessionLimits:
        limits = cls(
            lock_timeout_ms=settings.db_lock_timeout_ms,
            statement_timeout_ms=settings.db_statement_timeout_ms,
            idle_in_transaction_timeout_ms=settings.db_idle_in_transaction_timeout_ms,
            connect_timeout_s=settings.db_connect_timeout_s,
        )
        return replace(limits, **overrides)

    def connect_args(self, url: URL) -> dict[str, Any]:
        """libpq parameters: keepalives, a connect timeout, and the limits as session settings
        (`options`, after any the URL has, so these win). Other parameters the URL sets
        itself (`?connect_timeout=...`) win over these defaults."""
        settings = {
            "lock_timeout": self.lock_timeout_ms,
            "statement_timeout": self.statement_timeout_ms,
            "idle_in_transaction_session_timeout": self.idle_in_transaction_timeout_ms,
            "tcp_keepalives_idle": _KEEPALIVE_IDLE_S,
            "tcp_keepalives_interval": _KEEPALIVE_INTERVAL_S,
            "tcp_keepalives_count": _KEEPALIVE_COUNT,
        }
        given = url.query.get("options", "")
        ours = [f"-c {name}={value}" for name, value in settings.items() if value is not None]
        options = [*([given] if isinstance(given, str) else given), *ours]
        libpq = {
            "keepalives": 1,
            "keepalives_idle": _KEEPALIVE_IDLE_S,
            "keepalives_interval": _KEEPALIVE_INTERVAL_S,
            "keepalives_count": _KEEPALIVE_COUNT,
            "connect_timeout": self.connect_timeout_s,
        }
        return {**{k: v for k, v in libpq.items() if k not in url.query}, "options": " ".join(filter(None, options))}


def make_engine(
    url: str, *, pool_size: int = 10, max_overflow: int = 10, limits: SessionLimits | None = None
) -> Engine:
    """An engine for a SQLite file or Postgres. On Postgres, `limits` bound lock waits,
    statements and idle transactions (none by default: migrations and tools may run long);
    keepalives and a connect timeout are always on. Engines hide bound parameters: a
    database error's message never carries its values (emails, password hashes, amounts),
    so logging or re-raising one leaks none of them."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, hide_parameters=True)
        event.listen(engine, "connect", _sqlite_pragmas)
        # pysqlite's own BEGIN handling defers locks; we issue BEGIN ourselves (see below).
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    connect_args = (limits or SessionLimits()).connect_args(parsed)
    return create_engine(
        url,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_pre_ping=True,
        connect_args=connect_args,
        hide_parameters=True,
    )


def async_url(url: str) -> URL:
    """The same database through an asyncio driver: psycopg's async connection for Postgres
    (one driver, both ways), aiosqlite for a SQLite file."""
    parsed = make_url(url)
    driver = "aiosqlite" if parsed.get_backend_name() == "sqlite" else "psycopg"
    return parsed.set(drivername=f"{parsed.get_backend_name()}+{driver}")


def make_async_engine(
    url: str, *, pool_size: int = 10, max_overflow: int = 10, limits: SessionLimits | None = None
) -> AsyncEngine:
    """make_engine's twin for code on the event loop: the same limits, keepalives, pragmas,
    BEGIN IMMEDIATE on SQLite and hidden parameters; no worker thread between a request and
    Postgres. Events go on its `sync_engine`."""
    parsed = async_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(parsed, connect_args={"timeout": 30}, hide_parameters=True)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        event.listen(engine.sync_engine, "begin", _sqlite_begin)
        return engine
    return create_async_engine(
        parsed,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_pre_ping=False,  # a dead connection fails its statement, and the movement is retried
        connect_args=(limits or SessionLimits()).connect_args(parsed),
        hide_parameters=True,
    )


def _sqlite_pragmas(dbapi_conn: Any, _: Any) -> None:
    dbapi_conn.isolation_level = None  # let SQLAlchemy's "begin" event issue BEGIN
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


READ_ONLY = {"read_only": True}  # execution options for work that never writes


def _sqlite_begin(conn: Any) -> None:
    # IMMEDIATE takes the write lock up front, so two writers never deadlock on upgrade.
    # Read-only work (start-up checks, health) takes no lock, so a busy writer elsewhere
    # cannot starve it.
    conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get("read_only") else "BEGIN IMMEDIATE")


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on both databases (SQLite hands back naive ones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)
