"""What one email costs the notifier: CPU, Redis round trips, HTTP requests and connections.

The real code path in this process, everything else in processes of their own (so their
CPU is not counted): a throwaway Redis (svckit.testing.redis_server), the Brevo stand-in
(tests/tools/brevo_stub.py) and a minimal stand-in for auth's `GET /internal/users` (this
file with --serve-auth), both counting the requests and TCP connections they get.

    .venv/bin/python bench/notifier_cost.py [--messages 2000] [--users 100] [--threads 8]
        [--mode worker|actor] [--carry] [--stub PATH] [--json]

--mode worker (the default): the messages are enqueued first, then a Dramatiq worker
(notifier.broker.setup_broker, the notifier's middlewares, --threads threads) consumes
them in this process; the clock runs from its start to the last delivery. --mode actor:
the actor's function called in a loop on one thread (no broker, no ack). CPU is
time.process_time() of this process (every thread), divided by the emails delivered.
Redis round trips are counted at the client (each command or pipeline sent is one),
commands at the server (INFO commandstats: commands run inside a script count there too).
--users: receipts cycle through this many recipients (a per-process recipient cache helps
only with few); --carry: the messages carry the recipient's address and name (the new
shape), so no lookup is needed.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Lock
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import redis

ROOT = Path(__file__).resolve().parents[1]
STUB = ROOT / "tests" / "tools" / "brevo_stub.py"
API_KEY = "cost-brevo-key"
SERVICE_TOKEN = "cost-service-token-" + "x" * 24  # nosec B105  (a throwaway local value)


# --- auth's /internal/users, as small as it gets -----------------------------------------


def serve_auth(port: int) -> None:
    lock = Lock()
    counts = {"requests": 0, "connections": 0}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # uvicorn keeps connections alive too
        disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall

        def setup(self) -> None:
            super().setup()
            with lock:
                counts["connections"] += 1

        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            if url.path == "/_stats":
                body = dict(counts)
            elif url.path == "/internal/users":
                with lock:
                    counts["requests"] += 1
                ids = [int(i) for i in parse_qs(url.query).get("ids", [])]
                body = {"users": [_user(i) for i in ids]}
            else:
                self.send_error(404)
                return
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


def _user(user_id: int) -> dict[str, Any]:
    return {"id": user_id, "first_name": f"First{user_id}", "last_name": "Last", "email": f"u{user_id}@example.com"}


@contextmanager
def server(cmd: list[str], url: str) -> Iterator[str]:
    proc = subprocess.Popen([sys.executable, *cmd], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


# --- counting Redis round trips at the client --------------------------------------------

ROUND_TRIPS = [0]


def count_round_trips() -> None:
    original = redis.connection.AbstractConnection.send_packed_command

    def counted(self: Any, command: Any, check_health: bool = True) -> None:
        ROUND_TRIPS[0] += 1
        original(self, command, check_health)

    redis.connection.AbstractConnection.send_packed_command = counted  # type: ignore[method-assign]


def commandstats(client: redis.Redis) -> dict[str, int]:
    info = client.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items()}


# --- the run -------------------------------------------------------------------------------


def messages(n: int, users: int, carry: bool) -> list[dict[str, Any]]:
    from svckit.messages import Receipt

    out = []
    for i in range(n):
        user_id = 1 + i % users
        fields: dict[str, Any] = {
            "email_id": uuid.uuid4().hex,
            "user_id": user_id,
            "transaction_id": 10_000 + i,
            "kind": "transfer_received",
            "amount": 1234,
            "currency": "USD",
            "balance_after": 99_000,
            "counterparty": "Jane Doe",
            "occurred_at": datetime.now(UTC),
        }
        if carry:
            user = _user(user_id)
            fields["recipient"] = {k: user[k] for k in ("email", "first_name", "last_name")}
        out.append(Receipt(**fields).model_dump(mode="json"))
    return out


def run(args: argparse.Namespace, redis_url: str, brevo_url: str, auth_url: str) -> dict[str, Any]:
    os.environ.update(
        NOTIFIER_REDIS_URL=redis_url,
        NOTIFIER_BREVO_API_KEY=API_KEY,
        NOTIFIER_BREVO_BASE_URL=brevo_url,
        NOTIFIER_AUTH_URL=auth_url,
        NOTIFIER_SERVICE_TOKEN=SERVICE_TOKEN,
        NOTIFIER_METRICS_PORT="0",
    )
    import dramatiq

    from notifier.broker import setup_broker
    from svckit.logging import configure_logging

    configure_logging("notifier", "INFO")  # as the worker does; the lines go nowhere
    import logging

    for handler in logging.getLogger().handlers:
        handler.setStream(open(os.devnull, "w"))  # type: ignore[attr-defined]  # noqa: SIM115

    broker = setup_broker()
    from notifier import actors
    from notifier.metrics import DELIVERED

    def delivered() -> float:
        return sum(s.value for m in DELIVERED.collect() for s in m.samples if s.name.endswith("_total"))

    payloads = messages(args.messages, args.users, args.carry)
    admin = redis.Redis.from_url(redis_url)
    with httpx.Client(base_url=brevo_url) as stub:
        stub.post("/_stub/reset").raise_for_status()
    if args.mode == "worker":
        from svckit.messages import dramatiq_payload

        for p in payloads:
            broker.enqueue(dramatiq.Message(**dramatiq_payload(_model(p), request_id=None)))
    auth_before = httpx.get(f"{auth_url}/_stats").json()
    stats_before = commandstats(admin)
    trips_before = ROUND_TRIPS[0]
    before_delivered = delivered()
    profile = cProfile.Profile(time.process_time) if args.profile else None
    if profile is not None:
        profile.enable()  # this thread only (--mode actor)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    if args.mode == "worker":
        worker = dramatiq.Worker(broker, worker_threads=args.threads, worker_timeout=100)
        worker.start()
        while delivered() - before_delivered < args.messages:
            time.sleep(0.01)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        time.sleep(0.3)  # the last acks
        worker.stop()
    else:
        for p in payloads:
            actors.send_receipt.fn(p)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    if profile is not None:
        profile.disable()
        profile.dump_stats(args.profile)
    trips = ROUND_TRIPS[0] - trips_before
    stats_after = commandstats(admin)
    commands = {k: v - stats_before.get(k, 0) for k, v in stats_after.items() if k != "info"}
    commands = {k: v for k, v in sorted(commands.items()) if v}
    auth_after = httpx.get(f"{auth_url}/_stats").json()
    with httpx.Client(base_url=brevo_url) as stub:
        seen = stub.get("/_stub/received").json()
    n = delivered() - before_delivered
    return {
        "mode": args.mode,
        "threads": args.threads if args.mode == "worker" else 1,
        "carry": args.carry,
        "users": args.users,
        "emails": int(n),
        "cpu_ms_per_email": round(cpu * 1000 / n, 3),
        "wall_s": round(wall, 2),
        "emails_per_s": round(n / wall),
        "redis_round_trips_per_email": round(trips / n, 2),
        "redis_commands_per_email": round(sum(commands.values()) / n, 2),
        "redis_commands": {k: round(v / n, 3) for k, v in commands.items()},
        "brevo_requests_per_email": round(seen["calls"] / n, 3),
        # The reset's own connection may be reused (it counted before the reset).
        "brevo_connections_per_email": round(seen.get("connections", float("nan")) / n, 4),
        "brevo_connections": seen.get("connections"),
        "auth_requests_per_email": round((auth_after["requests"] - auth_before["requests"]) / n, 4),
        "auth_connections": auth_after["connections"] - auth_before["connections"] - 1,  # less the /_stats call
    }


def _model(payload: dict[str, Any]) -> Any:
    from svckit.messages import Receipt

    return Receipt.model_validate(payload)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--users", type=int, default=100, help="distinct recipients, cycled")
    parser.add_argument("--threads", type=int, default=8, help="worker threads (--mode worker)")
    parser.add_argument("--mode", choices=("worker", "actor"), default="worker")
    parser.add_argument("--carry", action="store_true", help="messages carry the recipient (no lookup)")
    parser.add_argument("--stub", default=str(STUB), help="the Brevo stand-in to run (another version of it)")
    parser.add_argument("--json", action="store_true", help="one JSON line instead of the table")
    parser.add_argument("--profile", metavar="PATH", help="cProfile (CPU time) of the measured loop to PATH")
    parser.add_argument("--serve-auth", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_auth:
        serve_auth(args.serve_auth)
        return
    from svckit.testing import free_port, redis_server

    count_round_trips()
    brevo_port, auth_port = free_port(), free_port()
    with (
        redis_server() as redis_url,
        server(
            [args.stub, "--port", str(brevo_port), "--api-key", API_KEY], f"http://127.0.0.1:{brevo_port}/_stub/emails"
        ),
        server([__file__, "--serve-auth", str(auth_port)], f"http://127.0.0.1:{auth_port}/_stats"),
    ):
        result = run(args, redis_url, f"http://127.0.0.1:{brevo_port}", f"http://127.0.0.1:{auth_port}")
    if args.json:
        print(json.dumps(result))
    else:
        width = max(map(len, result))
        for key, value in result.items():
            print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
