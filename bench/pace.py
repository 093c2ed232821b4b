"""Open-loop pacer of `make bench`: PATCH /transaction/transfer at a constant rate.

wrk keeps N connections busy (a closed loop: it slows down when the server does); this
sends request i at start + i/rate whatever the answers, like independent clients, so the
offered load stays constant. Latency counts from the scheduled time (no coordinated
omission). --connections keep-alive connections each send the next due request; one due
while --max-queue wait for a connection is shed (counted, not sent), so an overloaded stack
shows up as a lower achieved rate and not as a run that never ends. Prints one JSON line
per second (progress), then a summary.

    python bench/pace.py URL WALLETS_FILE --rate 300 --seconds 60
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
import uuid
from urllib.parse import urlsplit


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(int(len(ordered) * q), len(ordered) - 1)]


class Connection:
    """One keep-alive HTTP/1.1 connection on asyncio streams: the little a JSON PATCH needs.
    (httpx costs 2 ms of CPU per request here, most of it its pool's bookkeeping, which
    this 2-core machine cannot spare at 300 requests/s beside the stack.)"""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, headers: dict[str, str], body: bytes) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Length: {len(body)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.writer.write(head.encode() + b"\r\n" + body)
        try:
            lines = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
            if fields.get("transfer-encoding", "").lower() == "chunked":
                while size := int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16):
                    await self.reader.readexactly(size + 2)
                await self.reader.readuntil(b"\r\n")
            else:
                await self.reader.readexactly(int(fields.get("content-length", 0)))
        except BaseException:
            self.close()
            raise
        if fields.get("connection", "").lower() == "close":
            self.close()
        return status

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def run(args: argparse.Namespace) -> dict[str, object]:
    with open(args.wallets) as fh:
        users = [line.split() for line in fh if line.strip()]
    url = urlsplit(args.url)
    latencies: list[float] = []
    late: list[float] = []
    statuses: dict[str, int] = {}
    counts = {"sent": 0, "ok": 0, "shed": 0, "queued": 0}
    per_second: list[dict[str, float]] = []
    # Due times, taken by one worker per connection: the queue is the requests' wait for a
    # connection, counted in their latency.
    due_times: asyncio.Queue[float | None] = asyncio.Queue()

    async def worker() -> None:
        conn = Connection(url.hostname or "127.0.0.1", url.port or 80)
        while (due := await due_times.get()) is not None:
            token, payer = random.choice(users)
            payee = payer
            while payee == payer:
                payee = random.choice(users)[1]
            body = json.dumps({"to_account_id": int(payee), "amount": random.randint(1, 100), "currency": "USD"})
            headers = {
                "Authorization": f"Bearer {token}",
                "Idempotency-Key": f"pace-{uuid.uuid4().hex}",
                "Content-Type": "application/json",
            }
            counts["sent"] += 1
            try:
                status = await asyncio.wait_for(
                    conn.request("PATCH", "/transaction/transfer", headers, body.encode()), args.timeout
                )
                key = str(status)
                if 200 <= status < 300:
                    counts["ok"] += 1
                    latencies.append((time.monotonic() - due) * 1000)
            except (OSError, ValueError, IndexError, asyncio.IncompleteReadError, TimeoutError) as exc:
                key = type(exc).__name__
            statuses[key] = statuses.get(key, 0) + 1
        conn.close()

    workers = [asyncio.create_task(worker()) for _ in range(args.connections)]
    total = int(args.rate * args.seconds)
    start = time.monotonic()
    next_report = start + 1
    for i in range(total):
        due = start + i / args.rate
        now = time.monotonic()
        if due > now:
            await asyncio.sleep(due - now)
            now = time.monotonic()
        late.append((now - due) * 1000)
        if due_times.qsize() >= args.max_queue:
            counts["shed"] += 1
        else:
            counts["queued"] += 1
            due_times.put_nowait(due)
        if now >= next_report:
            line = {"t": round(now - start, 1), **counts, "waiting": due_times.qsize()}
            per_second.append(line)
            print(json.dumps(line), flush=True)
            next_report += 1
    offered_s = time.monotonic() - start
    ok_in_window = counts["ok"]
    for _ in workers:
        due_times.put_nowait(None)
    await asyncio.wait(workers, timeout=args.timeout)
    elapsed = time.monotonic() - start
    return {
        "target_rate": args.rate,
        "seconds": args.seconds,
        "connections": args.connections,
        "scheduled": total,
        "sent": counts["sent"],
        "ok": counts["ok"],
        "shed": counts["shed"],
        "statuses": statuses,
        "admitted_rate": counts["queued"] / offered_s,
        "achieved_rate": ok_in_window / offered_s,
        "ok_rate_incl_tail": counts["ok"] / elapsed,
        "tail_s": elapsed - offered_s,
        "p50": pct(latencies, 0.50),
        "p99": pct(latencies, 0.99),
        "pacer_late_p50": pct(late, 0.50),
        "pacer_late_p99": pct(late, 0.99),
        "per_second": per_second,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url")
    parser.add_argument("wallets", help='file of "token wallet_id" lines')
    parser.add_argument("--rate", type=float, default=300)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--max-queue", type=int, default=300, help="due requests waiting for a connection")
    parser.add_argument("--timeout", type=float, default=30)
    args = parser.parse_args()
    summary = asyncio.run(run(args))
    print(json.dumps({"summary": summary}), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
