"""Holds (two-phase payments): reserve, capture (full, partial), void, expiry; held money
cannot be spent, under concurrency too. Real database (SQLite, or Postgres with
TEST_DATABASE_URL), real Redis."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from datetime import timedelta
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import text

from svckit.db import utcnow
from wallet import holds
from wallet.audit import audit
from wallet.config import Settings

from .conftest import app_client
from .factories import (
    AuthFake,
    Signer,
    User,
    call,
    call_use_case,
    key,
    move,
    new_user,
    open_wallet,
    place_hold,
    post,
    run_all,
    sync_engine,
)

HOLD_KEYS = {
    "id",
    "wallet_id",
    "recipient_wallet_id",
    "amount",
    "captured_amount",
    "currency",
    "status",
    "transaction_id",
    "expires_at",
    "created_at",
}


def _balance(client: TestClient, user: User) -> dict[str, Any]:
    response = client.get("/wallet/balance", headers=user.headers)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def _held_column(client: TestClient, wallet_id: int) -> int:
    with sync_engine(client).connect() as conn:
        return int(conn.execute(text("SELECT held FROM wallets WHERE id = :w"), {"w": wallet_id}).scalar_one())


def _expire(client: TestClient, hold_id: int) -> None:
    """Make a hold overdue (as time passing would), without marking it."""
    past = utcnow() - timedelta(seconds=1)
    with sync_engine(client).begin() as conn:
        conn.execute(text("UPDATE holds SET expires_at = :t WHERE id = :h"), {"t": past, "h": hold_id})


class TestPlaceHold:
    def test_a_hold_reserves_without_moving_money(
        self, client: TestClient, signer: Signer, auth_fake: AuthFake
    ) -> None:
        user = new_user(signer, auth_fake)
        wallet = open_wallet(client, user, balance=1000)
        response = post(client, user, "/holds", amount=300, currency="USD")
        assert response.status_code == 201, response.text
        hold = response.json()
        assert set(hold) == HOLD_KEYS
        assert (hold["wallet_id"], hold["amount"], hold["captured_amount"], hold["status"]) == (
            wallet["id"],
            300,
            0,
            "active",
        )
        assert hold["recipient_wallet_id"] is None
        assert hold["transaction_id"] is None
        assert client.get("/wallet", headers=user.headers).json()["balance"] == 1000
        assert {k: _balance(client, user)[k] for k in ("balance", "held", "available")} == {
            "balance": 1000,
            "held": 300,
            "available": 700,
        }
        history = client.get("/transaction/history", headers=user.headers).json()["transactions"]
        assert [t["type"] for t in history] == ["deposit"]  # a hold posts nothing
        assert _held_column(client, wallet["id"]) == 300
        assert audit(sync_engine(client)).violations == []

    def test_default_expiry_is_a_day(self, client: TestClient, signer: Signer, auth_fake: AuthFake) -> None:
        user = new_user(signer, auth_fake)
        open_wallet(client, user, balance=10)
        hold = place_hold(client, user, amount=10)
        get = client.get(f"/holds/{hold['id']}", headers=user.headers).json()
        from datetime import datetime

        lasts = datetime.fromisoformat(get["expires_at"]) - datetime.fromisoformat(get["created_at"])
        assert lasts == timedelta(days=1)

    def test_more_than_available_is_422_and_nothing_is_held(
        self, client: TestClient, signer: Signer, auth_fake: AuthFake
    ) -> None:
        user = new_user(signer, auth_fake)
        wallet = open_wallet(client, user, balance=500)
        place_hold(client, user, amount=400)
        response = post(client, user, "/holds", amount=101, currency="USD")
        assert (response.status_code, response.json()["code"]) == (422, "insufficient_funds")
        assert _held_column(client, wallet["id"]) == 400

    def test_recipient_rules_are_those_of_transfers(
        self, client: TestClient, signer: Signer, auth_fake: AuthFake
    ) -> None:
        user, eur = new_user(signer, auth_fake), new_user(signer, auth_fake)
        own = open_wallet(client, user, balance=500)
        eur_wallet = open_wallet(client, eur, currency="EUR")
        cases = [
            (own["id"], 422, "self_transfer"),
            (eur_wallet["id"], 422, "currency_mismatch"),
            (999_999, 404, "recipient_not_found"),
        ]
        for to, status, code in cases:
            response = post(client, user, "/holds", amount=10, currency="USD", to_account_id=to)
            assert (response.status_code, response.json()["code"]) == (status, code)
        assert _held_column(client, own["id"]) == 0

    def test_bad_bodies_are_422_and_a_key_is_required(
        self, client: TestClient, signer: Signer, auth_fake: AuthFake
    ) -> None:
        user = new_user(signer, auth_fake)
        open_wallet(client, user, balance=500)
        for body in ({"amount": 0, "currency": "USD"}, {"amount": 5, "currency": "USD", "expires_in_s": 59}):
            assert post(client, user, "/holds", **body).status_code == 422
        assert client.post("/holds", json={"amount": 5, "currency": "USD"}, headers=user.headers).status_code == 400
        assert _balance(client, user)["held"] == 0

    def test_same_key_replays_and_reserves_once(self, client: TestClient, signer: Signer, auth_fake: AuthFake) -> None:
        user = new_user(signer, auth_fake)
        wallet = open_wallet(client, user, balance=500)
        idem = key()
        first = post(client, user, "/holds", idem=idem, amount=100, currency="USD")
        again = post(client, user, "/holds", idem=idem, amount=100, currency="USD")
        assert (first.status_code, again.status_code, again.headers["Idempotent-Replayed"]) == (201, 201, "true")
        assert again.content == first.content
        assert _held_column(client, wallet["id"]) == 100
        reused = post(client, user, "/holds", idem=idem, amount=101, currency="USD")
        assert (reused.status_code, reused.json()["code"]) == (422, "idempotency_key_reused")


class TestHeldMoneyCannotBeSpent:
    def test_withdrawal_and_transfer_check_the_available_balance(
        self, client: TestClient, signer: Signer, auth_fake: AuthFake
    ) -> None:
        user, other = new_user(signer, auth_fake), new_user(signer, auth_fake)
        open_wallet(client, user, balance=1000)
        to = open_wallet(client, other)["id"]
        place_hold(client, user, amount=700)
        refused = move(client, user, "withdraw", amount=301)
        assert (refused.status_code, refused.json()["code"]) == (422, "insufficient_funds")
        refused = move(client, user, "transfer", amount=301, to_account_id=to)
        assert (refused.status_code, refused.json()["code"]) == (422, "insufficient_funds")
        assert move(client, user, "withdraw", amount=300).json()["current_balance"] == 700
        assert _balance(client, user)["available"] == 0

    def test_a_wallet_with_an_active_hold_cannot_be_emptied_and_closed(
        self, client: TestClient, signer: Signer, auth_fake: AuthFake
    ) -> None:
        user = new_user(signer, auth_fake)
        open_wallet(client, user, balance=100)
        place_hold(client, user, amount=100)
        assert move(client, user, "withdraw", amount=100).status_code == 422
        assert client.delete("/wallet", headers=user.headers).json()["code"] == "wallet_not_empty"


class TestCapture:
    def test_full_capture_is_an_ordinary_transfer(
        self, client: TestClient, signer: Signer, auth_fake: AuthFake
    ) -> None:
        payer, shop = new_user(signer, auth_fake), new_user(signer, auth_fake, first="Shop")
        payer_wallet = open_wallet(client, payer, balance=1000)
        shop_wallet = open_wallet(client, shop)
        hold = place_hold(client, payer, amount=250, to_account_id=shop_wallet["id"])
        response = post(client, payer, f"/holds/{hold['id']}/capture")
        assert response.status_code == 200, response.text
        captured = response.json()
        assert set(captured) == HOLD_KEYS
        assert (captured["status"], captured["captured_amount"], captured["recipient_wallet_id"]) == (
            "captured",
            250,
            shop_wallet["id"],
        )
        txn = captured["transaction_id"]
        history = client.get("/transaction/history", headers=payer.headers).json()["transactions"]
        assert (history[0]["id"], history[0]["type"], history[0]["amount"]) == (txn, "transfer", 250)
        ledger = client.get(f"/transaction/{txn}/ledger", headers=payer.headers).json()
        assert [(e["wallet_id"], e["entry_type"], e["amount"]) for e in ledger] == [
            (payer_wallet["id"], "debit", 250),
            (shop_wallet["id"], "credit", 250),
        ]
        assert client.get("/wallet", headers=shop.headers).json()["balance"] == 250
        assert {k: _balance(client, payer)[k] for k in ("balance", "held")} == {"balance": 750, "held": 0}
        with sync_engine(client).connect() as conn:
            kinds = conn.execute(
                text("SELECT count(*) FROM outbox WHERE payload LIKE :p"), {"p": f'%"transaction_id": {txn},%'}
            ).scalar_one()
        assert kinds == 2  # a receipt to each side, like any transfer
        assert audit(sync_engine(client)).violations == []

    def test_partial_capture_to_a_recipient_named_at_capture_releases_the_rest(
        self, client: TestClient, signer: Signer, auth_fake: AuthFake
    ) -> None:
        payer, shop = new_user(signer, auth_fake), new_user(signer, auth_fake)
        payer_wallet = open_wallet(client, payer, balance=1000)
        to = open_wallet(client, shop)["id"]
        hold = place_hold(client, payer, amount=400)
        required = post(client, payer, f"/holds/{hold['id']}/capture")
        assert (required.status_code, required.json()["code"]) == (422, "recipient_required")
        too_much = post(client, payer, f"/holds/{hold['id']}/capture", amount=401, to_account_id=to)
        assert (too_much.status_code, too_much.json()["code"]) == (422, "capture_exceeds_hold")
        response = post(client, payer, f"/holds/{hold['id']}/capture", amount=150, to_account_id=to)
        assert response.status_code == 200, response.text
        assert (response.json()["captured_amount"], response.json()["amount"]) == (150, 400)
        assert {k: _balance(client, payer)[k] for k in ("balance", "held", "available")} == {
            "balance": 850,
            "held": 0,
            "available": 850,
        }
        assert _held_column(client, payer_wallet["id"]) == 0

    def test_a_hold_for_one_recipient_is_never_captured_to_another(
        self, client: TestClient, signer: Signer, auth_fake: AuthFake
    ) -> None:
        payer, a, b = (new_user(signer, auth_fake) for _ in range(3))
        open_wallet(client, payer, balance=100)
        wa, wb = open_wallet(client, a)["id"], open_wallet(client, b)["id"]
        hold = place_hold(client, payer, amount=100, to_account_id=wa)
        response = post(client, payer, f"/holds/{hold['id']}/capture", to_account_id=wb)
        assert (response.status_code, response.json()["code"]) == (422, "recipient_mismatch")
        assert client.get("/wallet", headers=b.headers).json()["balance"] == 0

    def test_second_capture_and_void_after_capture_are_409(
        self, client: TestClient, signer: Signer, auth_fake: AuthFake
    ) -> None:
        payer, shop = new_user(signer, auth_fake), new_user(signer, auth_fake)
        open_wallet(client, payer, balance=100)
        to = open_wallet(client, shop)["id"]
        hold = place_hold(client, payer, amount=60, to_account_id=to)
        idem = key()
        first = post(client, payer, f"/holds/{hold['id']}/capture", idem=idem)
        replay = post(client, payer, f"/holds/{hold['id']}/capture", idem=idem)
        assert (replay.content, replay.headers["Idempotent-Replayed"]) == (first.content, "true")
        for path in ("capture", "void"):
            again = post(client, payer, f"/holds/{hold['id']}/{path}")
            assert (again.status_code, again.json()["code"]) == (409, "hold_not_active")
        assert client.get("/wallet", headers=shop.headers).json()["balance"] == 60


class TestVoid:
    def test_void_releases_everything_once(self, client: TestClient, signer: Signer, auth_fake: AuthFake) -> None:
        user = new_user(signer, auth_fake)
        wallet = open_wallet(client, user, balance=100)
        hold = place_hold(client, user, amount=80)
        response = post(client, user, f"/holds/{hold['id']}/void")
        assert (response.status_code, response.json()["status"]) == (200, "voided")
        assert set(response.json()) == HOLD_KEYS
        assert _held_column(client, wallet["id"]) == 0
        again = post(client, user, f"/holds/{hold['id']}/void")
        assert (again.status_code, again.json()["code"]) == (409, "hold_not_active")
        assert move(client, user, "withdraw", amount=100).status_code == 200


class TestExpiry:
    def test_an_overdue_hold_reserves_nothing_at_once_and_cannot_be_captured(
        self, client: TestClient, signer: Signer, auth_fake: AuthFake
    ) -> None:
        payer, shop = new_user(signer, auth_fake), new_user(signer, auth_fake)
        wallet = open_wallet(client, payer, balance=100)
        to = open_wallet(client, shop)["id"]
        hold = place_hold(client, payer, amount=100, to_account_id=to)
        _expire(client, hold["id"])
        assert client.get(f"/holds/{hold['id']}", headers=payer.headers).json()["status"] == "expired"
        assert _balance(client, payer)["available"] == 100
        capture = post(client, payer, f"/holds/{hold['id']}/capture")
        assert (capture.status_code, capture.json()["code"]) == (409, "hold_not_active")
        assert _held_column(client, wallet["id"]) == 0  # the capture's lock released it, and kept that
        assert client.get("/wallet", headers=shop.headers).json()["balance"] == 0
        assert audit(sync_engine(client)).violations == []

    def test_a_withdrawal_releases_overdue_holds_under_its_lock(
        self, client: TestClient, signer: Signer, auth_fake: AuthFake
    ) -> None:
        user = new_user(signer, auth_fake)
        wallet = open_wallet(client, user, balance=100)
        overdue, live = place_hold(client, user, amount=70), place_hold(client, user, amount=20)
        _expire(client, overdue["id"])
        assert move(client, user, "withdraw", amount=80).json()["current_balance"] == 20
        assert _held_column(client, wallet["id"]) == 20
        statuses = {h["id"]: h["status"] for h in client.get("/holds", headers=user.headers).json()["holds"]}
        assert statuses == {overdue["id"]: "expired", live["id"]: "active"}
        assert audit(sync_engine(client)).violations == []

    def test_the_sweeper_marks_overdue_holds_expired(
        self, client: TestClient, signer: Signer, auth_fake: AuthFake
    ) -> None:
        user = new_user(signer, auth_fake)
        wallet = open_wallet(client, user, balance=100)
        hold = place_hold(client, user, amount=40)
        _expire(client, hold["id"])
        uow = client.app.state.uow  # type: ignore[attr-defined]
        swept = client.portal.call(holds.expire_overdue_holds, uow)  # type: ignore[union-attr]
        assert swept >= 1
        with sync_engine(client).connect() as conn:
            status = conn.execute(text("SELECT status FROM holds WHERE id = :h"), {"h": hold["id"]}).scalar_one()
        assert (status, _held_column(client, wallet["id"])) == ("expired", 0)
        assert audit(sync_engine(client)).violations == []

    def test_the_wallet_process_sweeps_by_itself(self, settings: Settings, signer: Signer, auth_fake: AuthFake) -> None:
        quick = settings.model_copy(update={"hold_sweep_interval_s": 0.2})
        with app_client(quick, signer, auth_fake) as client:
            user = new_user(signer, auth_fake)
            wallet = open_wallet(client, user, balance=100)
            hold = place_hold(client, user, amount=30)
            _expire(client, hold["id"])
            deadline = time.monotonic() + 10
            status = "active"
            while status == "active" and time.monotonic() < deadline:
                time.sleep(0.1)
                with sync_engine(client).connect() as conn:
                    status = conn.execute(
                        text("SELECT status FROM holds WHERE id = :h"), {"h": hold["id"]}
                    ).scalar_one()
            assert (status, _held_column(client, wallet["id"])) == ("expired", 0)


class TestReads:
    def test_list_newest_first_with_status_filter(
        self, client: TestClient, signer: Signer, auth_fake: AuthFake
    ) -> None:
        user = new_user(signer, auth_fake)
        open_wallet(client, user, balance=100)
        first, second, third = (place_hold(client, user, amount=10) for _ in range(3))
        post(client, user, f"/holds/{second['id']}/void")
        _expire(client, third["id"])
        listed = client.get("/holds", headers=user.headers).json()
        assert list(listed) == ["holds"]
        assert [h["id"] for h in listed["holds"]] == [third["id"], second["id"], first["id"]]
        by_status = {
            s: [h["id"] for h in client.get(f"/holds?status={s}", headers=user.headers).json()["holds"]]
            for s in ("active", "voided", "expired", "captured")
        }
        assert by_status == {
            "active": [first["id"]],
            "voided": [second["id"]],
            "expired": [third["id"]],
            "captured": [],
        }
        assert client.get("/holds?status=nope", headers=user.headers).status_code == 422

    def test_another_users_hold_is_404_for_every_call(
        self, client: TestClient, signer: Signer, auth_fake: AuthFake
    ) -> None:
        owner, stranger = new_user(signer, auth_fake), new_user(signer, auth_fake)
        open_wallet(client, owner, balance=100)
        open_wallet(client, stranger, balance=100)
        hold = place_hold(client, owner, amount=50)
        assert client.get(f"/holds/{hold['id']}", headers=stranger.headers).json()["code"] == "hold_not_found"
        for path in ("capture", "void"):
            response = post(
                client, stranger, f"/holds/{hold['id']}/{path}", **({"to_account_id": 1} if path == "capture" else {})
            )
            assert (response.status_code, response.json()["code"]) == (404, "hold_not_found")
        assert client.get("/holds", headers=stranger.headers).json() == {"holds": []}
        assert client.get(f"/holds/{hold['id']}", headers=owner.headers).json()["status"] == "active"


class TestConcurrency:
    def test_holds_and_withdrawals_racing_never_overdraw(
        self, client: TestClient, signer: Signer, auth_fake: AuthFake
    ) -> None:
        user = new_user(signer, auth_fake)
        wallet = open_wallet(client, user, balance=1000)
        jobs = []
        for i in range(30):
            if i % 2:
                jobs.append(lambda: call(client, user, "withdraw", uuid.uuid4().hex, amount=100))
            else:
                jobs.append(
                    lambda: call_use_case(
                        client,
                        holds.create_hold,
                        user_id=user.id,
                        key=uuid.uuid4().hex,
                        amount=100,
                        currency="USD",
                        to_wallet_id=None,
                        expires_in_s=3600,
                    )
                )
        results = run_all(jobs)
        codes = Counter(status for status, _ in results)
        assert codes[200] + codes[201] == 10
        assert codes[422] == 20
        balance = _balance(client, user)
        assert balance["balance"] == 1000 - 100 * codes[200]
        assert balance["held"] == 100 * codes[201] == _held_column(client, wallet["id"])
        assert balance["available"] == 0
        assert audit(sync_engine(client)).violations == []

    def test_captures_and_voids_racing_settle_a_hold_exactly_once(
        self, client: TestClient, signer: Signer, auth_fake: AuthFake
    ) -> None:
        payer, shop = new_user(signer, auth_fake), new_user(signer, auth_fake)
        wallet = open_wallet(client, payer, balance=500)
        to = open_wallet(client, shop)["id"]
        hold = place_hold(client, payer, amount=300, to_account_id=to)

        def capture() -> tuple[int, bytes]:
            return call_use_case(
                client,
                holds.capture_hold,
                user_id=payer.id,
                key=key(),
                hold_id=hold["id"],
                amount=None,
                to_wallet_id=None,
            )

        def void() -> tuple[int, bytes]:
            return call_use_case(client, holds.void_hold, user_id=payer.id, key=key(), hold_id=hold["id"])

        results = run_all([capture if i % 2 else void for i in range(20)])
        codes = Counter(status for status, _ in results)
        assert codes == {200: 1, 409: 19}
        final = client.get(f"/holds/{hold['id']}", headers=payer.headers).json()
        shop_balance = client.get("/wallet", headers=shop.headers).json()["balance"]
        assert (final["status"], shop_balance) in {("captured", 300), ("voided", 0)}
        assert _held_column(client, wallet["id"]) == 0
        assert audit(sync_engine(client)).violations == []

    def test_a_capture_racing_the_sweeper_on_an_overdue_hold_moves_nothing(
        self, client: TestClient, signer: Signer, auth_fake: AuthFake
    ) -> None:
        payer, shop = new_user(signer, auth_fake), new_user(signer, auth_fake)
        wallet = open_wallet(client, payer, balance=100)
        to = open_wallet(client, shop)["id"]
        hold = place_hold(client, payer, amount=100, to_account_id=to)
        _expire(client, hold["id"])
        uow = client.app.state.uow  # type: ignore[attr-defined]

        async def race() -> list[Any]:
            capture = holds.capture_hold(
                uow, user_id=payer.id, key=key(), hold_id=hold["id"], amount=None, to_wallet_id=None
            )
            return await asyncio.gather(capture, holds.expire_overdue_holds(uow), return_exceptions=True)

        captured, _ = client.portal.call(race)  # type: ignore[union-attr]
        assert captured.outcome.status_code == 409
        assert b"hold_not_active" in captured.outcome.body.encode()
        assert (_held_column(client, wallet["id"]), client.get("/wallet", headers=shop.headers).json()["balance"]) == (
            0,
            0,
        )
        assert audit(sync_engine(client)).violations == []
