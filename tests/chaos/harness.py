"""Load with careful clients, fault injection, and the exactly-once checks for the chaos tests.

Clients retry each money movement with the same idempotency key until the answer is
definitive (a 2xx or a business 4xx), as a careful payments client does; a 5xx is
retried too, but only one met while a fault is on (`Load.fault`) is forgiven. At the end:
each user's balance equals what its definitive answers say, nothing moved twice, every
email (welcome and receipts) arrived exactly once at Brevo's stand-in and the notifier's
own counters agree (sent once per email, no dead letters), and `wallet-audit` is clean.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis
from e2e.client import User, new_user, open_wallet
from e2e.conftest import BrevoStub, Stack
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, text

OPENING = 100_000


@dataclass
class ServerError:
    """A 5xx a careful client got (and retried): allowed only while a fault is on."""

    kind: str
    key: str
    status: int
    body: str
    sent: float  # monotonic time the request left
    answered: float


def definitive(
    api: httpx.Client, user: User, kind: str, body: dict[str, object], key: str, errors: list[ServerError]
) -> httpx.Response:
    """Retry with the same key until the answer is definitive; every 5xx met is recorded."""
    headers = {**user.headers, "Idempotency-Key": key}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        sent = time.monotonic()
        try:
            response = api.patch(f"/transaction/{kind}", json=body, headers=headers)
        except httpx.TransportError:
            time.sleep(0.1)
            continue
        code = response.status_code
        if code >= 500:
            errors.append(ServerError(kind, key, code, response.text[:500], sent, time.monotonic()))
        retry = code == 429 or code >= 500 or (code == 409 and response.json().get("code") == "idempotency_in_progress")
        if not retry:
            return response
        time.sleep(0.1)
    raise AssertionError(f"no definitive answer for {kind} {key}")


def wait_healthy(stack: Stack, timeout: float = 90) -> None:
    """Wait until every service process answers its readiness check with every dependency
    up (after a fault heals: a Redis outage leaves /readyz at 200, "degraded")."""
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
                response = httpx.get(url, timeout=2)
                if response.status_code == 200 and response.json()["status"] == "ok":
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"{url} not ready after {timeout}s"
            time.sleep(0.2)


EMAIL_KINDS = ("welcome", "deposit", "withdrawal", "transfer_sent", "transfer_received")


@dataclass(frozen=True)
class NotifierCounts:
    """The notifier's own view, from its metrics port (summed over its processes)."""

    delivered: Counter[str]  # by kind, including emails Brevo already had
    already: Counter[str]  # of those, the ones Brevo already had
    accepted: float  # Brevo calls answered 201 (a new email)
    duplicates_dropped: float
    dead_letters: float | None
    calls: Counter[str]  # Brevo calls by outcome (status, timeout, unreachable): for the summary

    @classmethod
    def scrape(cls, stack: Stack) -> NotifierCounts:
        port = (stack.ports or {})["notifier_metrics"]
        deadline = time.monotonic() + 30  # the notifier may be restarting
        while True:
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the notifier's metrics port does not answer"
                time.sleep(0.2)
        delivered: Counter[str] = Counter()
        already: Counter[str] = Counter()
        accepted = dropped = 0.0
        dead: float | None = None
        calls: Counter[str] = Counter()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "notifier_emails_delivered_total":
                    delivered[sample.labels["kind"]] += int(sample.value)
                elif sample.name == "notifier_emails_already_at_brevo_total":
                    already[sample.labels["kind"]] += int(sample.value)
                elif sample.name == "notifier_brevo_calls_total":
                    calls[sample.labels["outcome"]] += int(sample.value)
                    if sample.labels["outcome"] == "201":
                        accepted += sample.value
                elif sample.name == "notifier_duplicates_dropped_total":
                    dropped += sample.value
                elif sample.name == "notifier_dead_letters":
                    dead = (dead or 0.0) + sample.value
        return cls(delivered, already, accepted, dropped, dead, calls)

    def since(self, before: NotifierCounts) -> NotifierCounts:
        return NotifierCounts(
            Counter({k: self.delivered[k] - before.delivered[k] for k in EMAIL_KINDS}),
            Counter({k: self.already[k] - before.already[k] for k in EMAIL_KINDS}),
            self.accepted - before.accepted,
            self.duplicates_dropped - before.duplicates_dropped,
            self.dead_letters,
            Counter({k: n - before.calls[k] for k, n in self.calls.items()}),
        )


@dataclass
class Load:
    api: httpx.Client
    users: list[User]
    wallets: dict[int, int]  # user id -> wallet id
    stack: Stack
    brevo: BrevoStub
    before: NotifierCounts
    results: list[tuple[str, User, User | None, int, httpx.Response]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server_errors: list[ServerError] = field(default_factory=list)
    faults: list[tuple[float, float]] = field(default_factory=list)  # (struck, healed), monotonic

    @classmethod
    def create(cls, api: httpx.Client, n_users: int, stack: Stack, brevo: BrevoStub) -> Load:
        wait_healthy(stack)  # the previous scenario's fault has healed
        settle(stack)  # and its emails are all sent: what is counted from here is this one's
        before = NotifierCounts.scrape(stack)
        users = [new_user(api) for _ in range(n_users)]
        wallets = {u.id: open_wallet(api, u, balance=OPENING)["id"] for u in users}
        return cls(api, users, wallets, stack, brevo, before)

    @contextmanager
    def fault(self) -> Iterator[None]:
        """A fault window: from the strike until every service is ready again after the
        block ends. A 5xx is retried as a careful client would, but outside these windows
        it fails the scenario."""
        struck = time.monotonic()
        try:
            yield
        finally:
            wait_healthy(self.stack)
            self.faults.append((struck, time.monotonic()))

    def unexplained_server_errors(self) -> list[ServerError]:
        return [e for e in self.server_errors if not any(s <= e.answered and e.sent <= h for s, h in self.faults)]

    def client(self, user: User, moves: int, seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(moves):
            kind = rng.choice(["transfer", "transfer", "deposit", "withdraw"])
            amount = rng.randint(1, 500)
            other = rng.choice([u for u in self.users if u is not user]) if kind == "transfer" else None
            body: dict[str, object] = {"amount": amount, "currency": "USD"}
            if other is not None:
                body["to_account_id"] = self.wallets[other.id]
            response = definitive(self.api, user, kind, body, uuid.uuid4().hex, self.server_errors)
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
        """Balances and email counts per (address, kind) that the definitive answers imply."""
        balances = {u.id: OPENING for u in self.users}
        receipts: Counter[tuple[str, str]] = Counter((u.email, "deposit") for u in self.users)  # opening
        receipts.update((u.email, "welcome") for u in self.users)
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

    def verify(self, *, redis_fault: bool = False, notifier_restarts: bool = False) -> None:
        """Money moved exactly once, and every email was sent exactly once, as Brevo's
        stand-in saw it and as the notifier counted it.

        redis_fault: the notifier's sent markers may be lost (or unwritable after a send), so
        it may send again and Brevo's idempotencyKey refuses the repeat.
        notifier_restarts: the notifier was killed mid-send, so Brevo may hold an email whose
        201 no notifier heard.
        """
        stack = self.stack
        assert self.results, "no load ran"
        wait_healthy(stack)
        assert {r.status_code for *_, r in self.results} <= {200, 422}, Counter(r.status_code for *_, r in self.results)
        unexplained = self.unexplained_server_errors()
        assert not unexplained, f"5xx outside a fault window ({len(unexplained)}): {unexplained[:5]}"
        balances, emails = self.expected()
        for user in self.users:
            got = self.api.get("/wallet", headers=user.headers).json()["balance"]
            assert got == balances[user.id], f"user {user.id}: balance {got}, expected {balances[user.id]}"
        audit = stack.command("wallet-audit", "--database-url", stack.wallet_database_url)
        assert audit.returncode == 0, audit.stdout
        want = sum(emails.values())
        by_kind: Counter[str] = Counter()
        for (_, kind), n in emails.items():
            by_kind[kind] += n
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            counts = NotifierCounts.scrape(stack).since(self.before)
            arrived = self.arrived()
            if sum(arrived.values()) >= want and all(counts.delivered[k] >= n for k, n in by_kind.items()):
                break
            time.sleep(0.5)
        time.sleep(1.5)  # a repeat would show up by now
        counts = NotifierCounts.scrape(stack).since(self.before)
        arrived = self.arrived()
        print(
            f"\nemails: {want} expected; notifier delivered {dict(counts.delivered)}, "
            f"Brevo already had {dict(+counts.already)}, 201s {counts.accepted:.0f}, "
            f"redeliveries dropped {counts.duplicates_dropped:.0f}, dead letters {counts.dead_letters}, "
            f"Brevo calls by outcome {dict(+counts.calls)}; "
            f"5xx retried in fault windows: {dict(Counter((e.status, e.body[:80]) for e in self.server_errors))}"
        )
        # Brevo's stand-in: each email accepted once (it refuses repeated keys, so count them).
        assert arrived == emails, f"emails differ: {dict(arrived - emails)} extra, {dict(emails - arrived)} missing"
        # The notifier's own counts.
        assert counts.dead_letters == 0, f"dead letters: {counts.dead_letters}"
        for kind in EMAIL_KINDS:
            delivered, already = counts.delivered[kind], counts.already[kind]
            if redis_fault or notifier_restarts:
                assert delivered >= by_kind[kind], f"{kind}: {delivered} delivered, {by_kind[kind]} expected"
                assert delivered - already <= by_kind[kind], f"{kind}: {delivered - already} new at Brevo"
            else:  # nothing lost the notifier's markers: it never had to be refused
                assert (delivered, already) == (by_kind[kind], 0), f"{kind}: {delivered} delivered, {already} repeats"
        if notifier_restarts:
            assert counts.accepted <= want
        else:
            assert counts.accepted == want, f"Brevo accepted {counts.accepted:.0f} new emails, {want} expected"

    def arrived(self) -> Counter[tuple[str, str]]:
        """What Brevo's stand-in accepted for these users, per (address, kind)."""
        addresses = {u.email for u in self.users}
        got: Counter[tuple[str, str]] = Counter()
        for e in brevo_emails(self.brevo):
            address, tags = e["to"][0]["email"], e["tags"]
            if address in addresses:
                got[(address, tags[1] if tags[0] == "receipt" else tags[0])] += 1
        return got


def settle(stack: Stack, timeout: float = 90) -> None:
    """Wait until every email the stack has staged so far is settled, so a scenario counts
    only its own deliveries: each outbox row (auth's and the wallet's) confirmed by its
    relay (the notifier's "sent" or "dead" marker seen), and no claim on an email being
    sent. A worker killed between counting an email and marking it sent leaves its row
    unconfirmed: the redelivery sends again once the claim expires (Brevo refuses the
    repeat) and counts it once more, which the scenario that killed it allows and the next
    one would not. (Not the Dramatiq queues: after a Redis outage a live worker may keep
    messages it dropped listed as its own until it restarts, their emails sent meanwhile by
    the relays' republishing.)"""
    client = redis.Redis.from_url(stack.redis_url)
    env = stack.env or {}
    engines = {name: create_engine(env[f"{name.upper()}_DATABASE_URL"]) for name in ("auth", "wallet")}
    unsettled: dict[str, int] = {}
    started = time.monotonic()
    deadline = started + timeout
    quiet_since: float | None = None
    try:
        while time.monotonic() < deadline:
            unsettled = {"claims": sum(1 for _ in client.scan_iter(match="notifier:sending:*", count=1000))}
            for name, engine in engines.items():
                with engine.connect() as conn:
                    unsettled[f"{name} outbox unconfirmed"] = conn.execute(UNCONFIRMED).scalar_one()
            if any(unsettled.values()):
                quiet_since = None
            elif quiet_since is None:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= 1:  # and stays so
                print(f"notifier settled after {quiet_since - started:.1f} s")
                return
            time.sleep(0.5)
    finally:
        client.close()
        for engine in engines.values():
            engine.dispose()
    raise AssertionError(f"the emails never settled: {unsettled}")


UNCONFIRMED = text("SELECT count(*) FROM outbox WHERE confirmed_at IS NULL")


def brevo_emails(brevo: BrevoStub) -> list[Any]:
    emails = brevo.state()["emails"]
    assert isinstance(emails, list)
    return emails


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
