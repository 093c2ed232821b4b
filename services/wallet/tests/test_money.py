from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from wallet.audit import audit
from wallet.config import Settings

from .factories import AuthFake, Signer, User, key, move, new_user, open_wallet, sync_engine


def balance(client: TestClient, user: User) -> int:
    return int(client.get("/wallet", headers=user.headers).json()["balance"])


def history(client: TestClient, user: User) -> list[dict[str, Any]]:
    return list(client.get("/transaction/history", headers=user.headers, params={"limit": 100}).json()["transactions"])


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


def wallet_id(client: TestClient, user: User) -> int:
    return int(client.get("/wallet", headers=user.headers).json()["id"])


class TestDeposit:
    def test_shape_and_stored_balance(self, client: TestClient, jane: User) -> None:
        response = move(client, jane, "deposit", amount=200)
        assert response.status_code == 200
        assert response.json() == {"wallet_id": wallet_id(client, jane), "amount": 200, "current_balance": 700}
        assert "idempotent-replayed" not in response.headers
        assert balance(client, jane) == 700

    def test_wrong_currency_is_422_and_changes_nothing(self, client: TestClient, jane: User) -> None:
        response = move(client, jane, "deposit", amount=200, currency="EUR")
        assert response.status_code == 422
        assert response.json()["code"] == "currency_mismatch"
        assert balance(client, jane) == 500

    @pytest.mark.parametrize("amount", [0, -5, 2.5, "200", True, None, 10**12 + 1])
    def test_bad_amounts_are_422(self, client: TestClient, jane: User, amount: object) -> None:
        response = move(client, jane, "deposit", amount=amount)
        assert response.status_code == 422
        assert [e["field"] for e in response.json()["errors"]] == ["amount"]
        assert balance(client, jane) == 500


class TestSystemWalletShards:
    """The outside world is several system wallets per currency, so deposits and withdrawals of
    different users lock different rows; each user always meets the same one."""

    def outside_wallet(self, client: TestClient, user: User) -> int:
        txn = history(client, user)[0]["id"]
        entries = client.get(f"/transaction/{txn}/ledger", headers=user.headers).json()
        (outside,) = {e["wallet_id"] for e in entries} - {wallet_id(client, user)}
        return int(outside)

    def test_users_spread_over_the_shards_and_each_keeps_one(
        self, client: TestClient, signer: Signer, auth_fake: AuthFake
    ) -> None:
        shards = client.app.state.settings.system_wallet_shards  # type: ignore[attr-defined]
        users = [new_user(signer, auth_fake) for _ in range(shards)]
        seen = set()
        for user in users:
            open_wallet(client, user)
            move(client, user, "deposit", amount=300).raise_for_status()
            deposit_side = self.outside_wallet(client, user)
            move(client, user, "withdraw", amount=100).raise_for_status()
            assert self.outside_wallet(client, user) == deposit_side
            seen.add(deposit_side)
        assert len(seen) == shards  # consecutive user ids land on distinct shards
        assert audit(sync_engine(client)).violations == []


class TestWithdraw:
    def test_shape_and_history(self, client: TestClient, jane: User) -> None:
        response = move(client, jane, "withdraw", amount=50)
        assert response.json() == {"wallet_id": wallet_id(client, jane), "amount": 50, "current_balance": 450}
        newest = history(client, jane)[0]
        assert (newest["type"], newest["sender"], newest["receiver"]) == (
            "withdrawal",
            "Jane Doe",
            "External Destination",
        )

    def test_overdraft_is_422_and_balance_unchanged(self, client: TestClient, jane: User) -> None:
        response = move(client, jane, "withdraw", amount=501)
        assert response.status_code == 422
        assert response.json()["code"] == "insufficient_funds"
        assert balance(client, jane) == 500
        assert len(history(client, jane)) == 1  # just the opening deposit

    def test_the_whole_balance_can_be_withdrawn(self, client: TestClient, jane: User) -> None:
        assert move(client, jane, "withdraw", amount=500).json()["current_balance"] == 0


class TestTransfer:
    def test_shape_both_balances_history_and_ledger(self, client: TestClient, jane: User, john: User) -> None:
        to = wallet_id(client, john)
        response = move(client, jane, "transfer", amount=100, to_account_id=to)
        assert response.status_code == 200
        assert response.json() == {
            "wallet_id": wallet_id(client, jane),
            "recipient_wallet_id": to,
            "amount": 100,
            "current_balance": 400,
        }
        assert balance(client, john) == 300
        item = history(client, jane)[0]
        assert (item["type"], item["sender"], item["receiver"], item["amount"]) == (
            "transfer",
            "Jane Doe",
            "John Smith",
            100,
        )
        assert history(client, john)[0]["id"] == item["id"]
        entries = client.get(f"/transaction/{item['id']}/ledger", headers=jane.headers).json()
        assert [(e["wallet_id"], e["entry_type"], e["amount"], e["balance_snapshot"]) for e in entries] == [
            (wallet_id(client, jane), "debit", 100, 400),
            (to, "credit", 100, 300),
        ]
        assert set(entries[0]) == {
            "id",
            "transaction_id",
            "wallet_id",
            "entry_type",
            "amount",
            "currency",
            "balance_snapshot",
            "created_at",
        }

    def test_overdraft_is_422_and_nothing_moves(self, client: TestClient, jane: User, john: User) -> None:
        response = move(client, jane, "transfer", amount=501, to_account_id=wallet_id(client, john))
        assert response.json()["code"] == "insufficient_funds"
        assert (balance(client, jane), balance(client, john)) == (500, 200)

    def test_to_oneself_is_422(self, client: TestClient, jane: User) -> None:
        response = move(client, jane, "transfer", amount=1, to_account_id=wallet_id(client, jane))
        assert (response.status_code, response.json()["code"]) == (422, "self_transfer")

    def test_unknown_recipient_is_404(self, client: TestClient, jane: User) -> None:
        response = move(client, jane, "transfer", amount=1, to_account_id=10**9)
        assert (response.status_code, response.json()["code"]) == (404, "recipient_not_found")

    def test_closed_recipient_is_404(self, client: TestClient, jane: User, signer: Signer, auth_fake: AuthFake) -> None:
        gone = new_user(signer, auth_fake)
        closed_id = open_wallet(client, gone)["id"]
        assert client.delete("/wallet", headers=gone.headers).status_code == 200
        response = move(client, jane, "transfer", amount=1, to_account_id=closed_id)
        assert (response.status_code, response.json()["code"]) == (404, "recipient_not_found")
        assert balance(client, jane) == 500

    def test_recipient_in_another_currency_is_422(
        self, client: TestClient, jane: User, signer: Signer, auth_fake: AuthFake
    ) -> None:
        euro = new_user(signer, auth_fake)
        euro_id = open_wallet(client, euro, currency="EUR")["id"]
        response = move(client, jane, "transfer", amount=1, to_account_id=euro_id)
        assert (response.status_code, response.json()["code"]) == (422, "currency_mismatch")

    def test_string_recipient_id_is_422(self, client: TestClient, jane: User, john: User) -> None:
        response = move(client, jane, "transfer", amount=1, to_account_id=str(wallet_id(client, john)))
        assert [e["field"] for e in response.json()["errors"]] == ["to_account_id"]


class TestHistoryAndLedgerAccess:
    def test_pagination_newest_first(self, client: TestClient, jane: User) -> None:
        for amount in (1, 2, 3):
            move(client, jane, "deposit", amount=amount)
        page = client.get("/transaction/history", headers=jane.headers, params={"limit": 2, "offset": 1}).json()
        assert (page["limit"], page["offset"]) == (2, 1)
        assert [t["amount"] for t in page["transactions"]] == [2, 1]

    @pytest.mark.parametrize("params", [{"limit": 0}, {"limit": 101}, {"offset": -1}, {"limit": "x"}])
    def test_bad_paging_is_422(self, client: TestClient, jane: User, params: dict[str, object]) -> None:
        response = client.get("/transaction/history", headers=jane.headers, params=params)
        assert response.status_code == 422
        assert response.json()["errors"][0]["field"] in {"limit", "offset"}

    def test_someone_elses_ledger_is_404(self, client: TestClient, jane: User, john: User) -> None:
        txn = history(client, jane)[0]["id"]
        response = client.get(f"/transaction/{txn}/ledger", headers=john.headers)
        assert (response.status_code, response.json()["code"]) == (404, "transaction_not_found")


class TestLedgerCounterparty:
    """WALLET_LEDGER_SHOW_COUNTERPARTY: both sides of a transaction (the default, as in the
    contract), or the caller's own entries only (the other side's snapshot is its balance)."""

    @pytest.fixture
    def transfer(self, client: TestClient, jane: User, john: User) -> int:
        assert move(client, jane, "transfer", amount=1, to_account_id=wallet_id(client, john)).status_code == 200
        return int(history(client, jane)[0]["id"])

    def test_by_default_both_sides_show(self, client: TestClient, jane: User, john: User, transfer: int) -> None:
        assert client.app.state.settings.ledger_show_counterparty is True  # type: ignore[attr-defined]
        for user in (jane, john):
            entries = client.get(f"/transaction/{transfer}/ledger", headers=user.headers).json()
            snapshots = {(e["wallet_id"], e["entry_type"], e["balance_snapshot"]) for e in entries}
            assert snapshots == {(wallet_id(client, jane), "debit", 499), (wallet_id(client, john), "credit", 201)}

    def test_switched_off_each_side_sees_only_its_own_entry(
        self,
        client: TestClient,
        signer: Signer,
        auth_fake: AuthFake,
        settings: Settings,
        jane: User,
        john: User,
        transfer: int,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        monkeypatch.setenv("WALLET_LEDGER_SHOW_COUNTERPARTY", "false")
        private = Settings(**settings.model_dump(exclude={"ledger_show_counterparty"}))
        assert private.ledger_show_counterparty is False
        monkeypatch.setattr(client.app.state, "settings", private)  # type: ignore[attr-defined]
        for user, side, snapshot in ((jane, "debit", 499), (john, "credit", 201)):
            entries = client.get(f"/transaction/{transfer}/ledger", headers=user.headers).json()
            assert [(e["wallet_id"], e["entry_type"], e["balance_snapshot"]) for e in entries] == [
                (wallet_id(client, user), side, snapshot)
            ]
        deposit = history(client, jane)[-1]["id"]  # her opening balance: the system wallet's side is hidden too
        entries = client.get(f"/transaction/{deposit}/ledger", headers=jane.headers).json()
        assert [(e["entry_type"], e["balance_snapshot"]) for e in entries] == [("credit", 500)]
        stranger = new_user(signer, auth_fake)
        open_wallet(client, stranger, balance=5)
        response = client.get(f"/transaction/{transfer}/ledger", headers=stranger.headers)
        assert (response.status_code, response.json()["code"]) == (404, "transaction_not_found")


class TestIdempotency:
    def test_missing_key_is_400_and_moves_nothing(self, client: TestClient, jane: User) -> None:
        response = client.patch("/transaction/deposit", json={"amount": 5, "currency": "USD"}, headers=jane.headers)
        assert (response.status_code, response.json()["code"]) == (400, "idempotency_key_missing")
        assert balance(client, jane) == 500

    @pytest.mark.parametrize("bad", ["", "x" * 256, "has space", "tab\tkey", "é"])
    def test_malformed_key_is_400(self, client: TestClient, jane: User, bad: str) -> None:
        headers = {**jane.headers, "Idempotency-Key": bad.encode("utf-8")}
        response = client.patch("/transaction/deposit", json={"amount": 5, "currency": "USD"}, headers=headers)
        assert response.status_code == 400
        assert balance(client, jane) == 500

    def test_replay_is_byte_identical_and_moves_once(self, client: TestClient, jane: User) -> None:
        k = key()
        first = move(client, jane, "deposit", idem=k, amount=200)
        second = move(client, jane, "deposit", idem=k, amount=200)
        assert second.status_code == first.status_code == 200
        assert second.content == first.content
        assert second.headers["idempotent-replayed"] == "true"
        assert "idempotent-replayed" not in first.headers
        assert balance(client, jane) == 700

    def test_old_header_name_is_the_same_key(self, client: TestClient, jane: User) -> None:
        k = key()
        move(client, jane, "deposit", idem=k, amount=7)
        headers = {**jane.headers, "X-Idempotency-Key": k}
        again = client.patch("/transaction/deposit", json={"amount": 7, "currency": "USD"}, headers=headers)
        assert again.headers["idempotent-replayed"] == "true"
        assert balance(client, jane) == 507

    def test_same_key_different_body_is_422(self, client: TestClient, jane: User) -> None:
        k = key()
        move(client, jane, "deposit", idem=k, amount=200)
        response = move(client, jane, "deposit", idem=k, amount=201)
        assert (response.status_code, response.json()["code"]) == (422, "idempotency_key_reused")
        assert balance(client, jane) == 700

    def test_a_business_refusal_is_kept_and_replayed(self, client: TestClient, jane: User) -> None:
        k = key()
        refused = move(client, jane, "withdraw", idem=k, amount=900)
        assert refused.json()["code"] == "insufficient_funds"
        move(client, jane, "deposit", amount=1000)  # now it would succeed...
        again = move(client, jane, "withdraw", idem=k, amount=900)
        assert again.content == refused.content  # ...but the key's outcome is fixed
        assert again.headers["idempotent-replayed"] == "true"
        assert balance(client, jane) == 1500

    def test_a_validation_error_keeps_nothing(self, client: TestClient, jane: User) -> None:
        k = key()
        assert move(client, jane, "deposit", idem=k, amount=-1).status_code == 422
        fixed = move(client, jane, "deposit", idem=k, amount=1)
        assert fixed.status_code == 200
        assert "idempotent-replayed" not in fixed.headers

    def test_keys_are_scoped_to_user_and_endpoint(self, client: TestClient, jane: User, john: User) -> None:
        k = key()
        assert move(client, jane, "deposit", idem=k, amount=10).json()["current_balance"] == 510
        assert move(client, john, "deposit", idem=k, amount=10).json()["current_balance"] == 210
        withdrawn = move(client, jane, "withdraw", idem=k, amount=10)
        assert "idempotent-replayed" not in withdrawn.headers
        assert withdrawn.json()["current_balance"] == 500


class TestReceiptsAreStaged:
    def receipts_of(self, client: TestClient, transaction_id: int) -> list[dict[str, Any]]:
        with sync_engine(client).connect() as conn:
            rows = [json.loads(p)["kwargs"]["message"] for (p,) in conn.execute(text("SELECT payload FROM outbox"))]
        return [r for r in rows if r.get("transaction_id") == transaction_id]

    def test_a_transfer_commits_one_receipt_per_side(self, client: TestClient, jane: User, john: User) -> None:
        move(client, jane, "transfer", amount=100, to_account_id=wallet_id(client, john))
        txn = history(client, jane)[0]["id"]
        staged = sorted(self.receipts_of(client, txn), key=lambda r: r["kind"])
        assert [(r["kind"], r["user_id"], r["counterparty"], r["balance_after"]) for r in staged] == [
            ("transfer_received", john.id, "Jane Doe", 300),
            ("transfer_sent", jane.id, "John Smith", 400),
        ]

    def test_deposit_and_withdrawal_commit_one_each(self, client: TestClient, jane: User) -> None:
        move(client, jane, "deposit", amount=5)
        move(client, jane, "withdraw", amount=7)
        withdrawal, deposit = history(client, jane)[:2]
        assert [r["counterparty"] for r in self.receipts_of(client, deposit["id"])] == ["External Source"]
        assert [r["counterparty"] for r in self.receipts_of(client, withdrawal["id"])] == ["External Destination"]

    def test_receipts_carry_their_recipient(self, client: TestClient, jane: User, john: User) -> None:
        """The address and names kept on the wallet at its opening go in each receipt, so
        the notifier asks the auth service nothing."""
        move(client, jane, "transfer", amount=100, to_account_id=wallet_id(client, john))
        staged = self.receipts_of(client, history(client, jane)[0]["id"])
        assert sorted((r["user_id"], r["recipient"]["email"], r["recipient"]["first_name"]) for r in staged) == sorted(
            [(jane.id, f"u{jane.id}@example.com", "Jane"), (john.id, f"u{john.id}@example.com", "John")]
        )
        assert {r["recipient"]["last_name"] for r in staged} == {"Doe", "Smith"}
        (opening,) = self.receipts_of(client, history(client, jane)[-1]["id"])  # booked as the wallet opened
        assert opening["recipient"] == {"email": f"u{jane.id}@example.com", "first_name": "Jane", "last_name": "Doe"}

    def test_a_wallet_without_a_kept_recipient_sends_the_old_shape(
        self, client: TestClient, jane: User, john: User
    ) -> None:
        """A wallet opened before the wallet kept recipients (NULL columns): its receipts
        have no recipient at all (the notifier looks the address up), the other side's do."""
        with sync_engine(client).begin() as conn:
            conn.execute(
                text(
                    "UPDATE wallets SET owner_email = NULL, owner_first_name = NULL, owner_last_name = NULL "
                    "WHERE user_id = :u"
                ),
                {"u": john.id},
            )
        move(client, jane, "transfer", amount=100, to_account_id=wallet_id(client, john))
        staged = {r["user_id"]: r for r in self.receipts_of(client, history(client, jane)[0]["id"])}
        assert "recipient" not in staged[john.id]
        assert staged[jane.id]["recipient"]["email"] == f"u{jane.id}@example.com"

    def test_a_refusal_commits_no_receipt(self, client: TestClient, jane: User) -> None:
        with sync_engine(client).connect() as conn:
            before = conn.execute(text("SELECT count(*) FROM outbox")).scalar_one()
        assert move(client, jane, "withdraw", amount=10**6).status_code == 422
        with sync_engine(client).connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM outbox")).scalar_one() == before


class TestHugeNumbers:
    """Numbers past the ids (32-bit wallet ids, 64-bit transaction ids) are validation
    errors, never a database overflow (500)."""

    @pytest.mark.parametrize(
        ("method", "path", "kwargs"),
        [
            ("get", "/transaction/history", {"params": {"offset": 10**30}}),
            ("get", f"/transaction/{10**20}/ledger", {}),
            ("get", f"/transaction/{2**63}/ledger", {}),
        ],
    )
    def test_reads(self, client: TestClient, jane: User, method: str, path: str, kwargs: dict[str, Any]) -> None:
        response = getattr(client, method)(path, headers=jane.headers, **kwargs)
        assert response.status_code == 422

    @pytest.mark.parametrize("transaction_id", [2**31, 2**63 - 1])
    def test_a_64_bit_transaction_id_is_looked_up(self, client: TestClient, jane: User, transaction_id: int) -> None:
        response = client.get(f"/transaction/{transaction_id}/ledger", headers=jane.headers)
        assert (response.status_code, response.json()["code"]) == (404, "transaction_not_found")

    def test_transfer_to_a_huge_wallet_id(self, client: TestClient, jane: User) -> None:
        response = move(client, jane, "transfer", amount=1, to_account_id=2**31)
        assert [e["field"] for e in response.json()["errors"]] == ["to_account_id"]
