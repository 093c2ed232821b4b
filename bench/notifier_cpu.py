"""Notifier CPU per email, end to end: receipts through the real relay, Redis and workers.

N receipts are staged in an outbox table (SQLite), then the outbox relay (svckit.outbox.serve,
a process of its own) publishes them to a throwaway Redis, and the notifier's Dramatiq workers
(`dramatiq notifier.worker`, their own processes) send them to the Brevo stand-in
(tests/tools/brevo_stub.py). The figure is the CPU time (utime + stime in /proc/<pid>/stat)
of the notifier's processes (the dramatiq parent and its workers) from the relay's start to
the last email at the stand-in, divided by the emails it accepted. Their boot is not counted.

    .venv/bin/python bench/notifier_cpu.py [--receipts 5000] [--processes 1] [--threads 8]
        [--emails-per-message N] [--old-shape] [--tree PATH] [--json]

--old-shape: receipts without their recipient, so each is looked up at a stand-in for auth's
`GET /internal/users` (bench/notifier_cost.py --serve-auth; a per-process cache in the
notifier). --tree: run the relay and the notifier from another checkout's sources (e.g. a
`git archive main` unpacked), for before/after figures in the same minute.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import tree

from svckit.settings import BaseServiceSettings

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STUB = ROOT / "tests" / "tools" / "brevo_stub.py"
API_KEY = "cpu-brevo-key"
SERVICE_TOKEN = "cpu-service-token-" + "x" * 24  # nosec B105  (a throwaway local value)
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_times(pid: int) -> tuple[float, float]:
    """utime and stime of one process, in seconds (0 if it is gone)."""
    try:
        fields = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    return int(fields[11]) / TICKS, int(fields[12]) / TICKS  # fields 14 and 15 of stat(5)


def stage(database_url: str, n: int, carry: bool) -> None:
    from sqlalchemy import create_engine

    from svckit.messages import Receipt, Recipient
    from svckit.outbox import outbox_row
    from svckit.testing import outbox_table

    table = outbox_table()
    engine = create_engine(database_url)
    table.metadata.create_all(engine)
    rows = []
    for i in range(n):
        user_id = 1 + i % 100
        recipient = Recipient(email=f"u{user_id}@example.com", first_name=f"First{user_id}", last_name="Last")
        receipt = Receipt(
            email_id=uuid.uuid4().hex,
            user_id=user_id,
            recipient=recipient if carry else None,
            transaction_id=10_000 + i,
            kind="transfer_received",
            amount=1234,
            currency="USD",
            balance_after=99_000,
            counterparty="Jane Doe",
            occurred_at=datetime.now(UTC),
        )
        rows.append(outbox_row(receipt))
    with engine.begin() as conn:
        conn.execute(table.insert(), rows)
    engine.dispose()


RELAY = """
import inspect
import sys
from svckit.outbox import serve
from svckit.testing import outbox_table
# Emails per notifier message, as the deployed relay's setting; left out at 1 for a --tree
# from before batches (no such argument: it publishes each email alone).
per = int(sys.argv[3])
batched = {"emails_per_message": per} if per > 1 or "emails_per_message" in inspect.signature(serve).parameters else {}
serve(
    service="bench", database_url=sys.argv[1], redis_url=sys.argv[2], table=outbox_table(), log_level="WARNING",
    **batched,
)
"""


def wait(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"notifier_cpu: {what} within {timeout:.0f} s")
        time.sleep(0.1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import redis

    from svckit.testing import free_port, redis_server

    work = Path(tempfile.mkdtemp(prefix="notifier-cpu-"))
    database_url = f"sqlite:///{work}/outbox.db"
    env = dict(os.environ)
    if args.tree:
        src = [Path(args.tree) / p for p in ("services/notifier/src", "libs/svckit/src")]
        env["PYTHONPATH"] = os.pathsep.join([*map(str, src), env.get("PYTHONPATH", "")])
    brevo_port, auth_port = free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    with redis_server() as redis_url:
        try:
            procs.append(
                subprocess.Popen([sys.executable, str(STUB), "--port", str(brevo_port), "--api-key", API_KEY], **quiet)
            )
            cost = ROOT / "bench" / "notifier_cost.py"
            procs.append(subprocess.Popen([sys.executable, str(cost), "--serve-auth", str(auth_port)], **quiet))
            stub = httpx.Client(base_url=f"http://127.0.0.1:{brevo_port}", timeout=10)
            wait(lambda: _answers(stub, "/_stub/received"), 15, "the Brevo stand-in did not start")
            env.update(
                NOTIFIER_REDIS_URL=redis_url,
                NOTIFIER_BREVO_API_KEY=API_KEY,
                NOTIFIER_BREVO_BASE_URL=f"http://127.0.0.1:{brevo_port}",
                NOTIFIER_AUTH_URL=f"http://127.0.0.1:{auth_port}",
                NOTIFIER_SERVICE_TOKEN=SERVICE_TOKEN,
                NOTIFIER_METRICS_PORT="0",
                NOTIFIER_LOG_LEVEL=args.log_level,
            )
            notifier = subprocess.Popen(
                [
                    *(str(BIN / "dramatiq"), "notifier.worker", "--processes", str(args.processes)),
                    *("--threads", str(args.threads), "--queues", "notifications"),
                ],
                env=env,
                **quiet,
            )
            procs.append(notifier)
            client = redis.Redis.from_url(redis_url)
            workers = lambda: client.zcard("dramatiq:__heartbeats__") >= args.processes  # noqa: E731
            wait(workers, 60, "the notifier's workers did not start")
            stage(database_url, args.receipts, carry=not args.old_shape)
            time.sleep(1.0)  # the workers' first idle polls, not the boot, are the baseline
            pids = tree(notifier.pid)
            before = {pid: cpu_times(pid) for pid in pids}
            t0 = time.monotonic()
            relay = subprocess.Popen(
                [sys.executable, "-c", RELAY, database_url, redis_url, str(args.emails_per_message)], env=env, **quiet
            )
            procs.append(relay)
            received = [0]

            def arrived() -> bool:
                received[0] = len(stub.get("/_stub/received").json()["received"])
                return received[0] >= args.receipts

            wait(arrived, 600, f"only {received[0]} of {args.receipts} emails reached the stand-in")
            wall = time.monotonic() - t0
            after = {pid: cpu_times(pid) for pid in tree(notifier.pid)}
            user = sum(u - before.get(pid, (0.0, 0.0))[0] for pid, (u, _) in after.items())
            system = sum(s - before.get(pid, (0.0, 0.0))[1] for pid, (_, s) in after.items())
            cpu = user + system
            emails = stub.get("/_stub/emails").json()
            stub.close()
        finally:
            for proc in reversed(procs):
                proc.terminate()
            for proc in procs:
                proc.wait(15)
    sent = len(emails["emails"])
    return {
        "tree": args.tree or "this checkout",
        "receipts": args.receipts,
        "recipient_carried": not args.old_shape,
        "processes": args.processes,
        "threads": args.threads,
        "emails_per_message": args.emails_per_message,
        "emails_sent": sent,
        "duplicates_refused": emails.get("duplicates", 0),
        "notifier_cpu_s": round(cpu, 2),
        "notifier_cpu_ms_per_email": round(cpu * 1000 / sent, 3),
        "of_which_kernel_ms_per_email": round(system * 1000 / sent, 3),  # stime: the syscalls (sockets, futexes)
        "wall_s": round(wall, 2),
        "emails_per_s": round(sent / wall),
        "brevo_connections": emails.get("connections"),
    }


def _answers(client: httpx.Client, path: str) -> bool:
    try:
        return client.get(path).status_code == 200
    except httpx.TransportError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--receipts", type=int, default=5000)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument(
        "--emails-per-message",
        type=int,
        default=BaseServiceSettings.model_fields["outbox_emails_per_message"].default,
        help="the relay's OUTBOX_EMAILS_PER_MESSAGE (default: its default; 1 for a --tree from before batches)",
    )
    parser.add_argument("--old-shape", action="store_true", help="receipts without their recipient (looked up)")
    parser.add_argument("--tree", help="run the relay and notifier from this checkout's sources")
    parser.add_argument("--log-level", default="INFO", help="the notifier's (INFO: a line per email, as deployed)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:<28}{value}")
        print(f"notifier CPU per email: {result['notifier_cpu_ms_per_email']:.3f} ms")


if __name__ == "__main__":
    main()
