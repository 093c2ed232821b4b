"""`make bench`: the platform's speed against its own ceiling, in one run on one machine.

Starts the stack with the `make run` launcher on fresh Postgres databases (BENCH_DATABASE_URL's
server), two wallet replicas, and the Brevo stand-in as the email API; funds 100 wallets
through the API; then drives it with wrk (32 connections) through the gateway:

  - GET /.well-known/jwks.json (a trivial endpoint behind the same gateway): the ceiling;
  - PATCH /transaction/transfer, deposit, withdraw: a unique idempotency key per request,
    random payer (and payee) among the 100, every request authenticated as the payer;
  - receipts: time from the movement's commit (its outbox row) to the Brevo call, p50/p99,
    and the outbox backlog when the load stops;
  - GET /transaction/history and /transaction/{id}/ledger for a user whose wallet has
    10^4, then 10^6 ledger entries (seeded in SQL), to show reads do not grow with the table;
  - resident memory of every process at the end;

then runs wallet-audit. Figures are printed; nothing here passes or fails on speed.

    .venv/bin/python bench/bench.py [--seconds 15] [--connections 32]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import httpx
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT / "tests"))

from e2e.conftest import drop_databases, free_port, start_stack  # noqa: E402

WALLETS = 100
# Emails may lag under load, requests may not: the notifier, the relays and the Brevo
# stand-in run at this niceness, as if on machines of their own.
BACKGROUND_NICE = 10


def wrk(url: str, script: str, seconds: float, connections: int, **env: str) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{int(seconds)}s", "--latency", "-s", str(ROOT / "bench" / script), url],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout

    def ms(label: str) -> float:
        match = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not match:
            return float("nan")
        value, unit = float(match.group(1)), match.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "rps": rps,
        "p50": ms("50"),
        "p99": ms("99"),
        "requests": total,
        "non2xx": int(bad.group(1)) if bad else 0,
        "socket_errors": sum(map(int, errors.groups())) if errors else 0,
    }


def fund(api: httpx.Client, n: int) -> list[tuple[str, int, str]]:
    users = []
    for i in range(n):
        email = f"bench-{uuid.uuid4().hex[:10]}@example.com"
        api.post(
            "/signup", json={"first_name": "Bench", "last_name": f"User{i}", "email": email, "password": "benchpass123"}
        ).raise_for_status()
        token = api.post("/token", data={"username": email, "password": "benchpass123"}).json()["access_token"]
        wallet = api.post(
            "/wallet", json={"balance": 10**11, "currency": "USD"}, headers={"Authorization": f"Bearer {token}"}
        )
        wallet.raise_for_status()
        users.append((token, int(wallet.json()["id"]), email))
    return users


def seed_ledger(engine_url: str, wallet_id: int, total_entries: int) -> int:
    """Grow the ledger to `total_entries` with 1-cent deposits into one wallet, in SQL, keeping
    every invariant (balanced entries, running snapshots, balances) so the audit stays clean."""
    engine = create_engine(engine_url)
    with engine.begin() as conn:
        have = conn.execute(text("SELECT count(*) FROM ledger_entries")).scalar_one()
        n = max((total_entries - have) // 2, 0)
        if n:
            system, sys_balance = conn.execute(
                text(
                    "SELECT id, balance FROM wallets WHERE kind = 'system' AND currency = 'USD' "
                    "ORDER BY shard LIMIT 1 FOR UPDATE"
                )
            ).one()
            user_balance, owner = conn.execute(
                text("SELECT balance, user_id FROM wallets WHERE id = :w FOR UPDATE"), {"w": wallet_id}
            ).one()
            first = conn.execute(text("SELECT coalesce(max(id), 0) + 1 FROM transactions")).scalar_one()
            conn.execute(
                text(
                    "INSERT INTO transactions (id, type, amount, currency, from_wallet_id, to_wallet_id, initiated_by, "
                    "created_at) SELECT :first + g, 'deposit', 1, 'USD', :sys, :w, :owner, now() "
                    "FROM generate_series(0, :n - 1) g"
                ),
                {"first": first, "sys": system, "w": wallet_id, "owner": owner, "n": n},
            )
            conn.execute(
                text(
                    "INSERT INTO ledger_entries (transaction_id, wallet_id, entry_type, amount, currency, "
                    "balance_snapshot, created_at) "
                    "SELECT :first + g, :sys, 'debit', 1, 'USD', :sb - g - 1, now() FROM generate_series(0, :n - 1) g "
                    "UNION ALL "
                    "SELECT :first + g, :w, 'credit', 1, 'USD', :ub + g + 1, now() FROM generate_series(0, :n - 1) g "
                    "ORDER BY 1, 3 DESC"
                ),
                {"first": first, "sys": system, "w": wallet_id, "sb": sys_balance, "ub": user_balance, "n": n},
            )
            conn.execute(
                text("SELECT setval(pg_get_serial_sequence('transactions', 'id'), :last)"), {"last": first + n - 1}
            )
            conn.execute(text("UPDATE wallets SET balance = balance - :n WHERE id = :sys"), {"n": n, "sys": system})
            conn.execute(text("UPDATE wallets SET balance = balance + :n WHERE id = :w"), {"n": n, "w": wallet_id})
        conn.execute(text("ANALYZE"))
        last = conn.execute(
            text("SELECT max(transaction_id) FROM ledger_entries WHERE wallet_id = :w"), {"w": wallet_id}
        ).scalar_one()
    engine.dispose()
    return int(last)


def receipt_latency(stub: httpx.Client, wallet_db: str, since: float, drain_s: float = 180) -> dict[str, float]:
    """Commit (outbox row) to Brevo call for every receipt of movements since `since`, after
    waiting for the backlog to drain; the backlog is counted when the load stops."""
    engine = create_engine(wallet_db)
    query = text(
        "SELECT id, created_at FROM outbox WHERE actor_name = 'notifier.send_receipt' AND created_at >= :since"
    )
    with engine.connect() as conn:
        backlog = conn.execute(text("SELECT count(*) FROM outbox WHERE published_at IS NULL")).scalar_one()
        created = {row.id: row.created_at.timestamp() for row in conn.execute(query, {"since": _utc(since)})}
    engine.dispose()
    stopped = time.time()
    arrived: dict[str, float] = {}
    while time.time() < stopped + drain_s:
        arrived = {r["key"]: r["at"] for r in stub.get("/_stub/emails").json()["received"] if r["key"] in created}
        if len(arrived) >= len(created):
            break
        time.sleep(0.5)
    delays = sorted((arrived[k] - created[k]) * 1000 for k in arrived)
    if not delays:
        return {"p50": float("nan"), "p99": float("nan"), "backlog": backlog, "receipts": 0}
    return {
        "p50": statistics.median(delays),
        "p99": delays[max(int(len(delays) * 0.99) - 1, 0)],
        "backlog": backlog,
        "receipts": len(delays),
        "missing": len(created) - len(delays),
        "drained_s": max(arrived.values()) - stopped,
    }


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)


def memory(launcher_pid: int) -> dict[str, float]:
    parents: dict[int, int] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    rss: dict[str, float] = defaultdict(float)
    frontier = [launcher_pid]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid != parent:
                continue
            frontier.append(pid)
            try:
                comm = (Path("/proc") / str(pid) / "comm").read_text().strip()
                status = (Path("/proc") / str(pid) / "status").read_text()
            except OSError:
                continue
            kb = re.search(r"VmRSS:\s+(\d+) kB", status)
            cmd = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
            name = next((c.decode().split(":")[0] for c in cmd if b"main:create_app" in c or b".worker" in c), comm)
            if kb and comm != "sh":
                rss[name] += int(kb.group(1)) / 1024
    return dict(rss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument(
        "--database-url",
        default=os.environ.get("BENCH_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"),
    )
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("bench: wrk is not installed (make bench installs it with apt-get)")
    work = Path(tempfile.mkdtemp(prefix="wallet-bench-"))
    os.environ["TEST_DATABASE_URL"] = args.database_url
    from e2e.conftest import postgres_stack_env

    env = postgres_stack_env(f"bench{os.getpid()}")
    assert env is not None
    stub_port = free_port()
    # Brevo is somebody else's server: its stand-in yields the CPU, like the notifier and the
    # relays (STACK_BACKGROUND_NICE), to the request path being measured.
    stub_cmd = [str(ROOT / "tests/tools/brevo_stub.py"), "--port", str(stub_port), "--api-key", "bench-key"]
    stub_proc = subprocess.Popen(
        ["nice", "-n", str(BACKGROUND_NICE), sys.executable, *stub_cmd], stdout=subprocess.DEVNULL
    )
    high = {f"GATEWAY_AUTH_RATE_{k}": "100000" for k in ("AVERAGE", "BURST")}  # setup signs up 100 users
    stack = start_stack(
        work / "var",
        NOTIFIER_BREVO_API_KEY="bench-key",
        NOTIFIER_BREVO_BASE_URL=f"http://127.0.0.1:{stub_port}",
        AUTH_LOG_LEVEL="WARNING",
        WALLET_LOG_LEVEL="WARNING",
        NOTIFIER_LOG_LEVEL="WARNING",
        STACK_BACKGROUND_NICE=str(BACKGROUND_NICE),
        **high,
        **env,
    )
    results: dict[str, dict[str, float]] = {}
    try:
        with (
            httpx.Client(base_url=stack.url, timeout=30) as api,
            httpx.Client(base_url=f"http://127.0.0.1:{stub_port}") as stub,
        ):
            users = fund(api, WALLETS)
            wallets = work / "wallets.txt"
            wallets.write_text("".join(f"{t} {w}\n" for t, w, _ in users))
            run = {"seconds": args.seconds, "connections": args.connections}
            results["GET /.well-known/jwks.json (trivial)"] = wrk(
                f"{stack.url}/.well-known/jwks.json",
                "read.lua",
                BENCH_TOKEN="x",
                BENCH_PATH="/.well-known/jwks.json",
                **run,
            )
            time.sleep(3)  # let the receipts of the funding drain
            stub.post("/_stub/reset")
            started = time.time()
            results["PATCH /transaction/transfer"] = wrk(
                stack.url, "money.lua", BENCH_WALLETS=str(wallets), BENCH_KIND="transfer", **run
            )
            results["receipts: commit to Brevo call"] = receipt_latency(stub, env["WALLET_DATABASE_URL"], started)
            for kind in ("deposit", "withdraw"):
                results[f"PATCH /transaction/{kind}"] = wrk(
                    stack.url, "money.lua", BENCH_WALLETS=str(wallets), BENCH_KIND=kind, **run
                )
            token, wallet, _ = users[0]
            for size in (10**4, 10**6):
                txn = seed_ledger(env.get("WALLET_MIGRATION_DATABASE_URL") or env["WALLET_DATABASE_URL"], wallet, size)
                for label, path in (
                    ("history", "/transaction/history?limit=10&offset=0"),
                    ("ledger", f"/transaction/{txn}/ledger"),
                ):
                    results[f"GET {label} at {size:.0e} entries"] = wrk(
                        f"{stack.url}{path}",
                        "read.lua",
                        BENCH_TOKEN=token,
                        BENCH_PATH=path,
                        **{**run, "seconds": min(args.seconds, 10)},
                    )
            rss = memory(stack.process.pid) if stack.process else {}
        audit = subprocess.run(
            [str(BIN / "wallet-audit"), "--database-url", env["WALLET_DATABASE_URL"]],
            capture_output=True,
            text=True,
            check=False,
        )
    finally:
        stack.stop()
        stub_proc.terminate()
        drop_databases(env)  # also when a run fails half way
    report(results, rss, audit.stdout.strip(), args)
    sys.exit(audit.returncode)


def report(results: dict[str, dict[str, float]], rss: dict[str, float], audit: str, args: argparse.Namespace) -> None:
    print(
        f"\nwrk -t2 -c{args.connections}, {args.seconds:.0f}s per run, 2 wallet replicas, Postgres, "
        f"{os.cpu_count()} cores shared with wrk"
    )
    print(f"{'measure':<40}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}  notes")
    for name, r in results.items():
        keys = ("non2xx", "socket_errors", "backlog", "receipts", "missing", "drained_s")
        notes = ", ".join(f"{k} {r[k]:.0f}" for k in keys if r.get(k))
        print(f"{name:<40}{r.get('rps', float('nan')):>9.0f}{r['p50']:>9.1f}{r['p99']:>9.1f}  {notes}")
    trivial = results["GET /.well-known/jwks.json (trivial)"]["rps"]
    transfers = results["PATCH /transaction/transfer"]["rps"]
    print(f"transfers / trivial endpoint = {transfers / trivial:.2f}")
    print("resident memory at the end (MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(rss.items())))
    print(audit)
    (ROOT / "bench" / "last-run.json").write_text(json.dumps({"results": results, "rss": rss}, indent=2))


if __name__ == "__main__":
    main()
