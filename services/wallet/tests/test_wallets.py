from __future__ import annotations

from datetime import datetime

import pytest
from fastapi.testclient import TestClient

from .factories import AuthFake, Signer, move, new_user, open_wallet


def parse_time(value: str) -> datetime:
    assert value.endswith("Z") or value.endswith("+00:00"), value
    return datetime.fromisoformat(value)


class TestCreateWallet:
    def test_created_with_exactly_the_contract_shape(
        self, client: TestClient, signer: Signer, auth_fake: AuthFake
    ) -> None:
        user = new_user(signer, auth_fake)
        body = open_wallet(client, user, balance=500)
        assert set(body) == {"id", "user_id", "balance", "created_at", "currency"}
        assert body["user_id"] == user.id
        assert body["balance"] == 500
        assert body["currency"] == "USD"
        parse_time(body["created_at"])

    def test_opening_balance_is_a_deposit_in_history_and_ledger(
        self, client: TestClient, signer: Signer, auth_fake: AuthFake
    ) -> None:
        user = new_user(signer, auth_fake)
        wallet = open_wallet(client, user, balance=500)
        [item] = client.get("/transaction/history", headers=user.headers).json()["transactions"]
        assert (item["type"], item["amount"], item["sender"], item["receiver"]) == (
            "deposit",
            500,
            "External Source",
            "Jane Doe",
        )
        entries = client.get(f"/transaction/{item['id']}/ledger", headers=user.headers).json()
        mine = [e for e in entries if e["wallet_id"] == wallet["id"]]
        assert [(e["entry_type"], e["amount"], e["balance_snapshot"]) for e in mine] == [("credit", 500, 500)]
        assert sorted(e["entry_type"] for e in entries) == ["credit", "debit"]

    def test_zero_opening_balance_books_nothing(self, client: TestClient, signer: Signer, auth_fake: AuthFake) -> None:
        user = new_user(signer, auth_fake)
        open_wallet(client, user)
        assert client.get("/transaction/history", headers=user.headers).json()["transactions"] == []

    def test_a_second_open_wallet_is_409(self, client: TestClient, signer: Signer, auth_fake: AuthFake) -> None:
        user = new_user(signer, auth_fake)
        open_wallet(client, user)
        response = client.post("/wallet", json={"currency": "EUR"}, headers=user.headers)
        assert response.status_code == 409
        assert response.json()["code"] == "wallet_exists"

    @pytest.mark.parametrize(
        ("body", "field"),
        [
            ({"currency": "usd"}, "currency"),
            ({"currency": "US"}, "currency"),
            ({}, "currency"),
            ({"currency": "USD", "balance": -1}, "balance"),
            ({"currency": "USD", "balance": 1.5}, "balance"),
            ({"currency": "USD", "balance": "500"}, "balance"),
            ({"currency": "USD", "balance": 10**12 + 1}, "balance"),
        ],
    )
    def test_bad_bodies_are_422_and_create_nothing(
        self, client: TestClient, signer: Signer, auth_fake: AuthFake, body: dict[str, object], field: str
    ) -> None:
        user = new_user(signer, auth_fake)
        response = client.post("/wallet", json=body, headers=user.headers)
        assert response.status_code == 422
        assert [e["field"] for e in response.json()["errors"]] == [field]
        assert client.get("/wallet", headers=user.headers).status_code == 404

    def test_a_currency_outside_the_configured_list_is_422(
        self, client: TestClient, signer: Signer, auth_fake: AuthFake
    ) -> None:
        user = new_user(signer, auth_fake)
        response = client.post("/wallet", json={"currency": "XXX"}, headers=user.headers)
        assert response.status_code == 422
        assert response.json()["code"] == "unsupported_currency"

    def test_auth_down_is_503_and_creates_nothing(
        self, client: TestClient, signer: Signer, auth_fake: AuthFake
    ) -> None:
        user = new_user(signer, auth_fake)
        auth_fake.down = True
        response = client.post("/wallet", json={"currency": "USD", "balance": 100}, headers=user.headers)
        assert response.status_code == 503
        assert response.json()["code"] == "auth_unavailable"
        auth_fake.down = False
        assert client.get("/wallet", headers=user.headers).status_code == 404

    def test_the_request_id_travels_to_the_auth_service(
        self, client: TestClient, signer: Signer, auth_fake: AuthFake
    ) -> None:
        user = new_user(signer, auth_fake)
        headers = {**user.headers, "X-Request-ID": "trace-wallet-1"}
        assert client.post("/wallet", json={"currency": "USD"}, headers=headers).status_code == 201
        assert auth_fake.request_ids == ["trace-wallet-1"]

    def test_no_token_is_401(self, client: TestClient) -> None:
        response = client.post("/wallet", json={"currency": "USD"})
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"


class TestReadWallet:
    def test_shape_with_full_name_and_no_auth_call(
        self, client: TestClient, signer: Signer, auth_fake: AuthFake
    ) -> None:
        user = new_user(signer, auth_fake, first="Jane", last="Doe")
        created = open_wallet(client, user, balance=500)
        calls = auth_fake.calls
        auth_fake.down = True  # reads never wait on the auth service
        body = client.get("/wallet", headers=user.headers).json()
        assert set(body) == {"id", "user_id", "balance", "created_at", "updated_at", "currency", "full name"}
        assert body["full name"] == "Jane Doe"
        assert body["id"] == created["id"]
        assert body["balance"] == 500
        assert auth_fake.calls == calls

    def test_no_wallet_is_404(self, client: TestClient, signer: Signer, auth_fake: AuthFake) -> None:
        response = client.get("/wallet", headers=new_user(signer, auth_fake).headers)
        assert response.status_code == 404
        assert response.json()["code"] == "wallet_not_found"


class TestCloseWallet:
    def test_non_zero_balance_is_409(self, client: TestClient, signer: Signer, auth_fake: AuthFake) -> None:
        user = new_user(signer, auth_fake)
        open_wallet(client, user, balance=1)
        response = client.delete("/wallet", headers=user.headers)
        assert response.status_code == 409
        assert response.json()["code"] == "wallet_not_empty"
        assert client.get("/wallet", headers=user.headers).status_code == 200

    def test_empty_wallet_closes_and_history_stays(
        self, client: TestClient, signer: Signer, auth_fake: AuthFake
    ) -> None:
        user = new_user(signer, auth_fake, first="Jane", last="Doe")
        open_wallet(client, user, balance=100)
        assert move(client, user, "withdraw", amount=100).status_code == 200
        response = client.delete("/wallet", headers=user.headers)
        assert response.status_code == 200
        assert response.json() == {"message": "wallet belonging to Jane Doe deleted successfully"}
        assert client.get("/wallet", headers=user.headers).status_code == 404
        assert move(client, user, "deposit", amount=5).json()["code"] == "wallet_not_found"
        # A new wallet can be opened; history covers the closed one too.
        open_wallet(client, user, currency="EUR")
        kinds = [t["type"] for t in client.get("/transaction/history", headers=user.headers).json()["transactions"]]
        assert kinds == ["withdrawal", "deposit"]
