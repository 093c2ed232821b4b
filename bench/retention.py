"""The retention purge (svckit.retention, `wallet-purge`) at 10^6 rows, on Postgres.

    .venv/bin/python bench/retention.py [--url postgresql+psycopg://postgres@127.0.0.1:5432/postgres]
        [--database bench_retention] [--rows 1000000] [--young 100000] [--batch-size 1000]
        [--pause-ms 0,20] [--trigger-cost] [--json]

A database of its own (dropped and created again, migrated to the wallet's head) gets
--rows idempotency records three to ten days old (realistic ones: a response body of
about 200 bytes) and --young records of the last hour, and as many outbox rows: --rows
confirmed sent over a week ago, --young unconfirmed. Then, for each pause of --pause-ms,
the two tables are filled again and purged with the service's own targets, as
`wallet-purge` runs them (one connection, the service's session limits), while a writer
thread keeps inserting idempotency records and outbox rows as requests would, under the
service's lock_timeout. Printed per table and pause: rows deleted, rows/s, batches, the
longest batch transaction and the p99 batch, and the writer's p50/p99/max insert latency
during the purge against the same writer with no purge running. Figures, not pass/fail.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, insert, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from svckit import retention
from svckit.db import SessionLimits, make_engine, utcnow
from svckit.testing import alembic

ROOT = Path(__file__).resolve().parents[1]
INI = ROOT / "services" / "wallet" / "alembic.ini"
BODY = '{"wallet_id":123456,"amount":2500,"current_balance":987650}' * 3  # about 200 bytes


def recreate(url: str, database: str) -> str:
    admin = create_engine(make_url(url).set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{database}"'))
    admin.dispose()
    target = make_url(url).set(database=database).render_as_string(hide_password=False)
    alembic(INI, target, "upgrade", "head")
    return target


def fill(engine: Engine, rows: int, young: int) -> float:
    """Old and young rows in both tables, by generate_series; returns the seconds it took."""
    started = time.perf_counter()
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE idempotency_records, outbox"))
        conn.execute(
            text(
                "INSERT INTO idempotency_records (user_id, endpoint, key, fingerprint, status_code, response_body,"
                " created_at, request_token)"
                " SELECT 1000000 + g % 100000, 'transfer', md5(g::text), md5(g::text) || md5(g::text), 200, :body,"
                "   now() - interval '10 days' + (g * interval '7 days' / :n), md5(g::text)"
                " FROM generate_series(1, :n) g"
            ),
            {"n": rows, "body": BODY},
        )
        conn.execute(
            text(
                "INSERT INTO idempotency_records (user_id, endpoint, key, fingerprint, status_code, response_body,"
                " created_at, request_token)"
                " SELECT 1000000 + g % 100000, 'deposit', md5(g::text), md5(g::text) || md5(g::text), 200, :body,"
                "   now() - (g * interval '1 hour' / :n), md5(g::text)"
                " FROM generate_series(1, :n) g"
            ),
            {"n": young, "body": BODY},
        )
        conn.execute(
            text(
                "INSERT INTO outbox (id, actor_name, payload, created_at, published_at, confirmed_at, outcome)"
                " SELECT md5('o' || g), 'notifier.send_receipt', :body, t, t, t + interval '2 seconds', 'sent'"
                " FROM (SELECT g, now() - interval '30 days' + (g * interval '20 days' / :n) AS t"
                "       FROM generate_series(1, :n) g) s"
            ),
            {"n": rows, "body": BODY},
        )
        conn.execute(
            text(
                "INSERT INTO outbox (id, actor_name, payload, created_at, published_at, confirmed_at, outcome)"
                " SELECT md5('y' || g), 'notifier.send_receipt', :body, now(), NULL, NULL, NULL"
                " FROM generate_series(1, :n) g"
            ),
            {"n": young, "body": BODY},
        )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE idempotency_records"))
        conn.execute(text("VACUUM ANALYZE outbox"))
    return time.perf_counter() - started


class Writer(threading.Thread):
    """Inserts what a busy wallet would (a record and an outbox row per transaction) and
    times each insert."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.engine = make_engine(url, pool_size=1, max_overflow=0, limits=SessionLimits(lock_timeout_ms=2_000))
        self.stop = threading.Event()
        self.latencies: list[float] = []
        self.errors: list[str] = []

    def run(self) -> None:
        from wallet.purge import IDEMPOTENCY, OUTBOX

        while not self.stop.is_set():
            started = time.perf_counter()
            try:
                with self.engine.begin() as conn:
                    now = utcnow()
                    conn.execute(
                        insert(IDEMPOTENCY).values(
                            user_id=7,
                            endpoint="transfer",
                            key=uuid.uuid4().hex,
                            fingerprint="0" * 64,
                            status_code=200,
                            response_body=BODY,
                            created_at=now,
                        )
                    )
                    conn.execute(
                        insert(OUTBOX).values(
                            id=uuid.uuid4().hex, actor_name="notifier.send_receipt", payload=BODY, created_at=now
                        )
                    )
            except SQLAlchemyError as exc:  # a figure to report, not a crash
                self.errors.append(type(exc).__name__)
            self.latencies.append(time.perf_counter() - started)
            time.sleep(0.002)
        self.engine.dispose()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def writer_alone(url: str, seconds: float) -> dict[str, float]:
    writer = Writer(url)
    writer.start()
    time.sleep(seconds)
    writer.stop.set()
    writer.join()
    return latency(writer)


def latency(writer: Writer) -> dict[str, float]:
    values = writer.latencies
    return {
        "inserts": len(values),
        "p50_ms": round(statistics.median(values) * 1000, 2) if values else 0.0,
        "p99_ms": round(percentile(values, 0.99) * 1000, 2),
        "max_ms": round(max(values, default=0.0) * 1000, 2),
        "errors": len(writer.errors),
    }


def run(url: str, *, batch_size: int, pause_ms: int, only: str | None = None) -> list[dict[str, Any]]:
    from wallet.purge import PurgeSettings, targets

    settings = PurgeSettings(database_url=url)
    engine = make_engine(url, pool_size=1, max_overflow=0, limits=SessionLimits.from_settings(settings))
    out = []
    try:
        for target in targets(settings):
            if only and target.name != only:
                continue
            writer = Writer(url)
            writer.start()
            result = retention.purge(engine, target, batch_size=batch_size, pause_s=pause_ms / 1000)
            writer.stop.set()
            writer.join()
            out.append(
                {
                    "table": target.name,
                    "pause_ms": pause_ms,
                    "batch_size": batch_size,
                    "deleted": result.deleted,
                    "seconds": round(result.elapsed_s, 2),
                    "rows_per_s": round(result.deleted / result.elapsed_s) if result.elapsed_s else 0,
                    "batches": result.batches,
                    "longest_batch_ms": round(result.longest_batch_s * 1000, 1),
                    "p99_batch_ms": round(percentile(result.batch_times, 0.99) * 1000, 1),
                    "median_batch_ms": round(statistics.median(result.batch_times) * 1000, 1),
                    "writer_during_purge": latency(writer),
                }
            )
    finally:
        engine.dispose()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--database", default="bench_retention")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--young", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=1_000)
    parser.add_argument("--pause-ms", default="0,20", help="comma-separated: one run per pause")
    parser.add_argument(
        "--trigger-cost",
        action="store_true",
        help="and one more idempotency run (no pause) with the 24-hour trigger disabled, to show what it costs",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON document")
    args = parser.parse_args()
    url = recreate(args.url, args.database)
    engine = make_engine(url)
    # The host's load average (1 min) before and after: figures from a busy host say so.
    figures: dict[str, Any] = {"rows": args.rows, "young": args.young, "load_before": os.getloadavg()[0], "runs": []}
    try:
        for pause in (int(p) for p in args.pause_ms.split(",")):
            filled = fill(engine, args.rows, args.young)
            figures.setdefault("fill_s", round(filled, 1))
            figures.setdefault("writer_alone", writer_alone(url, 5.0))
            runs = run(url, batch_size=args.batch_size, pause_ms=pause)
            with engine.connect() as conn:
                for r in runs:  # what is left: the young rows, and the writer's
                    r["left_after"] = conn.execute(text(f"SELECT count(*) FROM {r['table']}")).scalar_one()  # noqa: S608
            figures["runs"] += runs
        if args.trigger_cost:
            fill(engine, args.rows, args.young)
            with engine.begin() as conn:
                conn.execute(text("ALTER TABLE idempotency_records DISABLE TRIGGER idempotency_records_retention"))
            try:
                runs = run(url, batch_size=args.batch_size, pause_ms=0, only="idempotency_records")
            finally:
                with engine.begin() as conn:
                    conn.execute(text("ALTER TABLE idempotency_records ENABLE TRIGGER idempotency_records_retention"))
            for r in runs:
                r["table"] += " (no trigger)"
                r["left_after"] = 0
            figures["runs"] += runs
    finally:
        engine.dispose()
    figures["load_after"] = os.getloadavg()[0]
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    alone = figures["writer_alone"]
    print(
        f"{args.rows} old + {args.young} young rows per table (filled in {figures['fill_s']} s); "
        f"load average {figures['load_before']:.1f} before, {figures['load_after']:.1f} after, on {os.cpu_count()} CPUs"
    )
    print(f"writer alone: p50 {alone['p50_ms']} ms, p99 {alone['p99_ms']} ms, max {alone['max_ms']} ms")
    for r in figures["runs"]:
        w = r["writer_during_purge"]
        print(
            f"{r['table']:<20} pause {r['pause_ms']:>3} ms: {r['deleted']} rows in {r['seconds']} s = "
            f"{r['rows_per_s']} rows/s, {r['batches']} batches of {r['batch_size']}, longest batch "
            f"{r['longest_batch_ms']} ms (p99 {r['p99_batch_ms']}, median {r['median_batch_ms']}); writer meanwhile: "
            f"p50 {w['p50_ms']} ms, p99 {w['p99_ms']} ms, max {w['max_ms']} ms, {w['errors']} errors; "
            f"{r['left_after']} rows left"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
