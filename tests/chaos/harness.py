"""Load with careful clients, fault injection, and the exactly-once checks for the chaos tests.

Clients retry each money movement with the same idempotency key until the answer is
definitive (a 2xx or a business 4xx), as a careful payments client does. At the end:
each user's balance equals what its definitive answers say, nothing moved twice, every
receipt arrived exactly once, and `wallet-audit` is clean.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from e2e.client import User, new_user, open_wallet
from e2e.conftest import BrevoStub, Stack

OPENING = 100_000


def definitive(api: httpx.Client, user: User, kind: str, body: dict[str, object], key: str) -> httpx.Response:
    headers = {**user.headers, "Idempotency-Key": key}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            response = api.patch(f"/transaction/{kind}", json=body, headers=headers)
        except httpx.TransportError:
            time.sleep(0.1)
            continue
        code = response.status_code
        retry = code == 429 or code >= 500 or (code == 409 and response.json().get("code") == "idempotency_in_progress")
        if not retry:
            return response
        time.sleep(0.1)
    raise AssertionError(f"no definitive answer for {kind} {key}")


def wait_healthy(stack: Stack, timeout: float = 90) -> None:
    """Wait until every service process answers its readiness check (after a fault heals)."""
    ports = stack.ports or {}
    urls = [
        f"http://127.0.0.1:{p}/readyz"
        for name, p in ports.items()
        if name == "auth" or (name.startswith("wallet") and not name.endswith("_metrics"))
    ]
    deadline = time.monotonic() + timeout
    for url in urls:
        while True:
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"{url} not ready after {timeout}s"
            time.sleep(0.2)


@dataclass
class Load:
    api: httpx.Client
    users: list[User]
    wallets: dict[int, int]  # user id -> wallet id
    results: list[tuple[str, User, User | None, int, httpx.Response]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def create(cls, api: httpx.Client, n_users: int, stack: Stack) -> Load:
        wait_healthy(stack)  # the previous scenario's fault has healed
        users = [new_user(api) for _ in range(n_users)]
        wallets = {u.id: open_wallet(api, u, balance=OPENING)["id"] for u in users}
        return cls(api, users, wallets)

    def client(self, user: User, moves: int, seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(moves):
            kind = rng.choice(["transfer", "transfer", "deposit", "withdraw"])
            amount = rng.randint(1, 500)
            other = rng.choice([u for u in self.users if u is not user]) if kind == "transfer" else None
            body: dict[str, object] = {"amount": amount, "currency": "USD"}
            if other is not None:
                body["to_account_id"] = self.wallets[other.id]
            response = definitive(self.api, user, kind, body, uuid.uuid4().hex)
            with self.lock:
                self.results.append((kind, user, other, amount, response))

    def run(self, moves_per_user: int, during: Callable[[], None] | None = None) -> None:
        threads = [threading.Thread(target=self.client, args=(u, moves_per_user, i)) for i, u in enumerate(self.users)]
        for t in threads:
            t.start()
        if during is not None:
            during()
        for t in threads:
            t.join(300)

    def expected(self) -> tuple[dict[int, int], Counter[tuple[str, str]]]:
        """Balances and receipt counts per (email, kind) that the definitive answers imply."""
        balances = {u.id: OPENING for u in self.users}
        receipts: Counter[tuple[str, str]] = Counter((u.email, "deposit") for u in self.users)  # opening
        for kind, user, other, amount, response in self.results:
            if response.status_code != 200:
                continue
            if kind == "deposit":
                balances[user.id] += amount
                receipts[(user.email, "deposit")] += 1
            elif kind == "withdraw":
                balances[user.id] -= amount
                receipts[(user.email, "withdrawal")] += 1
            else:
                assert other is not None
                balances[user.id] -= amount
                balances[other.id] += amount
                receipts[(user.email, "transfer_sent")] += 1
                receipts[(other.email, "transfer_received")] += 1
        return balances, receipts

    def verify(self, stack: Stack, brevo: BrevoStub) -> None:
        assert self.results, "no load ran"
        wait_healthy(stack)
        assert {r.status_code for *_, r in self.results} <= {200, 422}, Counter(r.status_code for *_, r in self.results)
        balances, receipts = self.expected()
        for user in self.users:
            got = self.api.get("/wallet", headers=user.headers).json()["balance"]
            assert got == balances[user.id], f"user {user.id}: balance {got}, expected {balances[user.id]}"
        audit = stack.command("wallet-audit", "--database-url", stack.wallet_database_url)
        assert audit.returncode == 0, audit.stdout
        # Every receipt exactly once (the stub records accepted emails; keys are unique).
        want = sum(receipts.values())
        emails = {u.email for u in self.users}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            got_receipts = [
                e
                for e in brevo.state()["emails"]
                if e["to"][0]["email"] in emails  # type: ignore[index, union-attr]
                and "receipt" in e["tags"]
            ]  # type: ignore[index]
            if len(got_receipts) >= want:
                break
            time.sleep(0.5)
        time.sleep(1.5)
        got_receipts = [
            e
            for e in brevo.state()["emails"]
            if e["to"][0]["email"] in emails  # type: ignore[index, union-attr]
            and "receipt" in e["tags"]
        ]  # type: ignore[index]
        counted = Counter((e["to"][0]["email"], e["tags"][1]) for e in got_receipts)  # type: ignore[index]
        assert counted == receipts, (
            f"receipts differ: {dict(counted - receipts)} extra, {dict(receipts - counted)} missing"
        )


def pids(stack: Stack, comm: str, *, check_env: bool = True) -> list[int]:
    """The stack's live processes named `comm`. (Redis rewrites its environment block, so
    it is found by port instead: check_env=False with a `match`.)"""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if (proc / "comm").read_text().strip() != comm:
                    continue
                if check_env and f"STACK_ID={stack.stack_id}".encode() not in (proc / "environ").read_bytes():
                    continue
                found.append(int(proc.name))
            except OSError:
                continue
    return found


def kill(stack: Stack, comm: str, *, match: str | None = None, check_env: bool = True) -> int:
    """SIGKILL the stack's processes named `comm` whose command line contains `match`."""
    killed = 0
    for pid in pids(stack, comm, check_env=check_env):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        if match is None or match in cmdline:
            os.kill(pid, signal.SIGKILL)
            killed += 1
    return killed


def after_progress(load: Load, share: float, total: int) -> None:
    """Block until `share` of the load's movements got their definitive answer."""
    while len(load.results) < share * total:
        time.sleep(0.05)
