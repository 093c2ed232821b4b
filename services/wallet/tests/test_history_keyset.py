"""GET /transaction/history extensions: keyset pages (`after`), `type`, `from`, `to`."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient

from .factories import AuthFake, Signer, User, move, new_user, open_wallet


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def page(client: TestClient, user: User, **params: Any) -> dict[str, Any]:
    response = client.get("/transaction/history", headers=user.headers, params=params)
    assert response.status_code == 200, response.text
    return dict(response.json())


def everything(client: TestClient, user: User) -> list[dict[str, Any]]:
    return list(page(client, user, limit=100)["transactions"])


@pytest.fixture
def jane(client: TestClient, signer: Signer, auth_fake: AuthFake) -> User:
    user = new_user(signer, auth_fake, first="Jane", last="Doe")
    open_wallet(client, user, balance=1_000)
    return user


@pytest.fixture
def john(client: TestClient, signer: Signer, auth_fake: AuthFake) -> User:
    user = new_user(signer, auth_fake, first="John", last="Smith")
    open_wallet(client, user, balance=1_000)
    return user


def wallet_id(client: TestClient, user: User) -> int:
    return int(client.get("/wallet", headers=user.headers).json()["id"])


class TestKeysetPages:
    def test_pages_partition_the_history_while_new_movements_arrive(self, client: TestClient, jane: User) -> None:
        for amount in range(1, 12):
            assert move(client, jane, "deposit", amount=amount).status_code == 200
        before = everything(client, jane)
        seen: list[dict[str, Any]] = []
        first = page(client, jane, limit=3)
        assert (first["limit"], first["offset"]) == (3, 0)
        seen += first["transactions"]
        while True:
            # A new movement lands between every two pages: it is newer than the cursor,
            # so it shifts an offset page but never a keyset one.
            assert move(client, jane, "deposit", amount=999).status_code == 200
            body = page(client, jane, limit=3, after=seen[-1]["id"])
            assert body["offset"] == 0
            if not body["transactions"]:
                break
            seen += body["transactions"]
        assert seen == before  # no duplicate, no gap, same items, same order
        assert len({item["id"] for item in seen}) == len(seen) == 12

    def test_items_keep_their_shape(self, client: TestClient, jane: User) -> None:
        [item] = page(client, jane, limit=1, after=everything(client, jane)[0]["id"] + 1)["transactions"]
        assert set(item) == {"id", "amount", "currency", "type", "date", "sender", "receiver"}

    def test_after_the_oldest_is_an_empty_page(self, client: TestClient, jane: User) -> None:
        oldest = everything(client, jane)[-1]["id"]
        assert page(client, jane, after=oldest)["transactions"] == []

    def test_after_an_id_of_another_user_only_bounds_your_own_items(
        self, client: TestClient, jane: User, john: User
    ) -> None:
        assert move(client, john, "deposit", amount=3).status_code == 200
        johns = everything(client, john)[0]["id"]
        mine = page(client, jane, after=johns)["transactions"]
        assert mine == [item for item in everything(client, jane) if item["id"] < johns]
        assert all(item["receiver"] == "Jane Doe" or item["sender"] == "Jane Doe" for item in mine)

    @pytest.mark.parametrize("params", [{"after": 5, "offset": 0}, {"after": 5, "offset": 3}])
    def test_offset_with_after_is_422(self, client: TestClient, jane: User, params: dict[str, int]) -> None:
        response = client.get("/transaction/history", headers=jane.headers, params=params)
        assert (response.status_code, response.json()["code"]) == (422, "offset_with_after")
        assert response.headers["content-type"] == "application/problem+json"

    @pytest.mark.parametrize(
        ("params", "field"),
        [
            ({"after": 0}, "after"),
            ({"after": "x"}, "after"),
            ({"after": 2**63}, "after"),
            ({"type": "refund"}, "type"),
            ({"from": "nope"}, "from"),
            ({"to": "2026-05-31T12:00:00"}, "to"),
        ],
    )
    def test_bad_parameters_are_422(self, client: TestClient, jane: User, params: dict[str, Any], field: str) -> None:
        response = client.get("/transaction/history", headers=jane.headers, params=params)
        assert response.status_code == 422
        assert [e["field"] for e in response.json()["errors"]] == [field]


class TestFilters:
    def test_type_filters_and_pages_by_keyset(self, client: TestClient, jane: User, john: User) -> None:
        to_john = wallet_id(client, john)
        for _ in range(3):
            assert move(client, jane, "withdraw", amount=1).status_code == 200
            assert move(client, jane, "transfer", amount=2, to_account_id=to_john).status_code == 200
        withdrawals = page(client, jane, type="withdrawal")["transactions"]
        assert [item["type"] for item in withdrawals] == ["withdrawal"] * 3
        assert [item["type"] for item in page(client, jane, type="deposit")["transactions"]] == ["deposit"]
        second = page(
            client,
            jane,
            type="transfer",
            limit=2,
            after=page(client, jane, type="transfer", limit=1)["transactions"][0]["id"],
        )
        assert [item["type"] for item in second["transactions"]] == ["transfer", "transfer"]
        assert page(client, jane, type="withdrawal", offset=1)["transactions"] == withdrawals[1:]

    def test_from_and_to_filter_by_time(self, client: TestClient, jane: User) -> None:
        time.sleep(0.02)
        start = datetime.now(UTC)
        for amount in (1, 2, 3):
            assert move(client, jane, "deposit", amount=amount).status_code == 200
        time.sleep(0.02)
        end = datetime.now(UTC)
        assert move(client, jane, "deposit", amount=4).status_code == 200
        window = page(client, jane, **{"from": iso(start), "to": iso(end)})["transactions"]
        assert [item["amount"] for item in window] == [3, 2, 1]
        assert [item["amount"] for item in page(client, jane, **{"from": iso(start)})["transactions"]] == [4, 3, 2, 1]
        assert [item["amount"] for item in page(client, jane, to=iso(start))["transactions"]] == [1_000]
        # Keyset pages inside a time window, and the window's `to` with an `after`.
        first = page(client, jane, limit=1, **{"from": iso(start), "to": iso(end)})["transactions"]
        rest = page(client, jane, after=first[0]["id"], **{"from": iso(start), "to": iso(end)})["transactions"]
        assert [item["amount"] for item in first + rest] == [3, 2, 1]
        newest = everything(client, jane)[0]["id"]
        assert [item["amount"] for item in page(client, jane, after=newest, to=iso(end))["transactions"]] == [
            3,
            2,
            1,
            1_000,
        ]

    def test_from_after_to_is_422(self, client: TestClient, jane: User) -> None:
        params = {"from": "2026-06-02T00:00:00Z", "to": "2026-06-01T00:00:00Z"}
        response = client.get("/transaction/history", headers=jane.headers, params=params)
        assert (response.status_code, response.json()["code"]) == (422, "invalid_range")

    def test_filters_never_show_another_users_items(self, client: TestClient, jane: User, john: User) -> None:
        assert move(client, john, "withdraw", amount=77).status_code == 200
        items = page(client, jane, type="withdrawal", limit=100, **{"from": "2000-01-01T00:00:00Z"})["transactions"]
        assert 77 not in [item["amount"] for item in items]


class TestAcrossWallets:
    def test_keyset_pages_run_on_from_the_open_wallet_into_closed_ones(
        self, client: TestClient, signer: Signer, auth_fake: AuthFake
    ) -> None:
        user = new_user(signer, auth_fake)
        open_wallet(client, user, balance=10)
        assert move(client, user, "withdraw", amount=10).status_code == 200
        assert client.delete("/wallet", headers=user.headers).status_code == 200
        open_wallet(client, user, balance=5)
        assert move(client, user, "deposit", amount=6).status_code == 200
        by_offset = [page(client, user, limit=1, offset=i)["transactions"][0] for i in range(4)]
        assert [item["amount"] for item in by_offset] == [6, 5, 10, 10]
        assert page(client, user, limit=10)["transactions"] == by_offset
        seen = page(client, user, limit=1)["transactions"]
        while batch := page(client, user, limit=1, after=seen[-1]["id"])["transactions"]:
            seen += batch
        assert seen == by_offset
        assert [
            i["amount"]
            for i in page(client, user, type="withdrawal", **{"from": "2000-01-01T00:00:00Z"})["transactions"]
        ] == [10]
