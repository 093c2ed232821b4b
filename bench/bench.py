"""`make bench`: the platform's speed against its own ceiling, in one run on one machine.

Starts the stack with the `make run` launcher on fresh Postgres databases (BENCH_DATABASE_URL's
server), two wallet replicas, and the Brevo stand-in as the email API; funds 100 wallets
through the API; then drives it with wrk (32 connections) through the gateway:

  - GET /.well-known/jwks.json (a trivial endpoint behind the same gateway): the ceiling;
  - GET /bare: a one-route FastAPI app (bench/bare_app.py, one uvicorn process) behind the
    same Traefik binary and static configuration, the same wrk settings: the bare ceiling,
    and the ratio trivial / bare;
  - PATCH /transaction/transfer, deposit, withdraw: a unique idempotency key per request,
    random payer (and payee) among the 100, every request authenticated as the payer;
  - receipts: time from the movement's commit (its outbox row) to the Brevo call, p50/p99,
    and the outbox backlog when the load stops;
  - transfers at a constant offered rate (bench/pace.py, open loop: 300/s for 60 s), the
    achieved rate, and the receipts of that run: lag p50/p99 and its course over time, with
    the backlog (outbox rows unpublished, receipts committed but not yet at Brevo) sampled
    every second until it drains;
  - GET /transaction/history (first page, and a keyset page `after=` a quarter of the way
    back), /transaction/{id}/ledger, /wallet/statement (its newest 100 lines) and
    /wallet/balance?at= for a user whose wallet has 10^4, then 10^6 ledger entries (seeded
    in SQL), to show reads do not grow with the table;
  - resident memory of every process at the end, and of each process at the start of the
    load, once warm (after the first transfer run) and at the end (growth once warm flagged);
  - PATCH /transaction/transfer on the default SQLite stack once the Postgres one is down:
    what `make run` starts (a SQLite file per service, embedded Redis, one wallet process,
    emails to var/outbox), funded and driven the same way, then wallet-audit on its file
    (`--sqlite-only`: this measure alone, printed as JSON, nothing written);
  - notifier CPU per email (bench/notifier_cpu.py, once the stack is down): 5,000 receipts
    through the real outbox relay, Redis and notifier workers to the Brevo stand-in, the
    workers' CPU time (/proc/<pid>/stat) over the emails sent (the median of three runs),
    with the relay's default emails per message and, alternately, one message per email;

then runs wallet-audit. Figures are printed (progress on stderr as it goes) and written
to bench/results/latest.json, drawn in bench/results/latest.png; nothing here passes or
fails on speed. BENCH_QUICK=1 is a short run for working on this script (3 s per measure,
20 wallets, 10 s paced, no 10^6 ledger), written to bench/results/quick.* instead.

    .venv/bin/python bench/bench.py [--seconds 15] [--connections 32] [--rate 300 --rate-seconds 60]
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
import threading
import time
import uuid
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, text
from sqlalchemy.exc import SQLAlchemyError

from wallet.chain import chain_unchained

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "deploy" / "local"))

from e2e.conftest import Stack, drop_databases, free_port, start_stack  # noqa: E402

from stack import GATEWAY_GO_ENV, traefik_flags  # noqa: E402

QUICK = os.environ.get("BENCH_QUICK") == "1"
WALLETS = 20 if QUICK else 100
RESULTS = ROOT / "bench" / "results" / ("quick" if QUICK else "latest")
TRIVIAL = "GET /.well-known/jwks.json (trivial)"
BARE = "GET /bare: bare FastAPI via Traefik"
# A process's resident memory "grew" when the end of the load finds it this much larger.
GROWTH_MIB, GROWTH_SHARE = 10.0, 0.10
T0 = time.monotonic()


def progress(message: str) -> None:
    print(f"[bench {time.monotonic() - T0:6.0f}s] {message}", file=sys.stderr, flush=True)


# Emails may lag under load, requests may not: the notifier, the relays and the Brevo
# stand-in run at this niceness, as if on machines of their own.
BACKGROUND_NICE = 10


def wrk(url: str, script: str, seconds: float, connections: int, **env: str) -> dict[str, float]:
    progress(f"wrk {script} {url.split('/', 3)[-1][:60]} ({int(seconds)} s, {connections} connections)")
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
    result = {
        "rps": rps,
        "p50": ms("50"),
        "p99": ms("99"),
        "requests": total,
        "non2xx": int(bad.group(1)) if bad else 0,
        "socket_errors": sum(map(int, errors.groups())) if errors else 0,
    }
    progress(f"  -> {rps:.0f} req/s, p50 {result['p50']:.1f} ms, p99 {result['p99']:.1f} ms")
    return result


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


def seed_ledger(engine_url: str, wallet_id: int, total_entries: int, *, chain: bool = True) -> int:
    """Grow the ledger to `total_entries` with 1-cent deposits into one wallet, in SQL, keeping
    every invariant (balanced entries, running snapshots, balances) so the audit stays clean.
    They are a microsecond apart (later ids later, as movements are), so a statement's time
    range selects some of them; the n-th lasts at most n µs past now(), less than the insert
    takes. With `chain` off the entries stay unchained (reads do not look at the hashes;
    chaining 10^7 entries in Python would take a quarter of an hour)."""
    engine = create_engine(engine_url)
    # Requests of the last run may still be finishing in the replicas (wrk closes its
    # connections, the movements they carried commit anyway): wait until no new ones land.
    last, deadline = None, time.monotonic() + 30
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            newest = conn.execute(text("SELECT coalesce(max(id), 0) FROM transactions")).scalar_one()
        if newest == last:
            break
        last = newest
        time.sleep(1)
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
                    "created_at) SELECT :first + g, 'deposit', 1, 'USD', :sys, :w, :owner, now() + g * interval '1 us' "
                    "FROM generate_series(0, :n - 1) g"
                ),
                {"first": first, "sys": system, "w": wallet_id, "owner": owner, "n": n},
            )
            conn.execute(
                text(
                    "INSERT INTO ledger_entries (transaction_id, wallet_id, entry_type, amount, currency, "
                    "balance_snapshot, created_at) "
                    "SELECT :first + g, :sys, 'debit', 1, 'USD', :sb - g - 1, now() + g * interval '1 us' "
                    "FROM generate_series(0, :n - 1) g "
                    "UNION ALL "
                    "SELECT :first + g, :w, 'credit', 1, 'USD', :ub + g + 1, now() + g * interval '1 us' "
                    "FROM generate_series(0, :n - 1) g "
                    "ORDER BY 1, 3 DESC"
                ),
                {"first": first, "sys": system, "w": wallet_id, "sb": sys_balance, "ub": user_balance, "n": n},
            )
            conn.execute(
                text("SELECT setval(pg_get_serial_sequence('transactions', 'id'), :last)"), {"last": first + n - 1}
            )
            conn.execute(text("UPDATE wallets SET balance = balance - :n WHERE id = :sys"), {"n": n, "sys": system})
            conn.execute(text("UPDATE wallets SET balance = balance + :n WHERE id = :w"), {"n": n, "w": wallet_id})
            if chain:
                chain_unchained(conn)  # hash the seeded entries as the service would have (wallet.chain)
        conn.execute(text("ANALYZE"))
        last = conn.execute(
            text("SELECT max(transaction_id) FROM ledger_entries WHERE wallet_id = :w"), {"w": wallet_id}
        ).scalar_one()
    engine.dispose()
    return int(last)


def recent_since(engine_url: str, wallet_id: int, lines: int) -> str:
    """The time of the wallet's `lines`-th newest entry (ISO 8601, Z; its oldest if it has
    fewer): a statement from it has that many lines, however long the ledger before it."""
    engine = create_engine(engine_url)
    with engine.connect() as conn:
        since = conn.execute(
            text(
                "SELECT min(created_at) FROM (SELECT created_at FROM ledger_entries WHERE wallet_id = :w "
                "ORDER BY created_at DESC, transaction_id DESC LIMIT :n) recent"
            ),
            {"w": wallet_id, "n": lines},
        ).scalar_one()
    engine.dispose()
    return str(since.astimezone(UTC).isoformat().replace("+00:00", "Z"))


def _p99(ordered: list[float]) -> float:
    return ordered[max(int(len(ordered) * 0.99) - 1, 0)]


def receipt_latency(
    stub: httpx.Client, wallet_db: str, since: float, drain_s: float = 180, series: bool = False
) -> dict[str, Any]:
    """Commit (outbox row) to Brevo call for every receipt of movements since `since`, after
    waiting for the backlog to drain; the backlog is counted when the load stops. With
    `series`, also the lag per second of commit time (p50, p99, count)."""
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
    progress(f"receipts: waiting for {len(created)} at Brevo ({backlog} outbox rows unpublished)")
    note = stopped + 10
    while time.time() < stopped + drain_s:
        arrived = {r["key"]: r["at"] for r in stub.get("/_stub/received").json()["received"] if r["key"] in created}
        if len(arrived) >= len(created):
            break
        if time.time() >= note:
            progress(f"  {len(arrived)} of {len(created)} receipts at Brevo after {time.time() - stopped:.0f} s")
            note += 10
        time.sleep(0.5)
    delays = sorted((arrived[k] - created[k]) * 1000 for k in arrived)
    if not delays:
        return {"p50": float("nan"), "p99": float("nan"), "backlog": backlog, "receipts": 0}
    result: dict[str, Any] = {
        "p50": statistics.median(delays),
        "p99": _p99(delays),
        "backlog": backlog,
        "receipts": len(delays),
        "missing": len(created) - len(delays),
        "drained_s": max(arrived.values()) - stopped,
    }
    progress(f"  -> receipts p50 {result['p50'] / 1000:.1f} s, p99 {result['p99'] / 1000:.1f} s")
    if series:
        buckets: dict[int, list[float]] = defaultdict(list)
        for k, at in arrived.items():
            buckets[int(created[k] - since)].append((at - created[k]) * 1000)
        result["series"] = [
            {"t": t, "receipts": len(v), "p50": statistics.median(v), "p99": _p99(sorted(v))}
            for t, v in sorted(buckets.items())
        ]
    return result


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)


def memory(launcher_pid: int) -> dict[str, float]:
    parents = _parents()
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


def _parents() -> dict[int, int]:
    parents: dict[int, int] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return parents


def tree(pid: int, parents: dict[int, int] | None = None) -> list[int]:
    """The process and its descendants (in `parents`, a snapshot of _parents(), if given)."""
    parents = _parents() if parents is None else parents
    out, frontier = [pid], [pid]
    while frontier:
        parent = frontier.pop()
        children = [p for p, pp in parents.items() if pp == parent]
        out += children
        frontier += children
    return out


def app_name(cmd: list[str], by_port: dict[str, str]) -> str | None:
    """The stack's name of a uvicorn process (auth, wallet1, docs, ...) from its command
    line, by its --port in `by_port` (port: name); None for any other process."""
    app = next((c.split(":")[0] for c in cmd if c.endswith(":create_app")), None)
    if not app:
        return None
    port = cmd[cmd.index("--port") + 1] if "--port" in cmd[:-1] else ""
    return by_port.get(port, app.split(".")[0])


def processes(stack: Stack) -> dict[str, float]:
    """Resident memory (MiB, VmRSS of /proc/<pid>/status) of each process of the stack, by
    name: auth, wallet1, wallet2, docs, the relays, the notifier and its worker processes,
    Traefik, Redis (the launcher's descendants, less its own forks and the restart loops'
    shells)."""
    if stack.process is None:
        return {}
    by_port = {str(port): name for name, port in (stack.ports or {}).items()}
    parents = _parents()
    labels: dict[int, str] = {}
    rss: dict[str, float] = {}
    for pid in sorted(tree(stack.process.pid, parents)[1:]):
        proc = Path("/proc") / str(pid)
        try:
            comm = (proc / "comm").read_text().strip()
            kb = re.search(r"VmRSS:\s+(\d+) kB", (proc / "status").read_text())
            cmd = [c.decode() for c in (proc / "cmdline").read_bytes().split(b"\0") if c]
        except OSError:
            continue
        if comm == "sh" or not kb or str(ROOT / "deploy" / "local" / "stack.py") in cmd:
            continue  # the restart loops' shells, honcho's forks of the launcher
        names = [Path(c).name for c in cmd]
        if app := app_name(cmd, by_port):
            label = app
        elif relay := next((n for n in names if n.endswith("-relay")), None):
            label = relay
        elif "dramatiq" in names:
            label = "notifier worker" if labels.get(parents.get(pid, 0), "").startswith("notifier") else "notifier"
        else:
            label = {"redis-server": "redis"}.get(comm, comm)
        labels[pid] = label
        unique, n = label, 1
        while unique in rss:
            n += 1
            unique = f"{label} #{n}"
        rss[unique] = int(kb.group(1)) / 1024
    return rss


def memory_growth(start: dict[str, float], warm: dict[str, float], end: dict[str, float]) -> dict[str, dict[str, Any]]:
    """Each process's memory at the start of the load, once warm (after the first transfer
    run: caches, pools and the Go heap sized by the load) and at the end. Flagged when it
    grew from warm to the end by GROWTH_MIB and GROWTH_SHARE: what grows while the same
    load goes on is what would grow for ever."""
    out = {}
    for name in sorted(set(start) | set(warm) | set(end)):
        a, w, b = start.get(name), warm.get(name), end.get(name)
        grew = w is not None and b is not None and b - w >= GROWTH_MIB and b - w >= GROWTH_SHARE * w
        out[name] = {
            "start": a,
            "warm": w,
            "end": b,
            "growth": None if a is None or b is None else b - a,
            "growth_after_warm": None if w is None or b is None else b - w,
            "flagged": grew,
        }
    return out


def start_load_stack(var: Path, **env: str) -> Stack:
    """The stack as scale.py and replica.py load it: logs at WARNING, the gateway's rate
    limits out of the way, the background processes niced, and wallet pools of 8 with no
    overflow (4 replicas x 8 stay inside the server's 100 connections with auth and the
    relays); `env` on top."""
    return start_stack(
        var,
        **{
            **{f"{service}_LOG_LEVEL": "WARNING" for service in ("AUTH", "WALLET", "NOTIFIER")},
            **{f"GATEWAY_{k}_RATE_{x}": "100000" for k in ("AUTH", "MONEY") for x in ("AVERAGE", "BURST")},
            "WALLET_DB_POOL_SIZE": "8",
            "WALLET_DB_MAX_OVERFLOW": "0",
            "STACK_BACKGROUND_NICE": str(BACKGROUND_NICE),
            **env,
        },
    )


def _wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"bench: {url} did not answer 200 within {timeout:.0f} s")


def bare_ceiling(work: Path, seconds: float, connections: int) -> dict[str, float]:
    """bench/bare_app.py on one uvicorn process (the stack's flags) behind the stack's Traefik
    binary and static configuration (gateway/traefik.yml, access log included), one router
    without middlewares to it; driven like the trivial endpoint."""
    app_port, web, ping, metrics = (free_port() for _ in range(4))
    dynamic = work / "bare-dynamic"
    dynamic.mkdir()
    (dynamic / "bare.yml").write_text(
        "http:\n"
        "  routers:\n"
        "    bare:\n"
        "      entryPoints: [web]\n"
        '      rule: "PathPrefix(`/`)"\n'
        "      service: bare\n"
        "  serversTransports:\n"  # as gateway/dynamic/routes.yml's
        "    backend:\n"
        "      maxIdleConnsPerHost: 200\n"
        "      forwardingTimeouts:\n"
        "        responseHeaderTimeout: 30s\n"
        "        idleConnTimeout: 4s\n"
        "  services:\n"
        "    bare:\n"
        "      loadBalancer:\n"
        "        serversTransport: backend\n"
        "        servers:\n"
        f'          - url: "http://127.0.0.1:{app_port}"\n'
    )
    flags = traefik_flags(
        {
            "entryPoints.web.address": f"127.0.0.1:{web}",
            "entryPoints.ping.address": f"127.0.0.1:{ping}",
            "entryPoints.metrics.address": f"127.0.0.1:{metrics}",
            "providers.file.directory": str(dynamic),
            "accessLog.filePath": str(work / "bare-access.json"),
        }
    )
    log = open(work / "bare.log", "wb")  # noqa: SIM115
    app = subprocess.Popen(
        [
            *(str(BIN / "uvicorn"), "--host", "127.0.0.1", "--port", str(app_port), "--no-access-log"),
            *("--log-level", "warning", "--app-dir", str(ROOT / "bench"), "bare_app:app"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    gateway = subprocess.Popen(
        [str(BIN / "traefik"), *flags],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **{k: os.environ.get(k, v) for k, v in GATEWAY_GO_ENV.items()}},
    )
    try:
        progress("bare FastAPI behind Traefik: starting")
        _wait_http(f"http://127.0.0.1:{web}/bare")
        return wrk(
            f"http://127.0.0.1:{web}/bare", "read.lua", seconds, connections, BENCH_TOKEN="x", BENCH_PATH="/bare"
        )
    finally:
        for proc in (gateway, app):
            proc.terminate()
            proc.wait(10)
        log.close()


def _sample_backlog(
    stack: Stack, wallet_db: str, stub_url: str, since: float, samples: list[dict[str, float]], stop: threading.Event
) -> None:
    """Every second: receipts committed since `since` (outbox rows), those at Brevo, and the
    wallet relay's outbox_backlog gauge (rows not yet published to the queue)."""
    engine = create_engine(wallet_db)
    count = text("SELECT count(*) FROM outbox WHERE actor_name = 'notifier.send_receipt' AND created_at >= :since")
    metrics_url = f"http://127.0.0.1:{(stack.ports or {}).get('wallet_relay_metrics')}/metrics"
    next_at = time.time()
    with httpx.Client(timeout=5) as http:
        while not stop.is_set():
            now = time.time()
            try:
                with engine.connect() as conn:
                    committed = int(conn.execute(count, {"since": _utc(since)}).scalar_one())
                delivered = len(http.get(f"{stub_url}/_stub/received").json()["received"])
                gauge = re.search(r"^outbox_backlog\{[^}]*\}\s+(\S+)", http.get(metrics_url).text, re.M)
                samples.append(
                    {
                        "t": round(now - since, 1),
                        "committed": committed,
                        "delivered": delivered,
                        "undelivered": max(committed - delivered, 0),
                        "outbox_backlog": float(gauge.group(1)) if gauge else float("nan"),
                    }
                )
            except (
                OSError,
                ValueError,
                httpx.HTTPError,
                SQLAlchemyError,
            ) as exc:  # a missed sample is not worth failing the run
                progress(f"  backlog sample failed: {exc!r}")
            next_at += 1
            stop.wait(max(next_at - time.time(), 0))
    engine.dispose()


def paced_transfers(
    stack: Stack, stub: httpx.Client, stub_url: str, wallet_db: str, wallets: Path, rate: float, seconds: float
) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, float]]]:
    """bench/pace.py at `rate` transfers/s for `seconds`, the receipts of that run until they
    drain, and the backlog sampled every second meanwhile."""
    stub.post("/_stub/reset")
    started = time.time()
    samples: list[dict[str, float]] = []
    stop = threading.Event()
    sampler = threading.Thread(
        target=_sample_backlog, args=(stack, wallet_db, stub_url, started, samples, stop), daemon=True
    )
    sampler.start()
    progress(f"paced transfers: {rate:.0f}/s offered for {seconds:.0f} s (bench/pace.py, open loop)")
    pacer = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "bench" / "pace.py"),
            stack.url,
            str(wallets),
            f"--rate={rate}",
            f"--seconds={seconds}",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    summary: dict[str, Any] = {}
    assert pacer.stdout is not None
    for line in pacer.stdout:
        data = json.loads(line)
        if "summary" in data:
            summary = data["summary"]
        elif round(data["t"]) % 10 == 0:
            progress(
                f"  {data['t']:.0f} s: sent {data['sent']}, ok {data['ok']}, waiting {data['waiting']}, "
                f"shed {data['shed']}"
            )
    pacer.wait()
    if not summary:
        raise RuntimeError(f"bench: bench/pace.py ended ({pacer.returncode}) without a summary")
    progress(
        f"  -> achieved {summary['achieved_rate']:.0f}/s of {rate:.0f}/s offered, p50 {summary['p50']:.0f} ms, "
        f"p99 {summary['p99']:.0f} ms, pacer late p99 {summary['pacer_late_p99']:.1f} ms"
    )
    receipts = receipt_latency(stub, wallet_db, started, series=True)
    time.sleep(1.5)  # one more sample after the drain
    stop.set()
    sampler.join(10)
    return summary, receipts, samples


def reads(
    stack: Stack,
    env: dict[str, str],
    token: str,
    wallet: int,
    sizes: tuple[int, ...],
    run: dict[str, Any],
    *,
    chain: bool = True,
) -> dict[str, dict[str, float]]:
    """The read measures: for each ledger size, seed the ledger to it and drive each read as
    the wallet's owner."""
    results = {}
    for size in sizes:
        progress(f"seeding the ledger to {size:.0e} entries")
        txn = seed_ledger(
            env.get("WALLET_MIGRATION_DATABASE_URL") or env["WALLET_DATABASE_URL"], wallet, size, chain=chain
        )
        since = recent_since(env["WALLET_DATABASE_URL"], wallet, lines=100)
        for label, path in (
            ("history", "/transaction/history?limit=10&offset=0"),
            # A page deep in the history (a quarter of its entries back), by keyset.
            ("history after=", f"/transaction/history?limit=10&after={txn - size // 4}"),
            ("ledger", f"/transaction/{txn}/ledger"),
            ("statement", f"/wallet/statement?from={since}"),  # its newest 100 lines
            ("balance at", f"/wallet/balance?at={since}"),  # one index lookup, however long the ledger
        ):
            results[f"GET {label} at {size:.0e} entries"] = wrk(
                f"{stack.url}{path}", "read.lua", BENCH_TOKEN=token, BENCH_PATH=path, **run
            )
    return results


SQLITE_TRANSFERS = "PATCH transfer, default SQLite stack"


def sqlite_transfers(work: Path, seconds: float, connections: int) -> dict[str, Any]:
    """Transfers through the gateway of the stack `make run` starts (deploy/local/stack.py's
    defaults: a SQLite file per service, embedded Redis, one wallet process, emails to
    var/outbox, its log levels and no background niceness), on a var/ of its own; funded and
    driven like the Postgres transfers (money.lua), then wallet-audit on its wallet file."""
    var = work / "sqlite-var"
    var.mkdir()
    progress("default SQLite stack (make run's defaults, 1 wallet process): starting")
    high = {f"GATEWAY_AUTH_RATE_{k}": "100000" for k in ("AVERAGE", "BURST")}  # setup signs up the users
    stack = start_stack(var, WALLET_REPLICAS="1", **high)
    try:
        with httpx.Client(base_url=stack.url, timeout=30) as api:
            progress(f"  funding {WALLETS} wallets through the API")
            wallets = work / "sqlite-wallets.txt"
            wallets.write_text("".join(f"{t} {w}\n" for t, w, _ in fund(api, WALLETS)))
        time.sleep(3)  # let the funding's receipts drain
        result: dict[str, Any] = wrk(
            stack.url, "money.lua", seconds, connections, BENCH_WALLETS=str(wallets), BENCH_KIND="transfer"
        )
    finally:
        stack.stop()
    audit = subprocess.run(
        [str(BIN / "wallet-audit"), "--database-url", stack.wallet_database_url],
        capture_output=True,
        text=True,
        check=False,
    )
    result["audit_failed"] = audit.returncode
    progress(f"  wallet-audit on the SQLite file: {'clean' if audit.returncode == 0 else audit.stdout.strip()}")
    return result


def notifier_cpu(runs: int = 3) -> dict[str, Any]:
    """bench/notifier_cpu.py once the stack is down: receipts through the real relay, Redis
    and notifier workers to the Brevo stand-in, the workers' CPU time per email, with the
    relay's default emails per message and with one message per email, alternately. Run
    `runs` times each: one run's figure moves by half with what else the machine is doing,
    the median of three much less (every run is kept under `runs`)."""
    receipts = "1000" if QUICK else "5000"
    figures: dict[str, list[dict[str, Any]]] = {"batched": [], "single": []}
    for n in range(1, runs + 1):
        for shape, extra in (("batched", []), ("single", ["--emails-per-message", "1"])):
            progress(f"notifier CPU per email (bench/notifier_cpu.py, {shape}, run {n} of {runs})")
            done = subprocess.run(
                [sys.executable, str(ROOT / "bench" / "notifier_cpu.py"), "--receipts", receipts, "--json", *extra],
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode != 0:
                progress(f"  notifier_cpu.py failed: {done.stderr.strip().splitlines()[-1:]}")
                continue
            figures[shape].append(dict(json.loads(done.stdout.strip().splitlines()[-1])))
    medians: dict[str, dict[str, Any]] = {}
    for shape, found in figures.items():
        if found:
            median = sorted(found, key=lambda f: f["notifier_cpu_ms_per_email"])[len(found) // 2]
            medians[shape] = {**median, "runs": [f["notifier_cpu_ms_per_email"] for f in found]}
    if "batched" not in medians:
        return {"notifier_cpu_ms_per_email": float("nan")}
    return {**medians["batched"], "one_per_message": medians.get("single", {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3 if QUICK else 15)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rate", type=float, default=300, help="paced transfers per second")
    parser.add_argument("--rate-seconds", type=float, default=10 if QUICK else 60)
    parser.add_argument(
        "--database-url",
        default=os.environ.get("BENCH_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"),
    )
    parser.add_argument(
        "--sqlite-only", action="store_true", help="only the default SQLite stack's transfers, printed, not written"
    )
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("bench: wrk is not installed (make bench installs it with apt-get)")
    if args.sqlite_only:
        only = sqlite_transfers(Path(tempfile.mkdtemp(prefix="wallet-bench-")), args.seconds, args.connections)
        print(json.dumps({SQLITE_TRANSFERS: only}))
        sys.exit(only["audit_failed"])
    began = datetime.now(UTC)
    work = Path(tempfile.mkdtemp(prefix="wallet-bench-"))
    os.environ["TEST_DATABASE_URL"] = args.database_url
    from e2e.conftest import postgres_stack_env

    env = postgres_stack_env(f"bench{os.getpid()}")
    assert env is not None
    stub_port = free_port()
    stub_url = f"http://127.0.0.1:{stub_port}"
    # Brevo is somebody else's server: its stand-in yields the CPU, like the notifier and the
    # relays (STACK_BACKGROUND_NICE), to the request path being measured.
    stub_cmd = [str(ROOT / "tests/tools/brevo_stub.py"), "--port", str(stub_port), "--api-key", "bench-key"]
    stub_proc = subprocess.Popen(
        ["nice", "-n", str(BACKGROUND_NICE), sys.executable, *stub_cmd], stdout=subprocess.DEVNULL
    )
    high = {f"GATEWAY_AUTH_RATE_{k}": "100000" for k in ("AVERAGE", "BURST")}  # setup signs up 100 users
    progress(f"starting the stack on fresh Postgres databases ({work})" + (" [BENCH_QUICK]" if QUICK else ""))
    stack = start_stack(
        work / "var",
        NOTIFIER_BREVO_API_KEY="bench-key",
        NOTIFIER_BREVO_BASE_URL=stub_url,
        AUTH_LOG_LEVEL="WARNING",
        WALLET_LOG_LEVEL="WARNING",
        NOTIFIER_LOG_LEVEL="WARNING",
        STACK_BACKGROUND_NICE=str(BACKGROUND_NICE),
        **high,
        **env,
    )
    results: dict[str, dict[str, Any]] = {}
    extra: dict[str, Any] = {}
    try:
        with (
            httpx.Client(base_url=stack.url, timeout=30) as api,
            httpx.Client(base_url=stub_url, timeout=30) as stub,
        ):
            progress(f"funding {WALLETS} wallets through the API")
            users = fund(api, WALLETS)
            wallets = work / "wallets.txt"
            wallets.write_text("".join(f"{t} {w}\n" for t, w, _ in users))
            run = {"seconds": args.seconds, "connections": args.connections}
            rss_start = processes(stack)
            results[TRIVIAL] = wrk(
                f"{stack.url}/.well-known/jwks.json",
                "read.lua",
                BENCH_TOKEN="x",
                BENCH_PATH="/.well-known/jwks.json",
                **run,
            )
            results[BARE] = bare_ceiling(work, **run)
            time.sleep(3)  # let the receipts of the funding drain
            stub.post("/_stub/reset")
            started = time.time()
            results["PATCH /transaction/transfer"] = wrk(
                stack.url, "money.lua", BENCH_WALLETS=str(wallets), BENCH_KIND="transfer", **run
            )
            results["receipts: commit to Brevo call"] = receipt_latency(stub, env["WALLET_DATABASE_URL"], started)
            rss_warm = processes(stack)
            paced, receipts, backlog = paced_transfers(
                stack, stub, stub_url, env["WALLET_DATABASE_URL"], wallets, args.rate, args.rate_seconds
            )
            results[f"PATCH transfer paced at {args.rate:.0f}/s"] = {
                "rps": paced["achieved_rate"],
                **{k: v for k, v in paced.items() if k != "per_second"},
            }
            results[f"receipts at {args.rate:.0f}/s: commit to Brevo"] = {
                k: v for k, v in receipts.items() if k != "series"
            }
            extra["paced"] = {"pacer": paced["per_second"], "receipts": receipts.get("series", []), "backlog": backlog}
            for kind in ("deposit", "withdraw"):
                results[f"PATCH /transaction/{kind}"] = wrk(
                    stack.url, "money.lua", BENCH_WALLETS=str(wallets), BENCH_KIND=kind, **run
                )
            token, wallet, _ = users[0]
            sizes = (10**4,) if QUICK else (10**4, 10**6)
            results.update(reads(stack, env, token, wallet, sizes, {**run, "seconds": min(args.seconds, 10)}))
            rss = memory(stack.process.pid) if stack.process else {}
            extra["memory"] = memory_growth(rss_start, rss_warm, processes(stack))
        progress("wallet-audit")
        audit = subprocess.run(
            [str(BIN / "wallet-audit"), "--database-url", env["WALLET_DATABASE_URL"]],
            capture_output=True,
            text=True,
            check=False,
        )
        progress("wallet-audit --verify-chain")
        verify_started = time.monotonic()
        verified = subprocess.run(
            [str(BIN / "wallet-audit"), "--database-url", env["WALLET_DATABASE_URL"], "--verify-chain", "--json"],
            capture_output=True,
            text=True,
            check=False,
        )
        chain_report = json.loads(verified.stdout or "{}")
        extra["verify_chain"] = {
            "seconds": round(time.monotonic() - verify_started, 1),
            "ledger_entries": chain_report.get("ledger_entries"),
            "violations": chain_report.get("violation_count"),
        }
    finally:
        progress("stopping the stack")
        stack.stop()
        stub_proc.terminate()
        drop_databases(env)  # also when a run fails half way
    results[SQLITE_TRANSFERS] = sqlite_transfers(work, args.seconds, args.connections)
    extra["notifier_cpu"] = notifier_cpu()
    extra["run"] = {
        "started": began.isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - T0),
        "quick": QUICK,
        "seconds": args.seconds,
        "connections": args.connections,
        "rate": args.rate,
        "rate_seconds": args.rate_seconds,
        "wallets": WALLETS,
        "cores": os.cpu_count(),
    }
    report(results, rss, audit.stdout.strip(), args, extra)
    failed = audit.returncode or results[SQLITE_TRANSFERS]["audit_failed"]
    sys.exit(failed or int(bool(extra.get("verify_chain", {}).get("violations"))))


def report(
    results: dict[str, dict[str, Any]],
    rss: dict[str, float],
    audit: str,
    args: argparse.Namespace,
    extra: dict[str, Any],
) -> None:
    print(
        f"\nwrk -t2 -c{args.connections}, {args.seconds:.0f}s per run, 2 wallet replicas, Postgres, "
        f"{os.cpu_count()} cores shared with wrk"
    )
    print(f"{'measure':<40}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}  notes")
    for name, r in results.items():
        keys = ("non2xx", "socket_errors", "backlog", "receipts", "missing", "drained_s")
        keys += ("target_rate", "shed", "pacer_late_p99", "audit_failed")
        notes = ", ".join(f"{k} {r[k]:.0f}" for k in keys if r.get(k))
        print(f"{name:<40}{r.get('rps', float('nan')):>9.0f}{r['p50']:>9.1f}{r['p99']:>9.1f}  {notes}")
    trivial = results[TRIVIAL]["rps"]
    transfers = results["PATCH /transaction/transfer"]["rps"]
    print(f"transfers / trivial endpoint = {transfers / trivial:.2f}")
    print(f"{SQLITE_TRANSFERS}: 1 wallet process, make run's defaults (target >= 300/s)")
    bare = results[BARE]["rps"]
    print(f"trivial endpoint / bare FastAPI behind Traefik = {trivial / bare:.2f} (target >= 0.6)")
    print("resident memory at the end (MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(rss.items())))
    print("resident memory per process, start -> warm (after the first transfer run) -> end of the load (MiB):")
    for name, m in extra["memory"].items():
        if m["growth_after_warm"] is None:
            print(
                f"  {name:<18} {m['start'] or 0:>6.0f} -> {m['warm'] or 0:>6.0f} -> {m['end'] or 0:>6.0f}  (not at each)"
            )
        else:
            flag = "  GREW" if m["flagged"] else ""
            print(
                f"  {name:<18} {m['start'] or 0:>6.0f} -> {m['warm']:>6.0f} -> {m['end']:>6.0f}"
                f"  ({m['growth_after_warm']:+.0f} once warm){flag}"
            )
    backlog = extra["paced"]["backlog"]
    if backlog:
        peak = max(backlog, key=lambda s: s["undelivered"])
        print(
            f"paced run backlog: peak {peak['undelivered']:.0f} receipts not yet at Brevo at {peak['t']:.0f} s, "
            f"outbox unpublished peak {max(s['outbox_backlog'] for s in backlog):.0f}; "
            f"{len(backlog)} samples in {RESULTS.relative_to(ROOT)}.json"
        )
    cpu = extra["notifier_cpu"]
    single = cpu.get("one_per_message", {})
    print(
        f"notifier CPU per email: {cpu['notifier_cpu_ms_per_email']:.3f} ms at {cpu.get('emails_per_message')} emails "
        f"per message (median of {cpu.get('runs', [])} ms; {cpu.get('emails_sent', 0)} receipts each, relay + Redis + "
        f"{cpu.get('threads', '?')}-thread worker, target <= 0.3); one message per email: "
        f"{single.get('notifier_cpu_ms_per_email', float('nan')):.3f} ms (median of {single.get('runs', [])} ms)"
    )
    print(audit)
    chain = extra.get("verify_chain", {})
    print(
        f"wallet-audit --verify-chain: {chain.get('ledger_entries')} entries in {chain.get('seconds')} s, "
        f"violations {chain.get('violations')}"
    )
    ratios = {"transfers_over_trivial": transfers / trivial, "trivial_over_bare": trivial / bare}
    figures = {"results": results, "ratios": ratios, "rss": rss, "audit": audit, **extra}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.with_suffix(".json").write_text(json.dumps(_finite(figures), indent=2) + "\n")
    plot(figures, RESULTS.with_suffix(".png"))
    print(f"figures: {RESULTS.relative_to(ROOT)}.json, drawn in {RESULTS.relative_to(ROOT)}.png")


def _finite(value: Any) -> Any:
    """NaN and infinities as null: the file stays strict JSON."""
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def plot(figures: dict[str, Any], path: Path) -> None:
    """Throughput and p50/p99 per measure (bars), the paced run's receipt lag and backlog over
    time (lines), and each process's memory at the start and the end of the load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = figures["results"]
    run = figures["run"]
    fig, axes = plt.subplots(2, 2, figsize=(16, 11))
    (ax_rps, ax_lat), (ax_lag, ax_mem) = axes

    timed = [n for n, r in results.items() if r.get("rps") == r.get("rps") and r.get("rps") is not None]
    y = range(len(timed))
    ax_rps.barh(list(y), [results[n]["rps"] for n in timed], color="tab:blue")
    ax_rps.set_yticks(list(y), timed, fontsize=8)
    ax_rps.invert_yaxis()
    ax_rps.set_xlabel("requests/s (paced: achieved)")
    ax_rps.set_title("throughput")
    for i, n in enumerate(timed):
        ax_rps.text(results[n]["rps"], i, f" {results[n]['rps']:.0f}", va="center", fontsize=8)

    names = list(results)
    pos = range(len(names))
    height = 0.4
    for offset, key, color in ((-height / 2, "p50", "tab:green"), (height / 2, "p99", "tab:red")):
        values = [max(results[n][key], 0.01) if results[n][key] == results[n][key] else 0 for n in names]
        ax_lat.barh([p + offset for p in pos], values, height=height, label=key, color=color)
    ax_lat.set_yticks(list(pos), names, fontsize=8)
    ax_lat.invert_yaxis()
    ax_lat.set_xscale("log")
    ax_lat.set_xlabel("latency, ms (log)")
    ax_lat.set_title("p50 / p99 per measure")
    ax_lat.legend()

    paced = figures["paced"]
    series = paced["receipts"]
    if series:
        ax_lag.plot([s["t"] for s in series], [s["p50"] / 1000 for s in series], label="receipt lag p50")
        ax_lag.plot([s["t"] for s in series], [s["p99"] / 1000 for s in series], label="receipt lag p99")
    ax_lag.set_xlabel(
        f"seconds since the paced run began ({run['rate']:.0f}/s offered for {run['rate_seconds']:.0f} s)"
    )
    ax_lag.set_ylabel("commit to Brevo call, s (by commit second)")
    ax_lag.axvline(run["rate_seconds"], color="grey", linestyle=":", label="load stops")
    ax_lag.set_title("receipts of the paced run: lag and backlog over time")
    backlog = paced["backlog"]
    twin = ax_lag.twinx()
    if backlog:
        twin.plot([s["t"] for s in backlog], [s["undelivered"] for s in backlog], "k--", label="receipts not at Brevo")
        twin.plot(
            [s["t"] for s in backlog], [s["outbox_backlog"] or 0 for s in backlog], "m:", label="outbox unpublished"
        )
    twin.set_ylabel("backlog (count, sampled each second)")
    lines = ax_lag.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    ax_lag.legend(lines[0] + more[0], lines[1] + more[1], loc="upper left", fontsize=8)

    memory = figures["memory"]
    procs = list(memory)
    pos = range(len(procs))
    third = height * 2 / 3
    for offset, key, color in ((-third, "start", "tab:gray"), (0, "warm", "tab:blue"), (third, "end", "tab:orange")):
        ax_mem.barh(
            [p + offset for p in pos], [memory[n].get(key) or 0 for n in procs], height=third, label=key, color=color
        )
    ax_mem.set_yticks(list(pos), [n + ("  (grew)" if memory[n]["flagged"] else "") for n in procs], fontsize=8)
    ax_mem.invert_yaxis()
    ax_mem.set_xlabel("resident memory, MiB")
    ax_mem.set_title("memory per process: start, warm (after the first transfer run), end")
    ax_mem.legend()

    fig.suptitle(
        f"make bench {run['started']}: wrk -t2 -c{run['connections']}, {run['seconds']:.0f} s per measure, "
        f"{run['cores']} cores shared by the stack and the load" + (" (BENCH_QUICK)" if run["quick"] else "")
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    main()
