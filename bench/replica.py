"""Reads on a streaming replica (`WALLET_READ_DATABASE_URL`, deploy/SCALING.md), measured.

    .venv/bin/python bench/replica.py [--entries 100000] [--seconds 10] [--port 5442]

Builds a Postgres 15 primary of its own (initdb in a temporary directory, on --port) and a
streaming replica of it (pg_basebackup -R, on --port + 1), both run as the `postgres` user
with Debian's binaries; the machine's own Postgres is not touched. Then starts the stack
(two wallet replicas) on the primary twice: with history and ledgers read from the
primary, and with WALLET_READ_DATABASE_URL on the replica. Each time one user's wallet is
grown to --entries ledger entries, and wrk reads its history for --seconds while a second
wrk moves money (transfers among 100 wallets): printed per run, reads/s, transfers/s and
their p99, the CPU the primary's and the replica's server processes used, and the
replica's replay lag (`pg_last_xact_replay_timestamp`) sampled during the run. Both
clusters are stopped and removed at the end. Figures, not pass/fail.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench as b
import scale

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def as_postgres(*cmd: str) -> None:
    subprocess.run(["runuser", "-u", "postgres", "--", *cmd], check=True, capture_output=True)


def clusters(root: Path, port: int) -> tuple[Path, Path]:
    """A primary on `port` and its streaming replica on `port + 1`, started."""
    primary, replica = root / "primary", root / "replica"
    shutil.chown(root, "postgres")
    as_postgres(str(PG_BIN / "initdb"), "-D", str(primary), "--auth=trust", "-U", "postgres")
    with (primary / "postgresql.conf").open("a") as conf:
        conf.write(f"port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{root}'\n")
        conf.write("max_connections = 200\nwal_level = replica\nmax_wal_senders = 4\n")
    with (primary / "pg_hba.conf").open("a") as hba:
        hba.write("host replication all 127.0.0.1/32 trust\n")
    as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(primary), "-l", str(root / "primary.log"), "-w", "start")
    as_postgres(
        str(PG_BIN / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
        "-D", str(replica), "-R", "-X", "stream",
    )  # fmt: skip
    with (replica / "postgresql.conf").open("a") as conf:
        conf.write(f"port = {port + 1}\nhot_standby = on\n")
    as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(replica), "-l", str(root / "replica.log"), "-w", "start")
    return primary, replica


def stop(root: Path) -> None:
    for name in ("replica", "primary"):
        if (root / name / "postmaster.pid").exists():
            pg_ctl = [str(PG_BIN / "pg_ctl"), "-D", str(root / name), "-m", "fast", "stop"]
            subprocess.run(["runuser", "-u", "postgres", "--", *pg_ctl], check=False, capture_output=True)


def server_pids(data: Path) -> list[int]:
    """The postmaster of `data` and its children."""
    postmaster = int((data / "postmaster.pid").read_text().split()[0])
    return [postmaster, *(p for p, parent in b._parents().items() if parent == postmaster)]


class LagSampler(threading.Thread):
    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.engine = create_engine(url)
        self.stop = threading.Event()
        self.lags: list[float] = []

    def run(self) -> None:
        query = text("SELECT extract(epoch FROM now() - pg_last_xact_replay_timestamp())")
        while not self.stop.wait(0.5):
            with self.engine.connect() as conn:
                lag = conn.execute(query).scalar()
            if lag is not None:
                self.lags.append(float(lag) * 1000)
        self.engine.dispose()


def one_run(root: Path, port: int, on_replica: bool, entries: int, seconds: float) -> dict[str, Any]:
    base = f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    os.environ["TEST_DATABASE_URL"] = base
    from e2e.conftest import postgres_stack_env

    env = postgres_stack_env(f"rep{int(on_replica)}")
    if env is None:
        raise SystemExit("no Postgres")
    if on_replica:
        env["WALLET_READ_DATABASE_URL"] = (
            make_url(env["WALLET_DATABASE_URL"]).set(port=port + 1).render_as_string(hide_password=False)
        )
    work = Path(tempfile.mkdtemp(prefix="wallet-replica-"))
    stack = b.start_load_stack(work / "var", **env)
    try:
        with httpx.Client(base_url=stack.url, timeout=30) as api:
            users = b.fund(api, 100)
        wallets = work / "wallets.txt"
        wallets.write_text("".join(f"{t} {w}\n" for t, w, _ in users))
        token, wallet, _ = users[0]
        b.seed_ledger(env["WALLET_MIGRATION_DATABASE_URL"], wallet, entries, chain=False)
        time.sleep(2)  # the replica replays the seed
        pids = {pid: "primary" for pid in server_pids(root / "primary")}
        pids |= {pid: "replica" for pid in server_pids(root / "replica")}
        before = scale.cpu(pids)
        sampler = LagSampler(f"postgresql+psycopg://postgres@127.0.0.1:{port + 1}/postgres")
        sampler.start()
        moves: dict[str, Any] = {}
        mover = threading.Thread(
            target=lambda: moves.update(
                b.wrk(stack.url, "money.lua", seconds, 16, BENCH_WALLETS=str(wallets), BENCH_KIND="transfer")
            )
        )
        mover.start()
        path = "/transaction/history?limit=10&offset=0"
        reads = b.wrk(f"{stack.url}{path}", "read.lua", seconds, 16, BENCH_TOKEN=token, BENCH_PATH=path)
        mover.join()
        sampler.stop.set()
        sampler.join()
        after = scale.cpu({pid: g for pid, g in pids.items()})
        used = {"primary": 0.0, "replica": 0.0}
        for pid, group in pids.items():
            if pid in after:
                used[group] += (after[pid] - before.get(pid, 0)) / scale.HZ / seconds
        lags = sorted(sampler.lags) or [float("nan")]
        return {
            "reads_on": "replica" if on_replica else "primary",
            "reads": reads,
            "transfers": moves,
            "cores": {k: round(v, 2) for k, v in used.items()},
            "replay_lag_ms": {"p50": lags[len(lags) // 2], "max": lags[-1]},
        }
    finally:
        stack.stop()
        b.drop_databases(env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--port", type=int, default=5442)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="wallet-pg-"))
    try:
        b.progress("a primary and its streaming replica")
        clusters(root, args.port)
        runs = [one_run(root, args.port, on_replica, args.entries, args.seconds) for on_replica in (False, True)]
    finally:
        stop(root)
        shutil.rmtree(root, ignore_errors=True)
    print(f"\nhistory reads and transfers at once, {args.entries:,} entries, wrk 16 + 16 connections")
    for r in runs:
        print(
            f"reads on the {r['reads_on']:<7}: history {r['reads']['rps']:.0f}/s p99 {r['reads']['p99']:.0f} ms;"
            f" transfers {r['transfers']['rps']:.0f}/s p99 {r['transfers']['p99']:.0f} ms;"
            f" cores: primary {r['cores']['primary']}, replica {r['cores']['replica']};"
            f" replay lag p50 {r['replay_lag_ms']['p50']:.0f} ms, max {r['replay_lag_ms']['max']:.0f} ms"
        )


if __name__ == "__main__":
    main()
