"""Holds, refunds and balances through the gateway, with two wallet replicas behind it."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from .client import User, balance, move, new_user, open_wallet
from .conftest import Stack, drop_databases, postgres_stack_env, start_stack


def post(api: httpx.Client, user: User, path: str, *, key: str | None = None, **body: Any) -> httpx.Response:
    return api.post(path, json=body, headers={**user.headers, "Idempotency-Key": key or uuid.uuid4().hex})


def _last_transaction(api: httpx.Client, user: User) -> int:
    return int(api.get("/transaction/history?limit=1", headers=user.headers).json()["transactions"][0]["id"])


class TestLifeOfAHold:
    def test_place_capture_part_and_refund(self, api: httpx.Client) -> None:
        payer, shop = new_user(api), new_user(api, first_name="Corner", last_name="Shop")
        open_wallet(api, payer, balance=1000)
        shop_wallet = open_wallet(api, shop)["id"]
        placed = post(api, payer, "/holds", amount=400, currency="USD", to_account_id=shop_wallet)
        assert placed.status_code == 201, placed.text
        hold = placed.json()
        assert api.get("/wallet/balance", headers=payer.headers).json()["available"] == 600
        refused = move(api, payer, "withdraw", amount=601)
        assert (refused.status_code, refused.json()["code"]) == (422, "insufficient_funds")

        key = uuid.uuid4().hex
        captures = [post(api, payer, f"/holds/{hold['id']}/capture", key=key, amount=250) for _ in range(4)]
        assert len({c.content for c in captures}) == 1  # replayed byte for byte, whichever replica answers
        assert [c.headers.get("idempotent-replayed") for c in captures] == [None, "true", "true", "true"]
        captured = captures[0].json()
        assert (captured["status"], captured["captured_amount"]) == ("captured", 250)
        assert api.get(f"/holds/{hold['id']}", headers=payer.headers).json() == captured
        assert [h["id"] for h in api.get("/holds?status=captured", headers=payer.headers).json()["holds"]] == [
            hold["id"]
        ]
        assert (balance(api, payer), balance(api, shop)) == (750, 250)
        again = post(api, payer, f"/holds/{hold['id']}/void")
        assert (again.status_code, again.json()["code"]) == (409, "hold_not_active")

        txn = captured["transaction_id"]
        item = api.get(f"/transaction/{txn}", headers=shop.headers).json()
        assert (item["type"], item["receiver"], item["refunded_total"], item["refund_of"]) == (
            "transfer",
            "Corner Shop",
            0,
            None,
        )
        by_payer = post(api, payer, f"/transaction/{txn}/refund")
        assert (by_payer.status_code, by_payer.json()["code"]) == (403, "refund_not_allowed")
        refund = post(api, shop, f"/transaction/{txn}/refund", amount=100)
        assert refund.status_code == 200, refund.text
        assert (refund.json()["refunded_total"], refund.json()["current_balance"]) == (100, 150)
        assert api.get(f"/transaction/{refund.json()['refund_id']}", headers=payer.headers).json()["refund_of"] == txn
        too_much = post(api, shop, f"/transaction/{txn}/refund", amount=151)
        assert (too_much.status_code, too_much.json()["code"]) == (422, "refund_exceeds_transfer")

        now = api.get("/wallet/balance", headers=payer.headers).json()
        assert {k: now[k] for k in ("balance", "held", "available")} == {"balance": 850, "held": 0, "available": 850}

    def test_void_releases_and_racing_holds_never_overdraw(self, api: httpx.Client) -> None:
        user = new_user(api)
        open_wallet(api, user, balance=500)
        hold = post(api, user, "/holds", amount=500, currency="USD").json()
        assert post(api, user, f"/holds/{hold['id']}/void").json()["status"] == "voided"
        with ThreadPoolExecutor(8) as pool:  # across both replicas
            answers = list(pool.map(lambda _: post(api, user, "/holds", amount=100, currency="USD"), range(12)))
        assert sorted(a.status_code for a in answers) == [201] * 5 + [422] * 7
        assert api.get("/wallet/balance", headers=user.headers).json()["held"] == 500
        assert len(api.get("/holds?status=active", headers=user.headers).json()["holds"]) == 5

    def test_another_users_holds_and_transactions_are_404(self, api: httpx.Client) -> None:
        owner, stranger = new_user(api), new_user(api)
        open_wallet(api, owner, balance=100)
        open_wallet(api, stranger, balance=100)
        hold = post(api, owner, "/holds", amount=10, currency="USD").json()
        txn = _last_transaction(api, owner)
        assert api.get(f"/holds/{hold['id']}", headers=stranger.headers).status_code == 404
        assert post(api, stranger, f"/holds/{hold['id']}/void").status_code == 404
        assert post(api, stranger, f"/holds/{hold['id']}/capture", to_account_id=1).status_code == 404
        assert api.get(f"/transaction/{txn}", headers=stranger.headers).status_code == 404
        assert post(api, stranger, f"/transaction/{txn}/refund").status_code == 404
        assert api.get(f"/holds/{hold['id']}", headers=owner.headers).json()["status"] == "active"

    def test_unauthenticated_money_calls_are_401_at_the_gateway(self, api: httpx.Client) -> None:
        for path in ("/holds", "/holds/1/capture", "/holds/1/void", "/transaction/1/refund"):
            response = api.post(path, json={}, headers={"Idempotency-Key": "k"})
            assert response.status_code == 401, path
            assert response.headers["www-authenticate"] == "Bearer"


@pytest.fixture(scope="module")
def pg_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    env = postgres_stack_env("holds")
    if env is None:
        pytest.skip("TEST_DATABASE_URL is not set: the Postgres run needs a Postgres server")
    unlimited = {"GATEWAY_MONEY_RATE_AVERAGE": "100000", "GATEWAY_MONEY_RATE_BURST": "100000"}
    stack = start_stack(tmp_path_factory.mktemp("pg-holds") / "var", **env, **unlimited, WALLET_REPLICAS="2")
    try:
        yield stack
    finally:
        stack.stop()
        drop_databases(env)


class TestOnPostgresWithTwoReplicas:
    """The app role (granted only what models.GRANTS says) and row locks across processes."""

    def test_racing_captures_voids_refunds_and_holds_settle_once(self, pg_stack: Stack) -> None:
        with httpx.Client(base_url=pg_stack.url, timeout=30) as api:
            payer, shop = new_user(api), new_user(api)
            open_wallet(api, payer, balance=1000)
            to = open_wallet(api, shop)["id"]
            hold = post(api, payer, "/holds", amount=300, currency="USD", to_account_id=to).json()
            paths = [f"/holds/{hold['id']}/{'capture' if i % 2 else 'void'}" for i in range(16)]
            with ThreadPoolExecutor(8) as pool:
                settled = Counter(a.status_code for a in pool.map(lambda p: post(api, payer, p), paths))
                assert settled == {200: 1, 409: 15}
                status = api.get(f"/holds/{hold['id']}", headers=payer.headers).json()["status"]
                holds = list(pool.map(lambda _: post(api, payer, "/holds", amount=100, currency="USD"), range(14)))
            assert balance(api, shop) == (300 if status == "captured" else 0)
            left = balance(api, payer)
            assert sorted(h.status_code for h in holds) == [201] * (left // 100) + [422] * (14 - left // 100)
            txn = int(api.get("/transaction/history?limit=1", headers=payer.headers).json()["transactions"][0]["id"])
            if status == "captured":
                with ThreadPoolExecutor(8) as pool:
                    refunds = list(
                        pool.map(lambda _: post(api, shop, f"/transaction/{txn}/refund", amount=70), range(8))
                    )
                assert sorted(r.status_code for r in refunds) == [200] * 4 + [422] * 4
                assert api.get(f"/transaction/{txn}", headers=shop.headers).json()["refunded_total"] == 280
        audit = pg_stack.command("wallet-audit", "--database-url", pg_stack.wallet_database_url)
        assert audit.returncode == 0, audit.stdout
