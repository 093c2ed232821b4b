"""A wallet's history (ordered by transaction id) agrees with its snapshots even when a
movement waits for a lock: its id and time are drawn only once it holds both wallets."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Connection, create_engine, text

from wallet.config import Settings

from .factories import AuthFake, Signer, User, call, move, new_user, open_wallet


@pytest.fixture
def settings(database_url: str, redis_url: str) -> Settings:
    if not database_url.startswith("postgresql"):
        pytest.skip("needs Postgres (TEST_DATABASE_URL): SQLite runs one writer at a time, so no movement waits")
    # A generous lock timeout: the blocked movement must wait, not give up, however slow the machine.
    return Settings(
        database_url=database_url,
        redis_url=redis_url,
        service_token="test-service-token",
        allow_dev_service_token=True,
        db_lock_timeout_ms=60_000,
    )


def wait_until_blocked_by(conn: Connection, pid: int) -> None:
    """Wait until some backend waits for a lock `pid` holds (never asserts a duration)."""
    deadline = time.monotonic() + 60
    while True:
        blocked = conn.execute(
            text("SELECT count(*) FROM pg_stat_activity WHERE :pid = ANY(pg_blocking_pids(pid))"), {"pid": pid}
        ).scalar_one()
        if blocked:
            return
        assert time.monotonic() < deadline, "the movement never waited for the held lock"
        time.sleep(0.02)


def history_with_snapshots(client: TestClient, user: User, wallet_id: int) -> list[dict[str, Any]]:
    """The user's whole history, newest first, each item with its entry on `wallet_id`."""
    items: list[dict[str, Any]] = []
    while True:
        page = client.get(f"/transaction/history?limit=100&offset={len(items)}", headers=user.headers).json()
        items += page["transactions"]
        if len(page["transactions"]) < 100:
            break
    for item in items:
        entries = client.get(f"/transaction/{item['id']}/ledger", headers=user.headers).json()
        (item["entry"],) = [e for e in entries if e["wallet_id"] == wallet_id]
    return items


def running_balance_breaks(items: list[dict[str, Any]], balance: int) -> list[str]:
    """Where a newest-first history is not a running balance ending at `balance`."""
    breaks = []
    expected = balance
    for item in items:
        entry = item["entry"]
        if entry["balance_snapshot"] != expected:
            breaks.append(f"transaction {item['id']}: snapshot {entry['balance_snapshot']}, expected {expected}")
        expected = entry["balance_snapshot"] - (
            entry["amount"] if entry["entry_type"] == "credit" else -entry["amount"]
        )
    if expected != 0:
        breaks.append(f"the oldest transaction does not start from 0 (but from {expected})")
    return breaks


class TestAMovementThatWaitsForALock:
    def test_books_after_the_movement_that_overtook_it(
        self, client: TestClient, signer: Signer, auth_fake: AuthFake, holder: Connection, database_url: str
    ) -> None:
        x, y = new_user(signer, auth_fake), new_user(signer, auth_fake)
        wx = open_wallet(client, x, balance=100)["id"]
        open_wallet(client, y, balance=500)
        shard = client.app.state.system_wallets.for_user("USD", x.id)  # type: ignore[attr-defined]
        assert shard < wx  # x's deposit locks the shard first, then x's wallet

        # Something else holds the shard x's deposits use.
        holder.execute(text("SELECT id FROM wallets WHERE id = :id FOR UPDATE"), {"id": shard})
        holder_pid = holder.execute(text("SELECT pg_backend_pid()")).scalar_one()
        answers: list[tuple[int, bytes]] = []
        blocked = threading.Thread(
            target=lambda: answers.append(call(client, x, "deposit", uuid.uuid4().hex, amount=10))
        )
        blocked.start()
        try:
            with create_engine(database_url).connect() as watcher:
                wait_until_blocked_by(watcher, holder_pid)
            # Meanwhile a transfer into x's wallet (another pair of wallets) books at once.
            overtaking = move(client, y, "transfer", amount=7, to_account_id=wx)
            assert overtaking.status_code == 200, overtaking.text
        finally:
            holder.rollback()
            blocked.join(60)
        assert [status for status, _ in answers] == [200]

        history = history_with_snapshots(client, x, wx)
        assert [(h["type"], h["entry"]["balance_snapshot"]) for h in history] == [
            ("deposit", 117),  # booked last: the newest, with the largest id
            ("transfer", 107),
            ("deposit", 100),  # the opening balance
        ]
        assert history[0]["id"] > history[1]["id"] > history[2]["id"]
        dates = [datetime.fromisoformat(h["date"]) for h in history]
        assert dates == sorted(dates, reverse=True)  # the time too is read once the locks are held
        assert running_balance_breaks(history, client.get("/wallet", headers=x.headers).json()["balance"]) == []
