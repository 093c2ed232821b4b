"""Retention: delete the rows nothing needs any more, in small batches that never wait.

Two tables grow with every request otherwise: the wallet's idempotency records (kept at
least the contract's 24 hours, then forgotten) and every producing service's outbox (a
row per email, useless once the notifier confirmed it sent). `<service>-purge` (a
CronJob) deletes what is older than the service's configured ages.

Each batch is one short transaction of one statement:

    DELETE FROM t WHERE id IN (SELECT id FROM t WHERE <age and state> AND (time, id) > :cursor
                               ORDER BY time, id LIMIT :n [FOR UPDATE SKIP LOCKED])

then a pause, so the purge never holds many row locks nor holds them long, and leaves
the database room between batches (WAL, replicas, vacuum). No writer waits on it: new
rows are never among those it deletes, and on Postgres the outbox's subselect skips the
rows another session holds (the relay's claims) instead of queueing behind them, leaving
them for the next run (nobody locks an idempotency record). The service's session
limits (lock_timeout, statement_timeout) bound anything else. The cursor on (time, id), served by an index of
each table on exactly those columns (migrations wallet 0007, auth 0005), starts every
batch where the last one stopped instead of stepping again over the index entries of
rows already deleted, which stay until vacuum removes them (and longer while an old
snapshot, such as a running audit's, still sees them). SQLite has one writer anyway:
there the batch holds the write lock for a few milliseconds, and writers wait for it in
their busy timeout.

The cutoff is the database's clock on Postgres (the same clock as the wallet's retention
trigger, which refuses to delete an idempotency record younger than 24 hours), the
process's clock on SQLite (which is the database's).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Connection, Engine, Table, bindparam, delete, func, or_, select, tuple_
from sqlalchemy.exc import SQLAlchemyError

from svckit.db import READ_ONLY, SessionLimits, make_engine, utcnow

log = logging.getLogger("svckit.retention")

# The outbox's `outcome` values (svckit.outbox: SENT, DEAD_LETTERED), repeated here so a
# purge imports neither Redis nor Dramatiq; a test holds them together.
SENT = "sent"
DEAD_LETTERED = "dead_lettered"
OUTBOX_INDEX = "ix_outbox_confirmed"


@dataclass(frozen=True)
class Target:
    """What one purge deletes: rows of `table` whose `time_column` is older than `max_age_s`
    and that match every clause of `where`. The table needs an index on (time_column, id).

    `skip_locked`: for a table whose rows other sessions lock (the outbox: the relay claims
    its rows FOR UPDATE), the subselect skips them on Postgres rather than queue behind
    them. Postgres lets only a role with UPDATE on the table lock its rows, so a table the
    service may not UPDATE (nor anybody lock) purges without it."""

    name: str
    table: Table
    time_column: str
    max_age_s: float
    where: Sequence[ColumnElement[bool]] = ()
    skip_locked: bool = False


def outbox_target(table: Table, max_age_s: float) -> Target:
    """Outbox rows the notifier confirmed sent, `max_age_s` after the confirmation.

    Dead letters stay: they are the record of what was given up on, listed and replayed by
    `<service>-relay dead-letters` (and turned into `sent` when a replay gets through).
    Rows confirmed before outcomes were recorded (migrations auth 0004 / wallet 0006) have
    none and go too. Unconfirmed rows (unpublished, or published and not yet confirmed)
    are the relay's and never match."""
    return Target(
        name="outbox",
        table=table,
        time_column="confirmed_at",
        max_age_s=max_age_s,
        where=(table.c.confirmed_at.is_not(None), or_(table.c.outcome.is_(None), table.c.outcome == SENT)),
        skip_locked=True,
    )


@dataclass
class Result:
    """What one purge of one target did (or, with dry_run, would do)."""

    target: str
    cutoff: datetime
    deleted: int = 0
    batches: int = 0
    longest_batch_s: float = 0.0
    elapsed_s: float = 0.0
    dry_run: bool = False
    batch_times: list[float] = field(default_factory=list, repr=False)

    def render(self) -> str:
        if self.dry_run:
            return f"{self.target}: {self.deleted} rows older than {self.cutoff.isoformat()} would be purged"
        rate = self.deleted / self.elapsed_s if self.elapsed_s else 0.0
        return (
            f"{self.target}: purged {self.deleted} rows older than {self.cutoff.isoformat()} in {self.batches} "
            f"batches, {self.elapsed_s:.1f} s ({rate:.0f} rows/s), longest batch {self.longest_batch_s * 1000:.0f} ms"
        )


def cutoff_for(conn: Connection, max_age_s: float) -> datetime:
    """Now minus `max_age_s`, by the database's clock on Postgres."""
    now = conn.execute(select(func.now())).scalar_one() if conn.dialect.name == "postgresql" else utcnow()
    if not isinstance(now, datetime):
        raise TypeError(f"now() answered {now!r}")
    return now - timedelta(seconds=max_age_s)


def candidates(
    target: Target, *, cutoff: datetime, after: tuple[Any, Any] | None, limit: int, dialect: str
) -> Any:  # a Select (typed loosely: with_for_update keeps it one)
    """The subselect of one batch: the next `limit` ids to delete, in (time, id) order."""
    t = target.table
    when = t.c[target.time_column]
    query = select(t.c.id).where(when < cutoff, *target.where)
    if after is not None:
        # Bound with the columns' own types (UTCDateTime: the same text on SQLite as stored).
        cursor = tuple_(bindparam(None, after[0], type_=when.type), bindparam(None, after[1], type_=t.c.id.type))
        query = query.where(tuple_(when, t.c.id) > cursor)
    query = query.order_by(when, t.c.id).limit(limit)
    if target.skip_locked and dialect == "postgresql":
        query = query.with_for_update(skip_locked=True)
    return query


def purge_batch(
    conn: Connection, target: Target, *, cutoff: datetime, after: tuple[Any, Any] | None, limit: int
) -> tuple[int, tuple[Any, Any] | None]:
    """Delete one batch in the caller's transaction: (rows deleted, the cursor past them)."""
    t = target.table
    when = t.c[target.time_column]
    chosen = candidates(target, cutoff=cutoff, after=after, limit=limit, dialect=conn.dialect.name)
    rows = conn.execute(delete(t).where(t.c.id.in_(chosen)).returning(when, t.c.id)).all()
    if not rows:
        return 0, after
    last = max((r[0], r[1]) for r in rows)
    return len(rows), last


def count(engine: Engine, target: Target, *, cutoff: datetime) -> int:
    """How many rows a purge with this cutoff would delete now."""
    t = target.table
    with engine.execution_options(**READ_ONLY).connect() as conn:
        query = select(func.count()).select_from(t).where(t.c[target.time_column] < cutoff, *target.where)
        return int(conn.execute(query).scalar_one())


def purge(
    engine: Engine,
    target: Target,
    *,
    batch_size: int,
    pause_s: float,
    dry_run: bool = False,
    sleep: Callable[[float], None] = time.sleep,
) -> Result:
    """Delete every row of `target` older than its age, `batch_size` rows per transaction
    with `pause_s` between transactions, until a batch comes back short."""
    with engine.execution_options(**READ_ONLY).connect() as conn:
        cutoff = cutoff_for(conn, target.max_age_s)
    result = Result(target=target.name, cutoff=cutoff, dry_run=dry_run)
    if dry_run:
        result.deleted = count(engine, target, cutoff=cutoff)
        return result
    started = time.perf_counter()
    after: tuple[Any, Any] | None = None
    while True:
        batch_started = time.perf_counter()
        with engine.begin() as conn:
            deleted, after = purge_batch(conn, target, cutoff=cutoff, after=after, limit=batch_size)
        took = time.perf_counter() - batch_started
        result.batches += 1
        result.deleted += deleted
        result.batch_times.append(took)
        result.longest_batch_s = max(result.longest_batch_s, took)
        if deleted < batch_size:
            break
        sleep(pause_s)
    result.elapsed_s = time.perf_counter() - started
    return result


def purge_main(
    service: str,
    settings: Any,
    targets: Callable[[Any], Sequence[Target]],
    argv: list[str] | None = None,
) -> None:
    """The body of `<service>-purge`: every target of the service, one after the other, on
    one connection. Exit 0 when all went through, 1 when the database refused or failed
    (what earlier batches deleted stays deleted; the next run goes on from there)."""
    parser = argparse.ArgumentParser(
        prog=f"{service}-purge",
        description=f"Delete {service}'s rows past their retention age, in short batches (svckit.retention).",
    )
    parser.add_argument("--dry-run", action="store_true", help="count what would be purged, delete nothing")
    parser.add_argument("--database-url", help=f"default: {service.upper()}_DATABASE_URL")
    parser.add_argument("--batch-size", type=int, help=f"default: {service.upper()}_RETENTION_BATCH_SIZE")
    parser.add_argument("--pause-ms", type=int, help=f"default: {service.upper()}_RETENTION_PAUSE_MS")
    args = parser.parse_args(argv)
    batch_size = args.batch_size if args.batch_size is not None else settings.retention_batch_size
    pause_ms = args.pause_ms if args.pause_ms is not None else settings.retention_pause_ms
    if batch_size < 1 or pause_ms < 0:
        parser.error("--batch-size must be at least 1 and --pause-ms at least 0")
    from svckit.logging import configure_logging

    configure_logging(f"{service}-purge", settings.log_level)
    # One connection, the service's session limits: a batch that would wait on a lock
    # longer than lock_timeout fails instead of holding up the writers queued behind it.
    engine = make_engine(
        args.database_url or settings.database_url,
        pool_size=1,
        max_overflow=0,
        limits=SessionLimits.from_settings(settings),
    )
    code = 0
    try:
        for target in targets(settings):
            try:
                result = purge(engine, target, batch_size=batch_size, pause_s=pause_ms / 1000, dry_run=args.dry_run)
            except SQLAlchemyError as exc:
                log.error("%s: purge stopped: %s", target.name, exc.__class__.__name__, exc_info=True)
                cause = getattr(exc, "orig", None) or exc
                print(f"{target.name}: purge stopped: {exc.__class__.__name__}: {cause}", file=sys.stderr)
                code = 1
                continue
            print(result.render())
    finally:
        engine.dispose()
    sys.exit(code)


# --- migrations ------------------------------------------------------------------------


def create_purge_index(name: str, table: str, columns: list[str], where: str | None = None) -> None:
    """An index for a purge's cursor, in a migration. On Postgres it is built CONCURRENTLY,
    outside the migration's transaction, so writers go on while it builds on a large table
    (should the build fail, Postgres leaves an INVALID index behind: drop it and migrate
    again)."""
    import sqlalchemy as sa
    from alembic import op

    predicate = {"sqlite_where": sa.text(where), "postgresql_where": sa.text(where)} if where else {}
    if op.get_bind().dialect.name != "postgresql":
        op.create_index(name, table, columns, **predicate)
        return
    with op.get_context().autocommit_block():
        op.create_index(name, table, columns, postgresql_concurrently=True, **predicate)


def drop_purge_index(name: str, table: str) -> None:
    from alembic import op

    if op.get_bind().dialect.name != "postgresql":
        op.drop_index(name, table_name=table)
        return
    with op.get_context().autocommit_block():
        op.drop_index(name, table_name=table, postgresql_concurrently=True)


def create_outbox_purge_index() -> None:
    """The outbox purge's cursor: confirmed rows by (confirmed_at, id)."""
    create_purge_index(OUTBOX_INDEX, "outbox", ["confirmed_at", "id"], where="confirmed_at IS NOT NULL")


def drop_outbox_purge_index() -> None:
    drop_purge_index(OUTBOX_INDEX, "outbox")
