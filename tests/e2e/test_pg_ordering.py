"""On Postgres with two wallet replicas, a wallet hammered from many threads at once
(deposits, withdrawals, incoming transfers) keeps a history that, newest first, is a
running balance ending at its balance: ids, times and snapshots agree."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import httpx
import pytest

from .client import User, balance, new_user, open_wallet
from .conftest import Stack, drop_databases, postgres_stack_env, start_stack

RETRY_CODES = {"idempotency_in_progress", "wallet_busy"}  # "try again with the same key"


@pytest.fixture(scope="module")
def pg_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    env = postgres_stack_env("ordering")
    if env is None:
        pytest.skip("TEST_DATABASE_URL is not set: the ordering run needs a Postgres server")
    # The limiter is not under test here: the target's 120 movements must reach the wallets
    # as fast as they come (faster than the default per-token rate, now that they are quick).
    unlimited = {"GATEWAY_MONEY_RATE_AVERAGE": "100000", "GATEWAY_MONEY_RATE_BURST": "100000"}
    stack = start_stack(tmp_path_factory.mktemp("pg-ordering") / "var", **env, **unlimited, WALLET_REPLICAS="2")
    try:
        yield stack
    finally:
        stack.stop()
        drop_databases(env)


@pytest.fixture
def gw(pg_stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=pg_stack.url, timeout=30) as client:
        yield client


def settle(api: httpx.Client, user: User, kind: str, **body: Any) -> httpx.Response:
    """One movement under one key, sent again only while the answer says to retry (a
    retryable problem, or no answer at all); any other answer, a 5xx included, is final."""
    body.setdefault("currency", "USD")
    headers = {**user.headers, "Idempotency-Key": uuid.uuid4().hex}
    deadline = time.monotonic() + 60
    while True:
        try:
            response: httpx.Response | None = api.patch(f"/transaction/{kind}", json=body, headers=headers)
        except httpx.TransportError:
            response = None
        if response is not None and not (
            response.status_code in (409, 503) and response.json().get("code") in RETRY_CODES
        ):
            return response
        assert time.monotonic() < deadline, f"no final answer: {response.text if response else 'no response'}"
        time.sleep(float(response.headers.get("retry-after", 0.05)) if response is not None else 0.05)


def history_of(api: httpx.Client, user: User, wallet_id: int) -> list[dict[str, Any]]:
    """The user's whole history, newest first, page by page, each item with its ledger entry
    on `wallet_id`."""
    items: list[dict[str, Any]] = []
    while True:
        page = api.get("/transaction/history", params={"limit": 100, "offset": len(items)}, headers=user.headers)
        assert page.status_code == 200, page.text
        items += page.json()["transactions"]
        if len(page.json()["transactions"]) < 100:
            break
    for item in items:
        entries = api.get(f"/transaction/{item['id']}/ledger", headers=user.headers)
        assert entries.status_code == 200, entries.text
        (item["entry"],) = [e for e in entries.json() if e["wallet_id"] == wallet_id]
    return items


def test_a_hammered_wallets_history_is_its_running_balance(gw: httpx.Client, pg_stack: Stack) -> None:
    # The senders' wallets are older (smaller ids), so a transfer locks its sender first and
    # may wait there while movements on the target book; so does a deposit or withdrawal
    # behind the target's system wallet, which the senders' own deposits may share.
    senders = [new_user(gw) for _ in range(4)]
    for sender in senders:
        open_wallet(gw, sender, balance=10_000)
    target = new_user(gw)
    wallet_id = open_wallet(gw, target, balance=1_000)["id"]

    def job(i: int) -> tuple[str, httpx.Response]:
        sender = senders[i % len(senders)]
        kind, user, body = [
            ("deposit", target, {"amount": 7}),
            ("withdraw", target, {"amount": 5}),
            ("transfer", sender, {"amount": 3, "to_account_id": wallet_id}),
            ("deposit", sender, {"amount": 2}),
        ][i % 4]
        return kind, settle(gw, user, kind, **body)

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(job, range(240)))
    assert [a.text for _, a in answers if a.status_code != 200] == []

    history = history_of(gw, target, wallet_id)
    assert len(history) == 1 + 180  # the opening deposit and every movement touching the target
    assert [h["id"] for h in history] == sorted((h["id"] for h in history), reverse=True)
    expected, breaks = balance(gw, target), []
    assert expected == 1_000 + 60 * (7 - 5 + 3)
    for item in history:  # newest first: each snapshot is the next older one plus its own amount
        entry = item["entry"]
        if entry["balance_snapshot"] != expected:
            breaks.append(f"transaction {item['id']}: snapshot {entry['balance_snapshot']}, expected {expected}")
        expected = entry["balance_snapshot"] - (
            entry["amount"] if entry["entry_type"] == "credit" else -entry["amount"]
        )
    assert breaks == []
    assert expected == 0  # the opening deposit started from nothing
    dates = [datetime.fromisoformat(h["date"]) for h in history]
    assert dates == sorted(dates, reverse=True)  # and the times agree with the order
    audit = pg_stack.command("wallet-audit", "--database-url", pg_stack.wallet_database_url)
    assert audit.returncode == 0, audit.stdout + audit.stderr
