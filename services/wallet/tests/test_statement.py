"""GET /wallet/statement: lines, running balances, the arithmetic, CSV, ranges and 422s."""

from __future__ import annotations

import csv
import io
import re
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from .factories import AuthFake, Signer, User, move, new_user, open_wallet


def now() -> datetime:
    return datetime.now(UTC)


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def statement(client: TestClient, user: User, **params: str) -> dict[str, Any]:
    response = client.get("/wallet/statement", headers=user.headers, params=params)
    assert response.status_code == 200, response.text
    return dict(response.json())


def ledger_snapshot(client: TestClient, user: User, transaction_id: int, wallet_id: int) -> int:
    entries = client.get(f"/transaction/{transaction_id}/ledger", headers=user.headers).json()
    return int(next(e["balance_snapshot"] for e in entries if e["wallet_id"] == wallet_id))


@pytest.fixture
def jane(client: TestClient, signer: Signer, auth_fake: AuthFake) -> User:
    user = new_user(signer, auth_fake, first="Jane", last="Doe")
    open_wallet(client, user, balance=500)
    return user


@pytest.fixture
def john(client: TestClient, signer: Signer, auth_fake: AuthFake) -> User:
    user = new_user(signer, auth_fake, first="John", last="Smith")
    open_wallet(client, user, balance=200)
    return user


class TestStatementLines:
    def test_lines_oldest_first_signed_with_running_balances(self, client: TestClient, jane: User, john: User) -> None:
        john_wallet = client.get("/wallet", headers=john.headers).json()["id"]
        assert move(client, jane, "deposit", amount=100).status_code == 200
        assert move(client, jane, "withdraw", amount=30).status_code == 200
        assert move(client, jane, "transfer", amount=70, to_account_id=john_wallet).status_code == 200
        assert move(client, john, "transfer", amount=5, to_account_id=jane_wallet(client, jane)).status_code == 200
        body = statement(client, jane)
        assert set(body) == {"wallet_id", "currency", "from", "to", "opening_balance", "closing_balance", "lines"}
        lines = body["lines"]
        assert [(line["type"], line["amount"], line["counterparty"]) for line in lines] == [
            ("deposit", 500, "External Source"),
            ("deposit", 100, "External Source"),
            ("withdrawal", -30, "External Destination"),
            ("transfer", -70, "John Smith"),
            ("transfer", 5, "John Smith"),
        ]
        assert [line["balance"] for line in lines] == [500, 600, 570, 500, 505]
        assert set(lines[0]) == {"transaction_id", "date", "type", "counterparty", "amount", "balance"}
        assert (body["opening_balance"], body["closing_balance"]) == (0, 505)
        assert body["closing_balance"] == client.get("/wallet", headers=jane.headers).json()["balance"]
        assert body["wallet_id"] == jane_wallet(client, jane)
        assert body["currency"] == "USD"
        # Each running balance is the ledger entry's own snapshot.
        for line in lines:
            assert line["balance"] == ledger_snapshot(client, jane, line["transaction_id"], body["wallet_id"])
        dates = [datetime.fromisoformat(line["date"]) for line in lines]
        assert dates == sorted(dates)

    def test_opening_balance_is_the_last_entry_before_from(self, client: TestClient, jane: User) -> None:
        assert move(client, jane, "deposit", amount=11).status_code == 200
        time.sleep(0.02)
        cut = now()
        time.sleep(0.02)
        assert move(client, jane, "withdraw", amount=7).status_code == 200
        assert move(client, jane, "deposit", amount=3).status_code == 200
        body = statement(client, jane, **{"from": iso(cut)})
        assert body["opening_balance"] == 511
        assert [line["amount"] for line in body["lines"]] == [-7, 3]
        assert body["opening_balance"] + sum(line["amount"] for line in body["lines"]) == body["closing_balance"] == 507
        assert datetime.fromisoformat(body["from"]) == cut

    def test_a_range_without_lines_opens_and_closes_on_the_balance_then(self, client: TestClient, jane: User) -> None:
        time.sleep(0.02)
        later = now()
        body = statement(client, jane, **{"from": iso(later), "to": iso(later + timedelta(days=1))})
        assert (body["opening_balance"], body["closing_balance"], body["lines"]) == (500, 500, [])

    def test_to_excludes_later_lines(self, client: TestClient, jane: User) -> None:
        time.sleep(0.02)
        cut = now()
        time.sleep(0.02)
        assert move(client, jane, "deposit", amount=9).status_code == 200
        body = statement(client, jane, to=iso(cut))
        assert [line["amount"] for line in body["lines"]] == [500]
        assert body["closing_balance"] == 500

    def test_default_range_is_the_last_30_days(self, client: TestClient, jane: User) -> None:
        body = statement(client, jane)
        start, end = datetime.fromisoformat(body["from"]), datetime.fromisoformat(body["to"])
        assert end - start == timedelta(days=30)
        assert abs((end - now()).total_seconds()) < 60

    def test_another_users_movements_never_appear(self, client: TestClient, jane: User, john: User) -> None:
        assert move(client, john, "deposit", amount=123).status_code == 200
        lines = statement(client, jane)["lines"]
        assert 123 not in [line["amount"] for line in lines]
        assert [line["amount"] for line in lines] == [500]


def jane_wallet(client: TestClient, user: User) -> int:
    return int(client.get("/wallet", headers=user.headers).json()["id"])


class TestStatementCsv:
    def test_csv_has_a_header_and_the_same_lines(self, client: TestClient, jane: User) -> None:
        assert move(client, jane, "withdraw", amount=40).status_code == 200
        response = client.get("/wallet/statement", headers={**jane.headers, "Accept": "text/csv"})
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/csv")
        rows = list(csv.DictReader(io.StringIO(response.text)))
        assert list(rows[0]) == ["transaction_id", "date", "type", "counterparty", "amount", "balance"]
        lines = statement(client, jane)["lines"]
        parsed = [
            {
                **row,
                "transaction_id": int(row["transaction_id"]),
                "amount": int(row["amount"]),
                "balance": int(row["balance"]),
            }
            for row in rows
        ]
        assert [{**p, "date": datetime.fromisoformat(p["date"])} for p in parsed] == [
            {**line, "date": datetime.fromisoformat(line["date"])} for line in lines
        ]

    @pytest.mark.parametrize(
        ("accept", "csv_expected"),
        [
            ("text/csv", True),
            ("text/csv;q=0.9, application/json;q=0.5", True),
            ("application/json, text/csv;q=0.1", False),
            ("*/*", False),
            ("application/json", False),
        ],
    )
    def test_accept_is_weighed(self, client: TestClient, jane: User, accept: str, csv_expected: bool) -> None:
        response = client.get("/wallet/statement", headers={**jane.headers, "Accept": accept})
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/csv" if csv_expected else "application/json")

    def test_a_formula_like_name_is_neutralised(self, client: TestClient, signer: Signer, auth_fake: AuthFake) -> None:
        mallory = new_user(signer, auth_fake, first="=HYPERLINK(1)", last="x")
        open_wallet(client, mallory, balance=50)
        victim = new_user(signer, auth_fake)
        open_wallet(client, victim)
        assert move(client, mallory, "transfer", amount=5, to_account_id=jane_wallet(client, victim)).status_code == 200
        text = client.get("/wallet/statement", headers={**victim.headers, "Accept": "text/csv"}).text
        [row] = list(csv.DictReader(io.StringIO(text)))
        assert row["counterparty"] == "'=HYPERLINK(1) x"


class TestStatementRefusals:
    @pytest.mark.parametrize(
        "params",
        [
            {"from": "yesterday"},
            {"to": "2026-13-01T00:00:00Z"},
            {"from": "2026-05-31T12:00:00"},  # no offset
            {"to": "0.5"},  # a number is not taken as a Unix time
            {"from": "1780000000"},
        ],
    )
    def test_bad_dates_are_422_problems(self, client: TestClient, jane: User, params: dict[str, str]) -> None:
        response = client.get("/wallet/statement", headers=jane.headers, params=params)
        assert response.status_code == 422
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["errors"][0]["field"] in {"from", "to"}

    def test_more_than_366_days_is_422(self, client: TestClient, jane: User) -> None:
        end = now()
        params = {"from": iso(end - timedelta(days=366, seconds=1)), "to": iso(end)}
        response = client.get("/wallet/statement", headers=jane.headers, params=params)
        assert (response.status_code, response.json()["code"]) == (422, "invalid_range")
        params["from"] = iso(end - timedelta(days=366))
        assert client.get("/wallet/statement", headers=jane.headers, params=params).status_code == 200

    def test_from_after_to_is_422(self, client: TestClient, jane: User) -> None:
        end = now()
        params = {"from": iso(end), "to": iso(end - timedelta(seconds=1))}
        response = client.get("/wallet/statement", headers=jane.headers, params=params)
        assert (response.status_code, response.json()["code"]) == (422, "invalid_range")

    def test_no_open_wallet_is_404(self, client: TestClient, signer: Signer, auth_fake: AuthFake) -> None:
        response = client.get("/wallet/statement", headers=new_user(signer, auth_fake).headers)
        assert (response.status_code, response.json()["code"]) == (404, "wallet_not_found")


class TestStatementEdges:
    @pytest.mark.parametrize(
        ("params", "status"),
        [
            ({"to": "0001-01-01T00:00:00Z"}, 200),
            ({"from": "0001-01-01T00:00:00+01:00"}, 422),  # before year 1 in UTC
            ({"to": "9999-12-31T23:59:59-23:00"}, 422),  # after 9999 in UTC
        ],
    )
    def test_dates_at_the_edges_of_the_calendar_are_answered(
        self, client: TestClient, jane: User, params: dict[str, str], status: int
    ) -> None:
        response = client.get("/wallet/statement", headers=jane.headers, params=params)
        assert response.status_code == status, response.text
        if status == 422:
            assert response.json()["code"] == "invalid_range"
        else:
            assert response.json()["lines"] == []
        history = client.get("/transaction/history", headers=jane.headers, params=params)
        assert history.status_code == status

    def test_far_past_to_with_default_from_is_an_empty_statement(self, client: TestClient, jane: User) -> None:
        body = statement(client, jane, to="0001-01-31T00:00:00Z")
        assert (body["opening_balance"], body["closing_balance"], body["lines"]) == (0, 0, [])


class TestTimeOrder:
    """Reads by time rely on a wallet's entries never going back in time."""

    def test_a_clock_stepping_back_does_not_put_an_entry_before_the_last(
        self, client: TestClient, signer: Signer, auth_fake: AuthFake, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from wallet import repository

        user = new_user(signer, auth_fake)
        open_wallet(client, user, balance=100)
        assert move(client, user, "deposit", amount=7).status_code == 200
        real = repository.utcnow
        # SQLite's movements take the process's clock (Postgres's, the server's): 5 s back.
        monkeypatch.setattr(repository, "utcnow", lambda: real() - timedelta(seconds=5))
        assert move(client, user, "deposit", amount=50).status_code == 200
        monkeypatch.setattr(repository, "utcnow", real)
        lines = statement(client, user)["lines"]
        assert [line["amount"] for line in lines] == [100, 7, 50]
        dates = [datetime.fromisoformat(line["date"]) for line in lines]
        assert dates == sorted(dates)
        assert len(set(dates)) == 3
        seen, after = [], None
        while True:
            params = {"to": "2999-01-01T00:00:00Z", "limit": "1"} | ({"after": str(after)} if after else {})
            page = client.get("/transaction/history", headers=user.headers, params=params).json()["transactions"]
            if not page:
                break
            seen.append(page[0]["amount"])
            after = page[0]["id"]
        assert seen == [50, 7, 100]

    def test_an_after_naming_no_transaction_bounds_nothing_by_time(self, client: TestClient, jane: User) -> None:
        params = {"after": "9000000000", "to": "2999-01-01T00:00:00Z"}
        timed = client.get("/transaction/history", headers=jane.headers, params=params).json()["transactions"]
        plain = client.get("/transaction/history", headers=jane.headers, params={"after": "9000000000"}).json()
        assert timed == plain["transactions"]
        assert timed

    def test_resuming_where_the_too_large_answer_says_counts_no_line_twice(
        self, client: TestClient, jane: User
    ) -> None:
        client.app.state.settings.statement_max_lines = 2  # type: ignore[attr-defined]
        for amount in (1, 2):
            assert move(client, jane, "deposit", amount=amount).status_code == 200
        start = iso(now() - timedelta(days=1))
        refused = client.get("/wallet/statement", headers=jane.headers, params={"from": start})
        assert (refused.status_code, refused.json()["code"]) == (422, "statement_too_large")
        found = re.search(r"end at (\S+): the next begin from=(\S+)\)", refused.json()["detail"])
        assert found is not None
        end, resume = found.groups()
        first = statement(client, jane, **{"from": start, "to": end})
        second = statement(client, jane, **{"from": resume})
        assert first["closing_balance"] == second["opening_balance"]
        ids = [line["transaction_id"] for line in first["lines"] + second["lines"]]
        assert len(ids) == len(set(ids)) == 3
