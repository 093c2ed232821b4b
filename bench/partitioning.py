"""The time-partitioning trial of deploy/SCALING.md: the ledger as it is, against the same
rows in a table partitioned by month (declarative partitioning), on Postgres.

    .venv/bin/python bench/partitioning.py [--url postgresql://postgres@127.0.0.1:5432/postgres]
        [--database bench_partitioning] [--rows 1000000] [--wallets 2000] [--months 12] [--json]

A database of its own (dropped and created again) gets two copies of one ledger: `plain`,
shaped as the wallet's `ledger_entries` (BIGINT id, the (wallet_id, transaction_id)
index history reads, and a (wallet_id, created_at) index for time ranges), and `parted`,
the same columns partitioned by RANGE (created_at), one partition a month, primary key
(id, created_at) as partitioning requires. --rows entries spread evenly over --months
months and --wallets wallets. Then, against each, from one connection, for wallets drawn
at random (the same ones for both):

  - history's newest page (ORDER BY transaction_id DESC LIMIT 20),
  - a keyset page further back (transaction_id < x),
  - a one-month statement (created_at range, oldest first),
  - a balance at a time (the newest entry at or before it),
  - an insert of one entry in the current month (autocommit, so each one commits),

p50/p99 per query, parted / plain; and retention of the oldest month: DELETE of its rows
(and the VACUUM it owes) against DETACH PARTITION CONCURRENTLY and DROP. Figures, not
pass/fail.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

COLUMNS = (
    "id BIGINT NOT NULL, transaction_id BIGINT NOT NULL, wallet_id INTEGER NOT NULL,"
    " entry_type VARCHAR(6) NOT NULL, amount BIGINT NOT NULL, currency VARCHAR(3) NOT NULL,"
    " balance_snapshot BIGINT NOT NULL, created_at TIMESTAMPTZ NOT NULL"
)
START = datetime(2025, 1, 1, tzinfo=UTC)

QUERIES = {
    "history_newest_page": (
        "SELECT id, transaction_id, amount, balance_snapshot FROM {t} WHERE wallet_id = %(w)s"
        " ORDER BY transaction_id DESC LIMIT 20"
    ),
    "history_keyset_page": (
        "SELECT id, transaction_id, amount, balance_snapshot FROM {t} WHERE wallet_id = %(w)s"
        " AND transaction_id < %(before)s ORDER BY transaction_id DESC LIMIT 20"
    ),
    "statement_one_month": (
        "SELECT transaction_id, created_at, entry_type, amount, balance_snapshot FROM {t}"
        " WHERE wallet_id = %(w)s AND created_at >= %(from)s AND created_at < %(to)s ORDER BY created_at, id"
    ),
    "balance_at": (
        "SELECT balance_snapshot FROM {t} WHERE wallet_id = %(w)s AND created_at <= %(at)s"
        " ORDER BY created_at DESC, id DESC LIMIT 1"
    ),
}


def month(i: int) -> datetime:
    return START.replace(year=START.year + (START.month - 1 + i) // 12, month=(START.month - 1 + i) % 12 + 1)


def create(conn: psycopg.Connection[Any], rows: int, wallets: int, months: int) -> dict[str, float]:
    span = (month(months) - START).total_seconds()
    conn.execute(f"CREATE TABLE plain ({COLUMNS}, PRIMARY KEY (id))")
    conn.execute(f"CREATE TABLE parted ({COLUMNS}, PRIMARY KEY (id, created_at)) PARTITION BY RANGE (created_at)")
    for i in range(months + 1):  # and the month after, where new entries go
        lo, hi = month(i), month(i + 1)
        conn.execute(f"CREATE TABLE parted_{i} PARTITION OF parted FOR VALUES FROM ('{lo}') TO ('{hi}')")
    fill = (
        "INSERT INTO {t} SELECT g, g, 1 + (g::bigint * 7919) %% %(w)s, CASE WHEN g %% 2 = 0 THEN 'debit' ELSE 'credit' END,"
        " 100 + g %% 900, 'USD', g, %(start)s + make_interval(secs => g * %(step)s) FROM generate_series(1, %(n)s) g"
    )
    seconds = {}
    for table in ("plain", "parted"):
        started = time.perf_counter()
        conn.execute(fill.format(t=table), {"w": wallets, "start": START, "step": span / (rows + 1), "n": rows})
        conn.execute(f"CREATE INDEX ON {table} (wallet_id, transaction_id)")
        conn.execute(f"CREATE INDEX ON {table} (wallet_id, created_at)")
        conn.execute(f"VACUUM ANALYZE {table}")
        seconds[table] = round(time.perf_counter() - started, 1)
    return seconds


def timed(conn: psycopg.Connection[Any], sql: str, params: list[dict[str, Any]]) -> dict[str, float]:
    latencies = []
    with conn.cursor() as cur:
        for p in params:
            started = time.perf_counter()
            cur.execute(sql, p, prepare=True)
            if cur.description is not None:
                cur.fetchall()
            latencies.append(time.perf_counter() - started)
    ordered = sorted(latencies)
    return {
        "p50_ms": round(statistics.median(ordered) * 1000, 3),
        "p99_ms": round(ordered[int(0.99 * (len(ordered) - 1))] * 1000, 3),
    }


def inserts(conn: psycopg.Connection[Any], table: str, first_id: int, n: int, months: int) -> dict[str, float]:
    at = month(months) + timedelta(days=1)
    sql = f"INSERT INTO {table} VALUES (%(id)s, %(id)s, %(w)s, 'credit', 100, 'USD', 100, %(at)s)"  # noqa: S608
    return timed(conn, sql, [{"id": first_id + i, "w": 1 + i % 50, "at": at} for i in range(n)])


def retention(conn: psycopg.Connection[Any], months: int) -> dict[str, Any]:
    """Remove the oldest month from each table, the way each would be."""
    started = time.perf_counter()
    deleted = conn.execute("DELETE FROM plain WHERE created_at < %s", (month(1),)).rowcount
    delete_s = time.perf_counter() - started
    started = time.perf_counter()
    conn.execute("VACUUM plain")
    vacuum_s = time.perf_counter() - started
    started = time.perf_counter()
    conn.execute("ALTER TABLE parted DETACH PARTITION parted_0 CONCURRENTLY")
    detach_s = time.perf_counter() - started
    dropped = conn.execute("SELECT count(*) FROM parted_0").fetchone()[0]  # type: ignore[index]
    conn.execute("DROP TABLE parted_0")
    return {
        "rows": deleted,
        "plain_delete_s": round(delete_s, 2),
        "plain_vacuum_s": round(vacuum_s, 2),
        "parted_detach_and_drop_s": round(detach_s, 2),
        "parted_rows_detached": dropped,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--database", default="bench_partitioning")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--wallets", type=int, default=2_000)
    parser.add_argument("--months", type=int, default=12)
    parser.add_argument("--samples", type=int, default=2_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    with psycopg.connect(args.url, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{args.database}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{args.database}"')
    url = psycopg.conninfo.make_conninfo(args.url, dbname=args.database)
    out: dict[str, Any] = {"rows": args.rows, "wallets": args.wallets, "months": args.months}
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            print(f"filling two ledgers of {args.rows:,} entries ...", file=sys.stderr)
            out["fill_seconds"] = create(conn, args.rows, args.wallets, args.months)
            rng = random.Random(7)  # sampling, not secrets
            per_wallet = args.rows // args.wallets
            params = []
            for _ in range(args.samples):
                m = rng.randrange(args.months)
                params.append(
                    {
                        "w": rng.randrange(1, args.wallets + 1),
                        "before": rng.randrange(per_wallet, args.rows),
                        "from": month(m),
                        "to": month(m + 1),
                        "at": month(m) + timedelta(days=rng.randrange(28)),
                    }
                )
            out["queries"] = {}
            for name, sql in QUERIES.items():
                print(f"  {name} ...", file=sys.stderr)
                plain = timed(conn, sql.format(t="plain"), params)
                parted = timed(conn, sql.format(t="parted"), params)
                out["queries"][name] = {
                    "plain": plain,
                    "parted": parted,
                    "parted_over_plain_p50": round(parted["p50_ms"] / plain["p50_ms"], 2),
                }
            plain = inserts(conn, "plain", args.rows + 1, args.samples, args.months)
            parted = inserts(conn, "parted", args.rows + 1, args.samples, args.months)
            out["queries"]["insert_one_entry"] = {
                "plain": plain,
                "parted": parted,
                "parted_over_plain_p50": round(parted["p50_ms"] / plain["p50_ms"], 2),
            }
            print("  retention of the oldest month ...", file=sys.stderr)
            out["retention"] = retention(conn, args.months)
    finally:
        with psycopg.connect(args.url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{args.database}" WITH (FORCE)')
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"time partitioning, {args.rows:,} entries over {args.months} months, {args.wallets:,} wallets")
    print(f"{'query':24} {'plain p50/p99 ms':>18} {'parted p50/p99 ms':>19} {'parted/plain':>13}")
    for name, q in out["queries"].items():
        a, b = q["plain"], q["parted"]
        print(
            f"{name:24} {a['p50_ms']:>8.3f}/{a['p99_ms']:<9.3f} {b['p50_ms']:>8.3f}/{b['p99_ms']:<10.3f}"
            f" {q['parted_over_plain_p50']:>12.2f}"
        )
    r = out["retention"]
    print(
        f"retention of one month ({r['rows']:,} rows): DELETE {r['plain_delete_s']} s + VACUUM {r['plain_vacuum_s']} s;"
        f" DETACH CONCURRENTLY + DROP {r['parted_detach_and_drop_s']} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
