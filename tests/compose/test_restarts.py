"""The compose stack (`make test-compose` boots it and sets COMPOSE_COMMAND): the wallet
containers and then Postgres restart while clients keep moving money; every movement is
answered once its retries (same Idempotency-Key) get through, the balances are exactly the
sum of what was acknowledged, and `wallet-audit` inside the wallet image finds no violation.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import threading
import time
import uuid

import httpx
import pytest
from tests.e2e.client import ServerError, User, balance, move, new_user, open_wallet

COMPOSE = os.environ.get("COMPOSE_COMMAND", "")
GATEWAY_URL = os.environ.get("GATEWAY_URL", "")

pytestmark = pytest.mark.skipif(
    not (COMPOSE and GATEWAY_URL), reason="needs the stack `make test-compose` boots (COMPOSE_COMMAND, GATEWAY_URL)"
)


def compose(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*shlex.split(COMPOSE), *args], capture_output=True, text=True, check=False, timeout=timeout)


def wait_healthy(service: str, timeout: float = 180) -> None:
    ids = compose("ps", "-q", service).stdout.split()
    assert ids, f"no {service} container"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = json.loads(subprocess.run(["docker", "inspect", *ids], capture_output=True, text=True).stdout)
        if all(s["State"]["Running"] and s["State"].get("Health", {}).get("Status") == "healthy" for s in states):
            return
        time.sleep(1)
    raise AssertionError(f"{service} not healthy again within {timeout}s")


class Traffic:
    """Clients depositing and transferring in a loop, recording every definitive answer."""

    def __init__(self, users: list[User], wallets: list[int]) -> None:
        self.users, self.wallets = users, wallets
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.answers: list[tuple[int, str, int, int, int]] = []  # (from, kind, amount, to, status)
        self.threads = [threading.Thread(target=self.client, args=(i,)) for i in range(len(users))]

    def client(self, i: int) -> None:
        user, to = self.users[i], (i + 1) % len(self.users)
        with httpx.Client(base_url=GATEWAY_URL, timeout=10) as api:
            n = 0
            while not self.stop.is_set():
                n += 1
                if n % 2:
                    status = self.settle(api, user, "deposit", amount=7)
                    answer = (i, "deposit", 7, i, status)
                else:
                    status = self.settle(api, user, "transfer", amount=3, to_account_id=self.wallets[to])
                    answer = (i, "transfer", 3, to, status)
                with self.lock:
                    self.answers.append(answer)

    @staticmethod
    def settle(api: httpx.Client, user: User, kind: str, **body: object) -> int:
        """`move` until definitive, with one key. A restart is a fault: while no replica
        is up the gateway answers 502, and while Postgres restarts the wallet may answer
        5xx, so here (unlike the e2e suite) a 5xx is retried, and only the final answer
        counts. A restart can outlast one `move`'s minute on a loaded host."""
        key = uuid.uuid4().hex
        deadline = time.monotonic() + 300
        while True:
            try:
                status = move(api, user, kind, key=key, **body).status_code
            except ServerError:
                status = 500
            if status < 500 or time.monotonic() > deadline:
                return status
            time.sleep(0.2)

    def count(self) -> int:
        with self.lock:
            return len(self.answers)

    def wait_for_more(self, n: int, timeout: float = 120) -> None:
        """Until `n` more movements than now were answered (traffic flows again)."""
        target = self.count() + n
        deadline = time.monotonic() + timeout
        while self.count() < target:
            assert time.monotonic() < deadline, f"traffic stalled at {self.count()} answers"
            time.sleep(0.2)


def test_wallet_and_postgres_restarts_under_traffic_lose_and_double_nothing() -> None:
    with httpx.Client(base_url=GATEWAY_URL, timeout=30) as api:
        users = [new_user(api) for _ in range(4)]
        wallets = [int(open_wallet(api, u, balance=1000)["id"]) for u in users]
        traffic = Traffic(users, wallets)
        for thread in traffic.threads:
            thread.start()
        try:
            traffic.wait_for_more(20)
            restarted = compose("restart", "wallet")
            assert restarted.returncode == 0, restarted.stderr
            wait_healthy("wallet")
            traffic.wait_for_more(20)
            restarted = compose("restart", "postgres")
            assert restarted.returncode == 0, restarted.stderr
            wait_healthy("postgres")
            traffic.wait_for_more(20)
        finally:
            traffic.stop.set()
            for thread in traffic.threads:
                thread.join(90)

        assert {a[4] for a in traffic.answers} == {200}, [a for a in traffic.answers if a[4] != 200][:5]
        expected = [1000] * len(users)
        for sender, kind, amount, to, _ in traffic.answers:
            if kind == "deposit":
                expected[sender] += amount
            else:
                expected[sender] -= amount
                expected[to] += amount
        assert [balance(api, u) for u in users] == expected

    audit = compose("exec", "-T", "wallet", "wallet-audit", timeout=120)
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert "violations: 0" in audit.stdout
