"""Statements and keyset history through the gateway (black box)."""

from __future__ import annotations

import csv
import io

import httpx

from .client import move, new_user, open_wallet


class TestStatementThroughTheGateway:
    def test_statement_json_and_csv_add_up_and_stay_private(self, api: httpx.Client) -> None:
        jane = new_user(api, first_name="Jane", last_name="Doe")
        john = new_user(api, first_name="John", last_name="Smith")
        open_wallet(api, jane, balance=500)
        to_john = open_wallet(api, john, balance=200)["id"]
        assert move(api, jane, "withdraw", amount=50).status_code == 200
        assert move(api, jane, "transfer", amount=100, to_account_id=to_john).status_code == 200

        response = api.get("/wallet/statement", headers=jane.headers)
        assert response.status_code == 200
        assert response.headers["x-request-id"]
        body = response.json()
        assert [(line["type"], line["amount"], line["balance"]) for line in body["lines"]] == [
            ("deposit", 500, 500),
            ("withdrawal", -50, 450),
            ("transfer", -100, 350),
        ]
        assert body["opening_balance"] + sum(line["amount"] for line in body["lines"]) == body["closing_balance"]
        assert body["closing_balance"] == api.get("/wallet", headers=jane.headers).json()["balance"] == 350

        as_csv = api.get("/wallet/statement", headers={**jane.headers, "Accept": "text/csv"})
        assert as_csv.headers["content-type"].startswith("text/csv")
        rows = list(csv.DictReader(io.StringIO(as_csv.text)))
        assert [int(row["balance"]) for row in rows] == [line["balance"] for line in body["lines"]]
        assert rows[-1]["counterparty"] == "John Smith"

        # John sees his own statement only: none of Jane's withdrawals, her transfer as a credit.
        johns = api.get("/wallet/statement", headers=john.headers).json()
        assert [(line["amount"], line["counterparty"]) for line in johns["lines"]] == [
            (200, "External Source"),
            (100, "Jane Doe"),
        ]
        assert johns["wallet_id"] == to_john

    def test_refusals_are_problems(self, api: httpx.Client) -> None:
        user = new_user(api)
        assert api.get("/wallet/statement").status_code == 401
        assert api.get("/wallet/statement", headers=user.headers).json()["code"] == "wallet_not_found"
        open_wallet(api, user)
        params = {"from": "2025-01-01T00:00:00Z", "to": "2026-06-01T00:00:00Z"}
        response = api.get("/wallet/statement", headers=user.headers, params=params)
        assert (response.status_code, response.json()["code"]) == (422, "invalid_range")
        assert response.headers["content-type"] == "application/problem+json"
        bad = api.get("/wallet/statement", headers=user.headers, params={"from": "last week"})
        assert (bad.status_code, bad.json()["errors"][0]["field"]) == (422, "from")


class TestKeysetHistoryThroughTheGateway:
    def test_after_pages_partition_the_history(self, api: httpx.Client) -> None:
        user = new_user(api)
        open_wallet(api, user, balance=10)
        for amount in (1, 2, 3, 4):
            assert move(api, user, "deposit", amount=amount).status_code == 200
        everything = api.get("/transaction/history", headers=user.headers, params={"limit": 100}).json()
        seen = api.get("/transaction/history", headers=user.headers, params={"limit": 2}).json()["transactions"]
        while True:
            params = {"limit": 2, "after": seen[-1]["id"]}
            batch = api.get("/transaction/history", headers=user.headers, params=params).json()["transactions"]
            if not batch:
                break
            seen += batch
        assert seen == everything["transactions"]
        withdrawals = api.get("/transaction/history", headers=user.headers, params={"type": "withdrawal"}).json()
        assert withdrawals["transactions"] == []
        both = api.get("/transaction/history", headers=user.headers, params={"after": 5, "offset": 0})
        assert (both.status_code, both.json()["code"]) == (422, "offset_with_after")
