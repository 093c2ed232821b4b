"""The wallet contract through the gateway, with two wallet replicas behind it."""

from __future__ import annotations

import uuid

import httpx
import pytest
import redis

from .client import balance, move, new_user, open_wallet
from .conftest import Stack


class TestWalletFlow:
    def test_the_contract_example(self, api: httpx.Client) -> None:
        jane = new_user(api, first_name="Jane", last_name="Doe")
        john = new_user(api, first_name="John", last_name="Smith")
        created = open_wallet(api, jane, balance=500)
        assert set(created) == {"id", "user_id", "balance", "created_at", "currency"}
        assert created["created_at"].endswith("Z")
        to = open_wallet(api, john, balance=200)["id"]

        assert move(api, jane, "deposit", amount=200).json()["current_balance"] == 700
        assert move(api, jane, "withdraw", amount=50).json()["current_balance"] == 650
        sent = move(api, jane, "transfer", amount=100, to_account_id=to)
        assert sent.json() == {
            "wallet_id": created["id"],
            "recipient_wallet_id": to,
            "amount": 100,
            "current_balance": 550,
        }

        wallet = api.get("/wallet", headers=jane.headers).json()
        assert wallet["full name"] == "Jane Doe"
        assert wallet["balance"] == 550

        items = api.get("/transaction/history", headers=jane.headers).json()["transactions"]
        assert [(t["type"], t["sender"], t["receiver"]) for t in items[:3]] == [
            ("transfer", "Jane Doe", "John Smith"),
            ("withdrawal", "Jane Doe", "External Destination"),
            ("deposit", "External Source", "Jane Doe"),
        ]
        entries = api.get(f"/transaction/{items[0]['id']}/ledger", headers=jane.headers).json()
        assert [(e["entry_type"], e["balance_snapshot"]) for e in entries] == [("debit", 550), ("credit", 300)]
        assert api.get(f"/transaction/{items[0]['id']}/ledger", headers=new_user(api).headers).status_code == 404

    def test_replays_cross_replicas_byte_for_byte(self, api: httpx.Client) -> None:
        user = new_user(api)
        open_wallet(api, user, balance=100)
        key = uuid.uuid4().hex
        answers = [move(api, user, "withdraw", key=key, amount=30) for _ in range(6)]  # round-robin over replicas
        assert len({a.content for a in answers}) == 1
        assert [a.headers.get("idempotent-replayed") for a in answers] == [None] + ["true"] * 5
        assert balance(api, user) == 70

    def test_close_wallet(self, api: httpx.Client) -> None:
        user = new_user(api, first_name="Ada", last_name="Lovelace")
        open_wallet(api, user, balance=5)
        assert api.delete("/wallet", headers=user.headers).json()["code"] == "wallet_not_empty"
        move(api, user, "withdraw", amount=5)
        closed = api.delete("/wallet", headers=user.headers)
        assert closed.json() == {"message": "wallet belonging to Ada Lovelace deleted successfully"}


class TestRedisFlushed:
    def test_a_retry_after_redis_lost_its_data_moves_nothing(self, api: httpx.Client, stack: Stack) -> None:
        if not stack.redis_url:
            pytest.skip("GATEWAY_URL given: this test needs the stack it starts itself (to flush its Redis)")
        user = new_user(api)
        open_wallet(api, user, balance=100)
        key = uuid.uuid4().hex
        first = move(api, user, "withdraw", key=key, amount=60)
        redis.Redis.from_url(stack.redis_url).flushall()  # fault injection: the cache forgets everything
        retry = move(api, user, "withdraw", key=key, amount=60)
        assert retry.content == first.content
        assert retry.headers["idempotent-replayed"] == "true"
        assert balance(api, user) == 40
        audit = stack.command("wallet-audit", "--database-url", stack.wallet_database_url)
        assert audit.returncode == 0, audit.stdout
