"""`make bench-scale`: how transfers grow with load and with wallet replicas, where each
configuration saturates and which process is the bottleneck there; and how reads behave
as the ledger grows to 10^7 entries. Figures only, never pass/fail.

For each replica count (--replicas, default 1 2 4) the `make run` launcher starts the
stack on fresh Postgres databases (BENCH_DATABASE_URL's server) with that many wallet
processes, 100 wallets are funded through the API, and wrk drives transfers (unique
idempotency keys, bench/money.lua) through the gateway at each connection count
(--connections, default 8 32 128 512). During each run:

  - CPU per process: utime + stime from /proc/<pid>/stat of every process of the stack,
    of Postgres' backends (the server's processes) and of wrk, as cores used, and per
    transfer (microseconds);
  - Postgres wait events: pg_stat_activity sampled every 200 ms, the share of active
    backends of the wallet database in each wait_event_type:wait_event (CPU: none);

A configuration saturates at the first connection count whose throughput is less than
10% above the previous one's; the bottleneck there is the process group using the most
of a core (wallet replicas summed, Postgres, Traefik, ...). Then, on the last stack,
the ledger of one wallet is grown to 10^4, 10^6 and 10^7 entries (in SQL) and `make
bench`'s reads are measured at each: history's first page, a keyset page (`after`), a
transaction's ledger, a statement and a balance at a time.

Written to bench/results/scale.json, drawn in bench/results/scale.png. Long: about 15
minutes at the defaults (BENCH_QUICK=1: 5 s runs, 8 and 32 connections, 1 and 2
replicas, reads to 10^5).

    .venv/bin/python bench/scale.py [--seconds 12] [--replicas 1 2 4] [--connections 8 32 128 512]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parent))

import itertools

import bench as b

QUICK = os.environ.get("BENCH_QUICK") == "1"
RESULTS = b.ROOT / "bench" / "results" / ("scale-quick" if QUICK else "scale")
HZ = os.sysconf("SC_CLK_TCK")


def _ticks(pid: int) -> int:
    fields = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime


def groups(stack: b.Stack) -> dict[int, str]:
    """Every process that serves a transfer, by group: the stack's (wallet replicas as
    `wallet`), Postgres' server processes and wrk's."""
    out: dict[int, str] = {}
    by_port = {str(port): name for name, port in (stack.ports or {}).items()}
    for pid in b.tree(stack.process.pid)[1:] if stack.process else []:
        proc = Path("/proc") / str(pid)
        try:
            comm = (proc / "comm").read_text().strip()
            cmd = [c.decode() for c in (proc / "cmdline").read_bytes().split(b"\0") if c]
        except OSError:
            continue
        if comm == "sh":
            continue
        if name := b.app_name(cmd, by_port):
            out[pid] = "wallet" if name.startswith("wallet") else name
        elif any(Path(c).name.endswith("-relay") for c in cmd):
            out[pid] = "relays"
        elif any(Path(c).name == "dramatiq" for c in cmd):
            out[pid] = "notifier"
        elif comm.startswith("traefik"):
            out[pid] = "traefik"
        elif comm.startswith("redis"):
            out[pid] = "redis"
        else:
            out[pid] = "launcher"
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) in out:
            continue
        try:
            comm = (proc / "comm").read_text().strip()
        except OSError:
            continue
        if comm in ("postgres", "postmaster"):
            out[int(proc.name)] = "postgres"
        elif comm == "wrk":
            out[int(proc.name)] = "wrk"
    return out


def cpu(pids: dict[int, str]) -> dict[int, int]:
    ticks = {}
    for pid in pids:
        try:
            ticks[pid] = _ticks(pid)
        except (OSError, IndexError, ValueError):
            continue
    return ticks


class WaitSampler(threading.Thread):
    """pg_stat_activity of the wallet database, every 200 ms: what its active backends wait on."""

    def __init__(self, admin_url: str, database: str) -> None:
        super().__init__(daemon=True)
        self.engine = create_engine(admin_url, pool_size=1)
        self.database = database
        self.stop = threading.Event()
        self.events: Counter[str] = Counter()
        self.samples = 0

    def run(self) -> None:
        query = text(
            "SELECT coalesce(wait_event_type || ':' || wait_event, 'CPU') FROM pg_stat_activity"
            " WHERE datname = :db AND state = 'active' AND pid <> pg_backend_pid()"
        )
        with self.engine.connect() as conn:
            while not self.stop.wait(0.2):
                self.samples += 1
                for (event,) in conn.execute(query, {"db": self.database}):
                    self.events[event] += 1
                conn.commit()
        self.engine.dispose()

    def shares(self) -> dict[str, float]:
        total = sum(self.events.values()) or 1
        return {k: round(v / total, 3) for k, v in self.events.most_common(6)}


def _pg_counters(admin_url: str, database: str) -> tuple[int, int]:
    """(commits of the wallet database, WAL bytes of the server so far)."""
    engine = create_engine(admin_url)
    with engine.connect() as conn:
        commits = conn.execute(
            text("SELECT xact_commit FROM pg_stat_database WHERE datname = :db"), {"db": database}
        ).scalar_one()
        wal = conn.execute(text("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")).scalar_one()
    engine.dispose()
    return int(commits), int(wal)


def transfers(stack: b.Stack, wallets: Path, admin_url: str, database: str, seconds: float, conns: int) -> dict:
    pids = groups(stack)
    commits0, wal0 = _pg_counters(admin_url, database)
    sampler = WaitSampler(admin_url, database)
    sampler.start()
    before, started = cpu(pids), time.monotonic()
    # wrk itself is measured too: it starts after `before`, so its ticks all count.
    result: dict[str, Any] = {}
    failed: list[Exception] = []
    done = threading.Event()

    def load() -> None:
        try:
            result.update(
                b.wrk(stack.url, "money.lua", seconds, conns, BENCH_WALLETS=str(wallets), BENCH_KIND="transfer")
            )
        except Exception as exc:  # noqa: BLE001  (raised below, not left to hang the wait for it)
            failed.append(exc)
        finally:
            done.set()

    worker = threading.Thread(target=load)
    worker.start()
    time.sleep(1)
    wrk_pids = {pid: "wrk" for pid, g in groups(stack).items() if g == "wrk"}
    pids.update(wrk_pids)
    wrk_ticks: dict[int, int] = {}
    while not done.wait(0.5):
        wrk_ticks.update(cpu(wrk_pids))
    worker.join()
    if failed:
        sampler.stop.set()
        raise failed[0]
    elapsed = time.monotonic() - started
    after = cpu(pids)
    sampler.stop.set()
    sampler.join()
    after.update(wrk_ticks)
    used: dict[str, float] = defaultdict(float)
    for pid, group in pids.items():
        if pid in after:
            used[group] += (after[pid] - before.get(pid, 0)) / HZ
    cores = {g: round(s / elapsed, 2) for g, s in sorted(used.items(), key=lambda kv: -kv[1]) if s > 0}
    done_transfers = result["rps"] * seconds
    commits1, wal1 = _pg_counters(admin_url, database)
    per = max(done_transfers, 1)
    return {
        **result,
        # Everything the stack commits meanwhile (relays, the notifier's confirmations) counts.
        "commits_per_transfer": round((commits1 - commits0) / per, 2),
        "wal_bytes_per_transfer": round((wal1 - wal0) / per),
        "cores": cores,
        "cpu_us_per_transfer": {g: round(s * 1e6 / done_transfers) for g, s in used.items() if s > 0}
        if done_transfers
        else {},
        "wait_events": sampler.shares(),
    }


def saturation(curve: list[dict[str, Any]]) -> dict[str, Any]:
    point = curve[-1]
    for previous, current in itertools.pairwise(curve):
        if current["rps"] < previous["rps"] * 1.10:
            point = previous
            break
    top = max(point["cores"].items(), key=lambda kv: kv[1]) if point["cores"] else ("?", 0)
    return {"connections": point["connections"], "rps": point["rps"], "bottleneck": top[0], "its_cores": top[1]}


def footprint(stack: b.Stack, env: dict[str, str], admin_url: str, database: str) -> dict[str, Any]:
    """What a transfer leaves behind: bytes of the ledger tables and their indexes per
    transaction, outbox rows and dead letters per transaction, and Redis memory per
    idempotency key and per rate-limiter bucket."""
    import redis

    owner = create_engine(env.get("WALLET_MIGRATION_DATABASE_URL") or env["WALLET_DATABASE_URL"])
    with owner.connect() as conn:
        txns = conn.execute(text("SELECT count(*) FROM transactions")).scalar_one()
        ledger_bytes = conn.execute(
            text(
                "SELECT sum(pg_total_relation_size(c)) FROM unnest(ARRAY['transactions', 'ledger_entries',"
                " 'idempotency_records', 'outbox']::regclass[]) c"
            )
        ).scalar_one()
        by_table = dict(
            conn.execute(
                text(
                    "SELECT relname, pg_total_relation_size(oid) FROM pg_class WHERE relname IN"
                    " ('transactions', 'ledger_entries', 'idempotency_records', 'outbox')"
                )
            ).all()
        )
        outbox = conn.execute(text("SELECT count(*) FROM outbox")).scalar_one()
        dead = conn.execute(text("SELECT count(*) FROM outbox WHERE outcome = 'dead_lettered'")).scalar_one()
    owner.dispose()
    r = redis.Redis.from_url(stack_redis_url(stack))
    # Redis keys by family (their first two segments: idem:resp, notifier:sending, the
    # gateway's limiter buckets, ...): how many, and the mean MEMORY USAGE of up to 500.
    families: dict[str, list[bytes]] = defaultdict(list)
    for k in r.scan_iter("*", count=1000):
        parts = k.decode(errors="replace").split(":")
        families[":".join(parts[:2]) if len(parts) > 1 else "(no prefix)"].append(k)
    redis_keys = {
        family: {
            "keys": len(keys),
            "mean_bytes": round(sum(r.memory_usage(k) or 0 for k in keys[:500]) / len(keys[:500])),
        }
        for family, keys in sorted(families.items(), key=lambda kv: -len(kv[1]))
    }
    out = {
        "transactions": txns,
        "bytes_per_transaction": {
            "ledger (transactions + entries)": round((by_table["transactions"] + by_table["ledger_entries"]) / txns),
            "idempotency records (kept 24 h)": round(by_table["idempotency_records"] / txns),
            "outbox (purged once confirmed)": round(by_table["outbox"] / txns),
            "all four": round(ledger_bytes / txns),
        },
        "outbox_rows_per_transaction": round(outbox / txns, 2),
        "dead_letters_per_transaction": round(dead / txns, 4),
        "redis_keys": redis_keys,
    }
    r.close()
    return out


def stack_redis_url(stack: b.Stack) -> str:
    return f"redis://127.0.0.1:{(stack.ports or {})['redis']}/0"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5 if QUICK else 12)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2] if QUICK else [1, 2, 4])
    parser.add_argument("--connections", type=int, nargs="+", default=[8, 32] if QUICK else [8, 32, 128, 512])
    parser.add_argument(
        "--database-url",
        default=os.environ.get("BENCH_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"),
    )
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("bench-scale: wrk is not installed (make bench-scale installs it with apt-get)")
    os.environ["TEST_DATABASE_URL"] = args.database_url
    from e2e.conftest import postgres_stack_env

    began = datetime.now(UTC)
    figures: dict[str, Any] = {"curves": {}, "saturation": {}, "reads": {}}
    for n, replicas in enumerate(args.replicas):
        work = Path(tempfile.mkdtemp(prefix="wallet-scale-"))
        env = postgres_stack_env(f"scale{os.getpid()}")
        if env is None:
            sys.exit("bench-scale: needs BENCH_DATABASE_URL's Postgres")
        b.progress(f"starting the stack with {replicas} wallet replica(s)")
        stack = b.start_load_stack(work / "var", WALLET_REPLICAS=str(replicas), **env)
        try:
            with httpx.Client(base_url=stack.url, timeout=30) as api:
                users = b.fund(api, 20 if QUICK else b.WALLETS)
            wallets = work / "wallets.txt"
            wallets.write_text("".join(f"{t} {w}\n" for t, w, _ in users))
            database = make_url(env["WALLET_DATABASE_URL"]).database or ""
            curve = []
            for conns in args.connections:
                point = transfers(stack, wallets, args.database_url, database, args.seconds, conns)
                point["connections"] = conns
                b.progress(f"  {replicas} replica(s), {conns} connections: cores {point['cores']}")
                b.progress(f"  waits {point['wait_events']}")
                curve.append(point)
            figures["curves"][str(replicas)] = curve
            figures["saturation"][str(replicas)] = saturation(curve)
            if n == len(args.replicas) - 1:
                figures["footprint"] = footprint(stack, env, args.database_url, database)
                token, wallet, _ = users[0]
                sizes = (10**4, 10**5) if QUICK else (10**4, 10**6, 10**7)
                run = {"seconds": min(args.seconds, 8), "connections": 32}
                by_size: dict[str, dict[str, Any]] = defaultdict(dict)
                for name, r in b.reads(stack, env, token, wallet, sizes, run, chain=False).items():
                    label, size = re.match(r"GET (.+) at (\S+) entries", name).groups()  # type: ignore[union-attr]
                    by_size[label][size] = r
                figures["reads"] = dict(by_size)
        finally:
            b.progress("stopping the stack")
            stack.stop()
            b.drop_databases(env)
    figures["run"] = {
        "started": began.isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - b.T0),
        "seconds": args.seconds,
        "cores": os.cpu_count(),
        "quick": QUICK,
    }
    report(figures)


def report(figures: dict[str, Any]) -> None:
    print(f"\ntransfers through the gateway, Postgres, {os.cpu_count()} cores shared with wrk and Postgres")
    print(f"{'replicas':>8} {'conns':>6} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}  cores used by the busiest")
    for replicas, curve in figures["curves"].items():
        for p in curve:
            busiest = ", ".join(f"{g} {c:.2f}" for g, c in list(p["cores"].items())[:4])
            bad = f"  non-2xx {p['non2xx']}" if p["non2xx"] else ""
            print(
                f"{replicas:>8} {p['connections']:>6} {p['rps']:>8.0f} {p['p50']:>8.1f} {p['p99']:>8.1f}  {busiest}{bad}"
            )
    for replicas, s in figures["saturation"].items():
        print(
            f"{replicas} replica(s) saturate at {s['connections']} connections, {s['rps']:.0f}/s;"
            f" the busiest there: {s['bottleneck']} ({s['its_cores']:.2f} cores)"
        )
    for replicas, curve in figures["curves"].items():
        top = curve[-1]
        print(f"{replicas} replica(s) at {top['connections']} connections, Postgres waits: {top['wait_events']}")
        print(f"  CPU per transfer (us): {top['cpu_us_per_transfer']}")
        print(
            f"  Postgres per transfer: {top['commits_per_transfer']} commits, {top['wal_bytes_per_transfer']} WAL bytes"
        )
    if figures.get("footprint"):
        print(f"footprint: {json.dumps(figures['footprint'])}")
    for label, by_size in figures["reads"].items():
        cells = ", ".join(f"{size}: {r['rps']:.0f}/s p99 {r['p99']:.1f} ms" for size, r in by_size.items())
        print(f"GET {label}: {cells}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.with_suffix(".json").write_text(json.dumps(b._finite(figures), indent=2) + "\n")
    plot(figures, RESULTS.with_suffix(".png"))
    print(f"figures: {RESULTS.relative_to(b.ROOT)}.json, drawn in {RESULTS.relative_to(b.ROOT)}.png")


def plot(figures: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rps, ax_p99, ax_reads) = plt.subplots(1, 3, figsize=(18, 5.5))
    for replicas, curve in figures["curves"].items():
        conns = [p["connections"] for p in curve]
        ok = [p["rps"] - p["non2xx"] / figures["run"]["seconds"] for p in curve]  # refusals are not throughput
        ax_rps.plot(conns, ok, marker="o", label=f"{replicas} replica(s)")
        ax_p99.plot(conns, [p["p99"] for p in curve], marker="o", label=f"{replicas} replica(s) p99")
        ax_p99.plot(conns, [p["p50"] for p in curve], marker=".", linestyle=":", label=f"{replicas} replica(s) p50")
    for ax in (ax_rps, ax_p99):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("wrk connections")
        ax.legend(fontsize=8)
    ax_rps.set_ylabel("transfers/s answered 2xx")
    ax_rps.set_ylim(bottom=0)
    ax_rps.set_title("throughput")
    ax_p99.set_yscale("log")
    ax_p99.set_ylabel("latency, ms (log)")
    ax_p99.set_title("latency")
    for label, by_size in figures["reads"].items():
        sizes = list(by_size)
        ax_reads.plot(sizes, [by_size[s]["rps"] for s in sizes], marker="o", label=label)
    ax_reads.set_xlabel("ledger entries")
    ax_reads.set_ylabel("requests/s (32 connections)")
    ax_reads.set_title("reads as the ledger grows")
    ax_reads.legend(fontsize=8)
    run = figures["run"]
    fig.suptitle(f"make bench-scale {run['started']}: {run['seconds']:.0f} s per point, {run['cores']} cores")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    main()
