"""svckit.aiodb on both databases (Postgres in the Postgres pass): the same Core statement
runs on each, rows read by position and name, errors come back as SQLAlchemy's, and an
exhausted Postgres pool is a bounded wait, not a hang."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, bindparam, func, insert, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, OperationalError

from svckit.aiodb import Database, _asyncpg_dsn, _translated, make_database, transaction
from svckit.db import SessionLimits, UTCDateTime
from svckit.testing import fresh_database

META = MetaData()
ITEMS = Table("aiodb_items", META, Column("id", Integer, primary_key=True), Column("name", String(20), unique=True))
ADD = insert(ITEMS).values(id=bindparam("item_id", type_=Integer()), name=bindparam("item_name", type_=String()))
BY_ID = select(ITEMS.c.id, ITEMS.c.name).where(ITEMS.c.id == bindparam("item_id", type_=Integer()))


@pytest.fixture
def url(tmp_path: Path) -> Iterator[str]:
    with fresh_database("aiodb", tmp_path) as database_url:
        yield database_url


async def _db(url: str, **kwargs: object) -> Database:
    db = await make_database(url, **kwargs)  # type: ignore[arg-type]
    async with transaction(db) as conn:
        await conn.execute(text("CREATE TABLE aiodb_items (id INTEGER PRIMARY KEY, name VARCHAR(20) UNIQUE)"))
    return db


def test_rows_by_position_and_name_and_commit_or_rollback(url: str) -> None:
    async def scenario() -> None:
        db = await _db(url)
        async with transaction(db) as conn:
            await conn.execute(ADD, {"item_id": 1, "item_name": "one"})

        async def fails() -> None:
            async with transaction(db) as conn:
                await conn.execute(ADD, {"item_id": 2, "item_name": "two"})
                raise RuntimeError("the block failed: nothing it did stays")

        with pytest.raises(RuntimeError):
            await fails()
        async with transaction(db, read_only=True) as conn:
            row = (await conn.execute(BY_ID, {"item_id": 1})).one()
            assert (row.id, row.name, row[1], tuple(row), row._mapping) == (
                1,
                "one",
                "one",
                (1, "one"),
                {"id": 1, "name": "one"},
            )
            assert (await conn.execute(BY_ID, {"item_id": 2})).first() is None
        await db.dispose()

    asyncio.run(scenario())


def test_a_constraint_is_an_integrity_error_and_the_connection_stays_usable(url: str) -> None:
    async def scenario() -> None:
        db = await _db(url)
        async with transaction(db) as conn:
            await conn.execute(ADD, {"item_id": 1, "item_name": "one"})
        with pytest.raises(IntegrityError):
            async with transaction(db) as conn:
                await conn.execute(ADD, {"item_id": 2, "item_name": "one"})
        async with transaction(db, read_only=True) as conn:
            assert (await conn.execute(select(ITEMS.c.id))).scalar_one() == 1
        await db.dispose()

    asyncio.run(scenario())


def test_an_exhausted_pool_waits_at_most_the_lock_timeout(url: str) -> None:
    if not url.startswith("postgresql"):
        pytest.skip("needs Postgres (TEST_DATABASE_URL): SQLite has no connection pool limit here")

    async def scenario() -> None:
        db = await _db(url, pool_size=1, max_overflow=0, limits=SessionLimits(lock_timeout_ms=200))
        held = await db.connect()
        try:
            with pytest.raises(OperationalError) as caught:
                await db.connect()
            assert caught.value.orig.sqlstate == "55P03"  # type: ignore[union-attr]  # the lock-timeout code
        finally:
            await held.close()
        async with transaction(db, read_only=True) as conn:  # free again
            assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
        await db.dispose()

    asyncio.run(scenario())


def test_a_lost_connection_is_invalidated_and_the_pool_recovers(url: str) -> None:
    if not url.startswith("postgresql"):
        pytest.skip("needs Postgres (TEST_DATABASE_URL): a server that can drop our connection")

    async def scenario() -> None:
        db = await _db(url, pool_size=1, max_overflow=0)
        conn = await db.connect()
        with pytest.raises(OperationalError) as caught:
            await conn.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
        assert caught.value.connection_invalidated
        await conn.close()
        async with transaction(db, read_only=True) as again:  # a fresh connection
            assert (await again.execute(text("SELECT 1"))).scalar_one() == 1
        await db.dispose()

    asyncio.run(scenario())


def test_the_url_keeps_its_tls_and_session_parameters_for_asyncpg() -> None:
    url = make_url(
        "postgresql+psycopg://u:p@db:5432/wallet?sslmode=verify-full&sslrootcert=/ca.pem"
        "&options=-c%20search_path%3Dledger&connect_timeout=3"
    )
    dsn, settings, connect_timeout = _asyncpg_dsn(url, SessionLimits(lock_timeout_ms=2000))
    assert make_url(dsn).query == {"sslmode": "verify-full", "sslrootcert": "/ca.pem"}
    assert make_url(dsn).drivername == "postgresql"
    assert (settings["search_path"], settings["lock_timeout"], connect_timeout) == ("ledger", "2000", 3.0)
    with pytest.raises(ValueError, match="only -c name=value"):
        _asyncpg_dsn(make_url("postgresql://db/wallet?options=--single"), SessionLimits())


def test_a_client_timeout_is_a_timeout_not_a_lost_connection() -> None:
    error = _translated(TimeoutError(), "SELECT 1")
    assert (error.connection_invalidated, error.orig.sqlstate) == (False, "57014")  # type: ignore[union-attr]


def test_a_commit_of_a_failed_transaction_is_refused(url: str) -> None:
    if not url.startswith("postgresql"):
        pytest.skip("needs Postgres (TEST_DATABASE_URL): SQLAlchemy refuses this itself on SQLite")

    async def scenario() -> None:
        db = await _db(url)
        conn = await db.connect()
        try:
            with pytest.raises(OperationalError):
                await conn.execute(text("SELECT 1 / 0"))
            with pytest.raises(OperationalError, match="not committed"):
                await conn.commit()
        finally:
            await conn.close()
        await db.dispose()

    asyncio.run(scenario())


EVENTS = Table(
    "aiodb_events", META, Column("id", Integer, primary_key=True), Column("at", UTCDateTime(), nullable=False)
)


def test_types_literals_labels_and_expanding_binds_as_through_sqlalchemy(url: str) -> None:
    """Datetimes go in and come back aware (bind and result conversions), a literal in a
    statement is bound, a label names its column, and an expanding IN (which SQLite runs
    through SQLAlchemy's own execution) reads the same transaction."""
    if make_url(url).get_backend_name() != "sqlite":
        pytest.skip("SQLite's statements on sqlite3 (Postgres: asyncpg, no expanding IN)")
    at = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    add = insert(EVENTS).values(id=bindparam("event_id", type_=Integer()), at=bindparam("at", type_=UTCDateTime()))
    newest = select((func.max(EVENTS.c.id) + 1).label("next_id"), func.max(EVENTS.c.at).label("last_at"))
    some = select(EVENTS.c.id).where(EVENTS.c.id.in_(bindparam("ids", expanding=True))).order_by(EVENTS.c.id)

    async def scenario() -> None:
        db = await make_database(url)
        async with transaction(db) as conn:
            await conn.execute(text("CREATE TABLE aiodb_events (id INTEGER PRIMARY KEY, at VARCHAR(40) NOT NULL)"))
        async with transaction(db) as conn:
            for i in (1, 2, 3):
                await conn.execute(add, {"event_id": i, "at": at})
            row = (await conn.execute(newest)).one()
            assert (row.next_id, row.last_at, row._mapping["last_at"]) == (4, at, at)
            assert list((await conn.execute(some, {"ids": [1, 3, 9]})).scalars()) == [1, 3]
        async with transaction(db, read_only=True) as conn:
            assert (await conn.execute(select(EVENTS.c.at).where(EVENTS.c.id == 2))).scalar_one() == at
        await db.dispose()

    asyncio.run(scenario())
