"""Holds, refunds and balances through the gateway, with two wallet replicas behind it."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from .client import User, balance, move, new_user, open_wallet


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
