"""Refunds, one transaction's detail, balances now and at a past time, and the audit of
held money."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from datetime import datetime, timedelta
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import text

from svckit.db import utcnow
from wallet import refunds
from wallet.audit import audit

from .factories import (
    AuthFake,
    Signer,
    User,
    call_use_case,
    move,
    new_user,
    open_wallet,
    place_hold,
    post,
    run_all,
    sync_engine,
)


def _transfer(client: TestClient, sender: User, to: int, amount: int) -> int:
    moved = move(client, sender, "transfer", amount=amount, to_account_id=to)
    assert moved.status_code == 200, moved.text
    history = client.get("/transaction/history?limit=1", headers=sender.headers).json()["transactions"]
    return int(history[0]["id"])


def _pair(client: TestClient, signer: Signer, auth_fake: AuthFake, amount: int) -> tuple[User, User, int, int]:
    """A sender, a shop, and a transfer of `amount` between them."""
    sender, shop = new_user(signer, auth_fake), new_user(signer, auth_fake, first="Shop", last="Keeper")
    open_wallet(client, sender, balance=1000)
    shop_wallet = open_wallet(client, shop)["id"]
    return sender, shop, shop_wallet, _transfer(client, sender, shop_wallet, amount)


def _balance(client: TestClient, user: User) -> int:
    return int(client.get("/wallet", headers=user.headers).json()["balance"])


class TestRefund:
    def test_the_recipient_refunds_in_part_then_the_rest(
        self, client: TestClient, signer: Signer, auth_fake: AuthFake
    ) -> None:
        sender, shop, _, txn = _pair(client, signer, auth_fake, 100)
        first = post(client, shop, f"/transaction/{txn}/refund", amount=30)
        assert first.status_code == 200, first.text
        body = first.json()
        assert set(body) == {"refund_id", "transaction_id", "amount", "refunded_total", "current_balance"}
        assert (body["transaction_id"], body["amount"], body["refunded_total"], body["current_balance"]) == (
            txn,
            30,
            30,
            70,
        )
        rest = post(client, shop, f"/transaction/{txn}/refund").json()  # default: what is left
        assert (rest["amount"], rest["refunded_total"], rest["current_balance"]) == (70, 100, 0)
        assert (_balance(client, sender), _balance(client, shop)) == (1000, 0)
        more = post(client, shop, f"/transaction/{txn}/refund", amount=1)
        assert (more.status_code, more.json()["code"]) == (422, "refund_exceeds_transfer")
        # A refund is a transfer in the history and the ledger, with receipts to both sides.
        item = client.get(f"/transaction/{body['refund_id']}", headers=sender.headers).json()
        assert (item["type"], item["sender"], item["receiver"], item["refund_of"]) == (
            "transfer",
            "Shop Keeper",
            "Jane Doe",
            txn,
        )
        ledger = client.get(f"/transaction/{body['refund_id']}/ledger", headers=shop.headers).json()
        assert [e["entry_type"] for e in ledger] == ["debit", "credit"]
        with sync_engine(client).connect() as conn:
            receipts = conn.execute(
                text("SELECT count(*) FROM outbox WHERE payload LIKE :p"),
                {"p": f'%"transaction_id": {body["refund_id"]},%'},
            ).scalar_one()
        assert receipts == 2
        assert audit(sync_engine(client)).violations == []

    def test_only_the_recipient_may_refund(self, client: TestClient, signer: Signer, auth_fake: AuthFake) -> None:
        sender, shop, _, txn = _pair(client, signer, auth_fake, 100)
        stranger = new_user(signer, auth_fake)
        open_wallet(client, stranger, balance=100)
        by_sender = post(client, sender, f"/transaction/{txn}/refund")
        assert (by_sender.status_code, by_sender.json()["code"]) == (403, "refund_not_allowed")
        by_stranger = post(client, stranger, f"/transaction/{txn}/refund")
        assert (by_stranger.status_code, by_stranger.json()["code"]) == (404, "transaction_not_found")
        assert client.get(f"/transaction/{txn}", headers=stranger.headers).status_code == 404
        assert (_balance(client, sender), _balance(client, shop)) == (900, 100)

    def test_deposits_withdrawals_and_refunds_are_not_refundable(
        self, client: TestClient, signer: Signer, auth_fake: AuthFake
    ) -> None:
        sender, shop, _, txn = _pair(client, signer, auth_fake, 100)
        deposit = client.get("/transaction/history", headers=sender.headers).json()["transactions"][-1]["id"]
        move(client, shop, "withdraw", amount=10)
        withdrawal = client.get("/transaction/history?limit=1", headers=shop.headers).json()["transactions"][0]["id"]
        refund_id = post(client, shop, f"/transaction/{txn}/refund", amount=5).json()["refund_id"]
        for user, refused in ((sender, deposit), (shop, withdrawal), (sender, refund_id)):
            response = post(client, user, f"/transaction/{refused}/refund")
            assert (response.status_code, response.json()["code"]) == (422, "not_refundable")

    def test_held_money_cannot_be_refunded_and_the_key_replays(
        self, client: TestClient, signer: Signer, auth_fake: AuthFake
    ) -> None:
        _, shop, _, txn = _pair(client, signer, auth_fake, 100)
        place_hold(client, shop, amount=60)
        refused = post(client, shop, f"/transaction/{txn}/refund", amount=50)
        assert (refused.status_code, refused.json()["code"]) == (422, "insufficient_funds")
        idem = uuid.uuid4().hex
        first = post(client, shop, f"/transaction/{txn}/refund", idem=idem, amount=40)
        again = post(client, shop, f"/transaction/{txn}/refund", idem=idem, amount=40)
        assert (again.content, again.headers["Idempotent-Replayed"]) == (first.content, "true")
        assert client.get(f"/transaction/{txn}", headers=shop.headers).json()["refunded_total"] == 40

    def test_racing_refunds_never_total_more_than_the_transfer(
        self, client: TestClient, signer: Signer, auth_fake: AuthFake
    ) -> None:
        sender, shop, _, txn = _pair(client, signer, auth_fake, 100)
        move(client, sender, "transfer", amount=500, to_account_id=open_wallet_id(client, shop))
        jobs = [
            lambda: call_use_case(
                client, refunds.refund, user_id=shop.id, key=uuid.uuid4().hex, transaction_id=txn, amount=30
            )
            for _ in range(12)
        ]
        codes = Counter(status for status, _ in run_all(jobs))
        assert codes == {200: 3, 422: 9}
        assert client.get(f"/transaction/{txn}", headers=shop.headers).json()["refunded_total"] == 90
        assert (_balance(client, sender), _balance(client, shop)) == (490, 510)
        assert audit(sync_engine(client)).violations == []


def open_wallet_id(client: TestClient, user: User) -> int:
    return int(client.get("/wallet", headers=user.headers).json()["id"])


class TestTransactionDetail:
    def test_a_history_item_plus_its_refunds(self, client: TestClient, signer: Signer, auth_fake: AuthFake) -> None:
        sender, shop, _, txn = _pair(client, signer, auth_fake, 100)
        item = client.get(f"/transaction/{txn}", headers=sender.headers).json()
        history = client.get("/transaction/history?limit=1", headers=sender.headers).json()["transactions"][0]
        assert item == {**history, "refunded_total": 0, "refund_of": None}
        post(client, shop, f"/transaction/{txn}/refund", amount=25)
        assert client.get(f"/transaction/{txn}", headers=shop.headers).json()["refunded_total"] == 25
        assert client.get("/transaction/99999999", headers=shop.headers).json()["code"] == "transaction_not_found"

    def test_the_fixed_paths_keep_their_answers(self, client: TestClient, signer: Signer, auth_fake: AuthFake) -> None:
        user = new_user(signer, auth_fake)
        assert [client.get(f"/transaction/{p}", headers=user.headers).status_code for p in ("deposit", "abc", "0")] == [
            405,
            422,
            422,
        ]
        assert client.get("/transaction/history", headers=user.headers).status_code == 200
        paths = client.get("/openapi.json").json()["paths"]
        assert {"/transaction/{transaction_id}", "/transaction/{transaction_id}/refund"} <= set(paths)


class TestBalance:
    def test_now_and_at_a_past_time(self, client: TestClient, signer: Signer, auth_fake: AuthFake) -> None:
        user = new_user(signer, auth_fake)
        wallet = open_wallet(client, user, balance=500)
        time.sleep(0.01)
        between = utcnow()
        time.sleep(0.01)
        move(client, user, "withdraw", amount=200)
        place_hold(client, user, amount=100)
        now = client.get("/wallet/balance", headers=user.headers).json()
        assert set(now) == {"wallet_id", "currency", "balance", "held", "available", "at"}
        assert {k: now[k] for k in ("wallet_id", "currency", "balance", "held", "available")} == {
            "wallet_id": wallet["id"],
            "currency": "USD",
            "balance": 300,
            "held": 100,
            "available": 200,
        }
        past = client.get("/wallet/balance", params={"at": between.isoformat()}, headers=user.headers).json()
        assert (past["balance"], past["held"], past["available"]) == (500, None, None)
        assert datetime.fromisoformat(past["at"]) == between

    def test_before_the_wallet_opened_or_in_the_future_is_422(
        self, client: TestClient, signer: Signer, auth_fake: AuthFake
    ) -> None:
        user = new_user(signer, auth_fake)
        wallet = open_wallet(client, user, balance=5)
        opened = datetime.fromisoformat(wallet["created_at"])
        for at in (opened - timedelta(seconds=1), utcnow() + timedelta(hours=1)):
            response = client.get("/wallet/balance", params={"at": at.isoformat()}, headers=user.headers)
            assert (response.status_code, response.json()["code"]) == (422, "invalid_at")
        for edge in ("9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00+14:00"):
            response = client.get("/wallet/balance", params={"at": edge}, headers=user.headers)
            assert (response.status_code, response.json()["code"]) == (422, "invalid_at")
        naive = client.get("/wallet/balance", params={"at": "2026-01-01T00:00:00"}, headers=user.headers)
        assert naive.status_code == 422  # an offset is required

    def test_no_open_wallet_is_404(self, client: TestClient, signer: Signer, auth_fake: AuthFake) -> None:
        user = new_user(signer, auth_fake)
        assert client.get("/wallet/balance", headers=user.headers).json()["code"] == "wallet_not_found"


class TestAuditOfHeldMoney:
    def test_a_corrupted_held_amount_is_reported(self, client: TestClient, signer: Signer, auth_fake: AuthFake) -> None:
        user = new_user(signer, auth_fake)
        wallet = open_wallet(client, user, balance=100)
        place_hold(client, user, amount=40)
        engine = sync_engine(client)
        assert audit(engine).violations == []
        with engine.begin() as conn:
            conn.execute(text("UPDATE wallets SET held = 10 WHERE id = :w"), {"w": wallet["id"]})
        try:
            found: list[Any] = [v for v in audit(engine).found if v.id == wallet["id"]]
            assert [(v.check, v.message) for v in found] == [
                ("held_is_active_holds", f"wallet {wallet['id']}: held 10 != active holds 40")
            ]
        finally:
            with engine.begin() as conn:
                conn.execute(text("UPDATE wallets SET held = 40 WHERE id = :w"), {"w": wallet["id"]})
        assert audit(engine).violations == []

    def test_the_database_refuses_held_above_the_balance(
        self, client: TestClient, signer: Signer, auth_fake: AuthFake
    ) -> None:
        import pytest
        from sqlalchemy.exc import IntegrityError

        user = new_user(signer, auth_fake)
        wallet = open_wallet(client, user, balance=100)
        with pytest.raises(IntegrityError), sync_engine(client).begin() as conn:
            conn.execute(text("UPDATE wallets SET held = 101 WHERE id = :w"), {"w": wallet["id"]})
        assert client.get("/wallet/balance", headers=user.headers).json()["held"] == 0
