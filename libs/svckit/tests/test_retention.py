"""The outbox purge (svckit.retention) on a real SQLite database and, with TEST_DATABASE_URL,
on Postgres: what it deletes and keeps, its batches, and that it never holds up the relay
or the writers."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import nullcontext
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from sqlalchemy import Engine, Index, MetaData, insert, select, text, update

from svckit import outbox, retention
from svckit.db import SessionLimits, make_engine, utcnow
from svckit.outbox import Relay
from svckit.testing import fresh_database, outbox_table

OUTBOX = outbox_table()
# The index the services' migrations create (auth 0005, wallet 0007), on this test table.
Index(
    retention.OUTBOX_INDEX,
    OUTBOX.c.confirmed_at,
    OUTBOX.c.id,
    sqlite_where=text("confirmed_at IS NOT NULL"),
    postgresql_where=text("confirmed_at IS NOT NULL"),
)
WEEK = 7 * 86_400.0
DAY = timedelta(days=1)


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "postgres" and not os.environ.get("TEST_DATABASE_URL"):
        pytest.skip("TEST_DATABASE_URL is not set: no Postgres for SKIP LOCKED")
    with (
        fresh_database("retention", tmp_path)
        if request.param == "postgres"
        else nullcontext(f"sqlite:///{tmp_path}/retention.db") as url
    ):
        engine = make_engine(url)
        OUTBOX.metadata.create_all(engine)
        yield engine
        engine.dispose()


def row(*, confirmed: datetime | None, outcome: str | None, published: bool = True) -> dict[str, Any]:
    created = (confirmed or utcnow()) - timedelta(seconds=5)
    return {
        "id": uuid4().hex,
        "actor_name": "notifier.send_receipt",
        "payload": "{}",
        "created_at": created,
        "published_at": created if published else None,
        "confirmed_at": confirmed,
        "outcome": outcome,
    }


def stage(engine: Engine, rows: list[dict[str, Any]]) -> list[str]:
    with engine.begin() as conn:
        conn.execute(insert(OUTBOX), rows)
    return [r["id"] for r in rows]


def ids(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(select(OUTBOX.c.id)).scalars())


def target(max_age_s: float = WEEK) -> retention.Target:
    return retention.outbox_target(OUTBOX, max_age_s)


def test_the_outcome_values_are_the_relays() -> None:
    assert (retention.SENT, retention.DEAD_LETTERED) == (outbox.SENT, outbox.DEAD_LETTERED)


class TestWhatIsPurged:
    def test_old_confirmed_rows_go_and_everything_the_relay_or_an_operator_needs_stays(self, engine: Engine) -> None:
        old = utcnow() - 8 * DAY
        gone = stage(engine, [row(confirmed=old, outcome="sent") for _ in range(5)])
        gone += stage(engine, [row(confirmed=old, outcome=None)])  # confirmed before outcomes were recorded
        kept = stage(engine, [row(confirmed=utcnow() - 6 * DAY, outcome="sent")])  # young
        kept += stage(engine, [row(confirmed=old, outcome="dead_lettered")])  # a dead letter
        kept += stage(engine, [row(confirmed=None, outcome=None, published=False)])  # not yet published
        kept += stage(engine, [row(confirmed=None, outcome=None)])  # published, unconfirmed
        with engine.begin() as conn:  # unconfirmed for over a week still: the relay's to republish
            conn.execute(update(OUTBOX).where(OUTBOX.c.id.in_(kept[-2:])).values(created_at=old, published_at=old))

        dry = retention.purge(engine, target(), batch_size=100, pause_s=0, dry_run=True)
        assert (dry.deleted, ids(engine)) == (len(gone), set(gone) | set(kept))
        result = retention.purge(engine, target(), batch_size=100, pause_s=0)
        assert result.deleted == len(gone)
        assert ids(engine) == set(kept)
        assert retention.purge(engine, target(), batch_size=100, pause_s=0).deleted == 0

    def test_an_age_of_zero_purges_every_confirmed_sent_row(self, engine: Engine) -> None:
        sent = stage(engine, [row(confirmed=utcnow() - timedelta(seconds=1), outcome="sent")])
        dead = stage(engine, [row(confirmed=utcnow() - timedelta(seconds=1), outcome="dead_lettered")])
        assert retention.purge(engine, target(0), batch_size=10, pause_s=0).deleted == len(sent)
        assert ids(engine) == set(dead)


class TestBatches:
    def test_each_batch_is_bounded_and_paused_and_rows_sharing_a_time_all_go(self, engine: Engine) -> None:
        """50 rows with one confirmed_at: the cursor's id breaks the ties across batches."""
        same = utcnow() - 8 * DAY
        stage(engine, [row(confirmed=same, outcome="sent") for _ in range(50)])
        deleted: list[int] = []
        real = retention.purge_batch

        def spy(*args: Any, **kwargs: Any) -> Any:
            n, cursor = real(*args, **kwargs)
            deleted.append(n)
            return n, cursor

        pauses: list[float] = []
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(retention, "purge_batch", spy)
            result = retention.purge(engine, target(), batch_size=7, pause_s=0.25, sleep=pauses.append)
        assert deleted == [7] * 7 + [1]
        assert (result.deleted, result.batches, len(result.batch_times)) == (50, 8, 8)
        assert pauses == [0.25] * 7  # between batches, none after the last
        assert ids(engine) == set()

    def test_a_full_last_batch_ends_with_an_empty_one(self, engine: Engine) -> None:
        stage(engine, [row(confirmed=utcnow() - 8 * DAY, outcome="sent") for _ in range(6)])
        result = retention.purge(engine, target(), batch_size=3, pause_s=0)
        assert (result.deleted, result.batches) == (6, 3)


def explain(engine: Engine, query: Any) -> str:
    compiled = query.compile(engine)
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            # Not whether the planner prefers the index on a tiny table: whether it can read
            # the rows from it, in its order.
            for method in ("seqscan", "bitmapscan", "sort"):
                conn.exec_driver_sql(f"SET LOCAL enable_{method} = off")
            return "\n".join(conn.exec_driver_sql("EXPLAIN " + str(compiled), compiled.params).scalars())
        # SQLite's plan does not depend on the values: any will do.
        params = tuple(str(compiled.params[name]) for name in compiled.positiontup or ())
        return "\n".join(r[3] for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + str(compiled), params))


def test_an_index_serves_the_purges_where_and_order(engine: Engine) -> None:
    query = retention.candidates(
        target(), cutoff=utcnow(), after=(utcnow() - 9 * DAY, "0" * 32), limit=100, dialect=engine.dialect.name
    )
    plan = explain(engine, query)
    assert retention.OUTBOX_INDEX in plan, plan
    assert "TEMP B-TREE" not in plan, plan  # SQLite: read in the index's order
    assert "Sort" not in plan, plan  # Postgres: the same


class TestBesideTheRelay:
    def test_rows_another_session_holds_are_skipped_not_waited_for(self, engine: Engine) -> None:
        if engine.dialect.name != "postgresql":
            pytest.skip("SQLite has no row locks: one writer at a time")
        old = utcnow() - 8 * DAY
        held, *free = stage(engine, [row(confirmed=old, outcome="sent") for _ in range(5)])
        with engine.connect() as other, other.begin():
            other.execute(select(OUTBOX.c.id).where(OUTBOX.c.id == held).with_for_update())
            started = time.monotonic()
            result = retention.purge(engine, target(), batch_size=2, pause_s=0)
            assert time.monotonic() - started < 2
        assert result.deleted == len(free)
        assert ids(engine) == {held}  # the next run takes it
        assert retention.purge(engine, target(), batch_size=2, pause_s=0).deleted == 1

    def test_an_open_batch_holds_up_no_writer_and_no_relay(self, engine: Engine) -> None:
        """Mid-batch (its transaction open, its rows deleted and locked), new rows go in and
        the relay claims, publishes and confirms its rows, each under a 300 ms lock_timeout."""
        if engine.dialect.name != "postgresql":
            pytest.skip("SQLite has one writer: a batch holds the others for its few milliseconds (next test)")
        stage(engine, [row(confirmed=utcnow() - 8 * DAY, outcome="sent") for _ in range(20)])
        pending = stage(engine, [row(confirmed=None, outcome=None, published=False) for _ in range(3)])
        cutoff = utcnow() - timedelta(seconds=WEEK)
        with engine.connect() as purger, purger.begin():
            assert retention.purge_batch(purger, target(), cutoff=cutoff, after=None, limit=10)[0] == 10
            url = engine.url.render_as_string(hide_password=False)
            writer = make_engine(url, limits=SessionLimits(lock_timeout_ms=300))
            try:
                stage(writer, [row(confirmed=None, outcome=None, published=False)])
                relay = Relay(writer, OUTBOX, lambda payload: None, lease=None, name="t", batch=100)
                assert relay.run_once() == len(pending) + 1
                with writer.begin() as conn:  # the relay's reconcile: confirmations
                    conn.execute(update(OUTBOX).where(OUTBOX.c.id.in_(pending)).values(confirmed_at=utcnow()))
            finally:
                writer.dispose()
        assert retention.purge(engine, target(), batch_size=100, pause_s=0).deleted == 10

    def test_writers_and_the_relay_run_throughout_a_long_purge(self, engine: Engine) -> None:
        """A purge of many small batches while a writer stages rows and the relay publishes
        them: nobody fails or waits past a batch, and only the old confirmed rows go."""
        old = stage(engine, [row(confirmed=utcnow() - 8 * DAY, outcome="sent") for _ in range(2_000)])
        stop = threading.Event()
        staged: list[str] = []
        errors: list[BaseException] = []
        published: list[str] = []
        relay = Relay(engine, OUTBOX, published.append, lease=None, name="t", batch=50)
        waits: list[float] = []

        def write() -> None:
            try:
                while not stop.is_set():
                    started = time.perf_counter()
                    staged.extend(stage(engine, [row(confirmed=None, outcome=None, published=False)]))
                    relay.run_once()
                    waits.append(time.perf_counter() - started)
                    time.sleep(0.002)  # a busy service, not one that never lets go of SQLite's lock
            except BaseException as exc:  # reported below
                errors.append(exc)

        thread = threading.Thread(target=write)
        thread.start()
        try:
            result = retention.purge(engine, target(), batch_size=50, pause_s=0.002)
        finally:
            stop.set()
            thread.join(30)
        assert errors == []
        assert result.deleted == len(old)
        assert len(staged) > 0
        assert ids(engine) == set(staged)
        assert result.longest_batch_s < 1.0, result.longest_batch_s
        assert max(waits) < 2.0, max(waits)


class TestTheCommand:
    @pytest.fixture(autouse=True)
    def _keep_pytests_logging(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """purge_main sets up the process's logging, as a command does: not this one's."""
        monkeypatch.setattr("svckit.logging.configure_logging", lambda *args: None)

    class Settings:
        log_level = "WARNING"
        retention_batch_size = 2
        retention_pause_ms = 0
        db_lock_timeout_ms = 2_000
        db_statement_timeout_ms = 10_000
        db_idle_in_transaction_timeout_ms = 30_000
        db_connect_timeout_s = 5

        def __init__(self, url: str) -> None:
            self.database_url = url

    def test_it_purges_every_target_and_prints_what_it_did(
        self, engine: Engine, capsys: pytest.CaptureFixture[str]
    ) -> None:
        stage(engine, [row(confirmed=utcnow() - 8 * DAY, outcome="sent") for _ in range(3)])
        url = engine.url.render_as_string(hide_password=False)
        with pytest.raises(SystemExit) as dry:
            retention.purge_main("t", self.Settings(url), lambda s: [target()], ["--dry-run"])
        assert dry.value.code == 0
        assert "outbox: 3 rows older than" in capsys.readouterr().out
        with pytest.raises(SystemExit) as done:
            retention.purge_main("t", self.Settings(url), lambda s: [target()], [])
        assert done.value.code == 0
        assert "outbox: purged 3 rows older than" in capsys.readouterr().out
        assert ids(engine) == set()

    def test_a_failing_target_exits_1_and_the_others_still_run(
        self, engine: Engine, capsys: pytest.CaptureFixture[str]
    ) -> None:
        stage(engine, [row(confirmed=utcnow() - 8 * DAY, outcome="sent")])
        absent = OUTBOX.to_metadata(MetaData(), name="no_such_table")
        missing = retention.Target(name="missing", table=absent, time_column="confirmed_at", max_age_s=0)
        url = engine.url.render_as_string(hide_password=False)
        with pytest.raises(SystemExit) as exit_info:
            retention.purge_main("t", self.Settings(url), lambda s: [missing, target()], [])
        assert exit_info.value.code == 1
        out, err = capsys.readouterr()
        assert "missing: purge stopped" in err
        assert "outbox: purged 1 rows" in out

    def test_a_batch_size_below_one_is_refused(self, capsys: pytest.CaptureFixture[str]) -> None:
        with pytest.raises(SystemExit) as exit_info:
            retention.purge_main("t", self.Settings("sqlite://"), lambda s: [], ["--batch-size", "0"])
        assert exit_info.value.code == 2
        assert "--batch-size must be at least 1" in capsys.readouterr().err
