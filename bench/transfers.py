"""Transfers per second through the gateway, against a trivial endpoint through the same gateway.

Starts the stack with the `make run` launcher on Postgres (fresh databases on
BENCH_DATABASE_URL's server) with two wallet replicas, funds N wallets through the API,
then measures in one run, at a fixed concurrency:
  - PATCH /transaction/transfer (unique idempotency key per request, random payer and
    payee, every request authenticated as the paying user);
  - GET /.well-known/jwks.json (a trivial endpoint behind the same gateway);
and prints throughput, p50/p99 latency and the ratio, then runs wallet-audit.

    .venv/bin/python bench/transfers.py [--concurrency 32] [--seconds 15] [--wallets 100]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def fresh_databases(base: str, tag: str) -> dict[str, str]:
    url = make_url(base)
    admin = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    env = {}
    with admin.connect() as conn:
        for service in ("auth", "wallet"):
            name = f"bench_{tag}_{service}"
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            conn.execute(text(f'CREATE DATABASE "{name}"'))
            env[f"{service.upper()}_DATABASE_URL"] = url.set(database=name).render_as_string(hide_password=False)
    admin.dispose()
    return env


def start_stack(var: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    port = 18600 + os.getpid() % 1000
    full = {
        **os.environ,
        **env,
        "VAR_DIR": str(var),
        "GATEWAY_PORT": str(port),
        "STACK_PORTS": "auto",
        "WALLET_REPLICAS": "2",
        "AUTH_BCRYPT_ROUNDS": "4",
        "WALLET_LOG_LEVEL": "WARNING",
        "AUTH_LOG_LEVEL": "WARNING",
    }
    full.pop("REDIS_URL", None)
    log = open(var.parent / "stack.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "deploy/local/stack.py")], env=full, stdout=log, stderr=subprocess.STDOUT
    )
    ready = var / "run" / "stack.json"
    deadline = time.monotonic() + 120
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"stack did not start; see {log.name}")
        time.sleep(0.3)
    return proc, f"http://127.0.0.1:{port}"


async def fund(client: httpx.AsyncClient, n: int, balance: int) -> list[tuple[str, int]]:
    async def one(i: int) -> tuple[str, int]:
        email = f"bench-{uuid.uuid4().hex[:10]}@example.com"
        r = await client.post(
            "/signup", json={"first_name": "Bench", "last_name": str(i), "email": email, "password": "benchpass123"}
        )
        r.raise_for_status()
        r = await client.post("/token", data={"username": email, "password": "benchpass123"})
        r.raise_for_status()
        token = r.json()["access_token"]
        r = await client.post(
            "/wallet", json={"balance": balance, "currency": "USD"}, headers={"Authorization": f"Bearer {token}"}
        )
        r.raise_for_status()
        return token, int(r.json()["id"])

    out = []
    for start in range(0, n, 10):  # stay under the per-IP signup/token limit
        out += await asyncio.gather(*(one(i) for i in range(start, min(n, start + 10))))
        await asyncio.sleep(0.5)
    return out


async def load(client: httpx.AsyncClient, make_request, concurrency: int, seconds: float) -> dict[str, float]:  # type: ignore[no-untyped-def]
    latencies: list[float] = []
    codes: Counter[int] = Counter()
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            response = await make_request()
            latencies.append(time.perf_counter() - t0)
            codes[response.status_code] += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    latencies.sort()
    return {
        "requests": len(latencies),
        "rps": len(latencies) / elapsed,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
        "codes": dict(codes),  # type: ignore[dict-item]
    }


async def bench(url: str, args: argparse.Namespace) -> tuple[dict[str, float], dict[str, float]]:
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        wallets = await fund(client, args.wallets, 10**9)

        async def transfer() -> httpx.Response:
            (token, _), (_, to) = random.sample(wallets, 2)
            return await client.patch(
                "/transaction/transfer",
                json={"to_account_id": to, "amount": random.randint(1, 100), "currency": "USD"},
                headers={"Authorization": f"Bearer {token}", "Idempotency-Key": uuid.uuid4().hex},
            )

        async def trivial() -> httpx.Response:
            return await client.get("/.well-known/jwks.json")

        await load(client, trivial, args.concurrency, 2)  # warm-up
        trivial_result = await load(client, trivial, args.concurrency, args.seconds)
        transfer_result = await load(client, transfer, args.concurrency, args.seconds)
    return transfer_result, trivial_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--wallets", type=int, default=100)
    parser.add_argument(
        "--database-url",
        default=os.environ.get("BENCH_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"),
    )
    args = parser.parse_args()
    var = Path(os.environ.get("BENCH_VAR") or tempfile.mkdtemp(prefix="wallet-bench-")) / "var"
    var.mkdir(parents=True, exist_ok=True)
    env = fresh_databases(args.database_url, str(os.getpid()))
    proc, url = start_stack(var, env)
    try:
        transfers, trivial = asyncio.run(bench(url, args))
    finally:
        proc.send_signal(2)
        proc.wait(60)
    print(
        f"\nconcurrency {args.concurrency}, {args.seconds:.0f}s each, {args.wallets} wallets, "
        f"2 wallet replicas, Postgres, load generator: Python httpx (shares the 2 cores)"
    )
    print(f"{'endpoint':<34}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}  status codes")
    for name, r in (("PATCH /transaction/transfer", transfers), ("GET /.well-known/jwks.json", trivial)):
        print(f"{name:<34}{r['rps']:>9.0f}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}  {r['codes']}")
    print(f"transfer throughput / trivial throughput = {transfers['rps'] / trivial['rps']:.2f}")
    audit = subprocess.run(
        [str(BIN / "wallet-audit"), "--database-url", env["WALLET_DATABASE_URL"]],
        capture_output=True,
        text=True,
        check=False,
    )
    print(audit.stdout.strip())
    sys.exit(audit.returncode)


if __name__ == "__main__":
    main()
