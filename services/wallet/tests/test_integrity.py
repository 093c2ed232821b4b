"""What the database itself refuses, and what the audit command catches."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.exc import DBAPIError, IntegrityError

from svckit.aiodb import transaction
from svckit.db import make_engine, utcnow
from svckit.testing import alembic
from wallet import repository
from wallet.audit import audit, main
from wallet.domain import Booking
from wallet.ledger import postings

from .conftest import INI
from .factories import AuthFake, Signer, move, new_user, open_wallet, sync_engine


class TestAppendOnly:
    @pytest.mark.parametrize(
        "statement",
        [
            "UPDATE ledger_entries SET amount = amount + 1",
            "DELETE FROM ledger_entries",
            "UPDATE transactions SET amount = 1",
            "DELETE FROM transactions",
        ],
    )
    def test_raw_update_or_delete_is_refused(
        self, client: TestClient, signer: Signer, auth_fake: AuthFake, database_url: str, statement: str
    ) -> None:
        open_wallet(client, new_user(signer, auth_fake), balance=10)  # at least one row each
        engine = make_engine(database_url)
        try:
            with pytest.raises(DBAPIError, match="append-only"), engine.begin() as conn:
                conn.execute(text(statement))
        finally:
            engine.dispose()

    @pytest.mark.parametrize("table", ["ledger_entries", "transactions"])
    @pytest.mark.parametrize("verb", ["INSERT OR REPLACE", "REPLACE", "upsert"])
    def test_an_insert_cannot_overwrite_a_row(
        self, client: TestClient, signer: Signer, auth_fake: AuthFake, database_url: str, table: str, verb: str
    ) -> None:
        """REPLACE deletes the old row without firing DELETE triggers; an upsert updates it."""
        open_wallet(client, new_user(signer, auth_fake), balance=10)  # at least one row each
        engine = make_engine(database_url)
        if verb != "upsert" and engine.dialect.name != "sqlite":
            engine.dispose()
            pytest.skip(f"{verb} is SQLite's; Postgres has no such statement")
        columns = inspect(engine).get_columns(table)
        names = ", ".join(c["name"] for c in columns)
        changed = ", ".join("amount + 1" if c["name"] == "amount" else c["name"] for c in columns)
        copy = f"SELECT {changed} FROM {table} WHERE id = :id"
        statement = {
            "INSERT OR REPLACE": f"INSERT OR REPLACE INTO {table} ({names}) {copy}",
            "REPLACE": f"REPLACE INTO {table} ({names}) {copy}",
            "upsert": f"INSERT INTO {table} ({names}) {copy} ON CONFLICT (id) DO UPDATE SET amount = excluded.amount",
        }[verb]
        read = text(f"SELECT * FROM {table} WHERE id = :id")
        try:
            with engine.connect() as conn:
                newest = conn.execute(text(f"SELECT max(id) FROM {table}")).scalar_one()
                before = conn.execute(read, {"id": newest}).one()
            with pytest.raises(DBAPIError, match="append-only"), engine.begin() as conn:
                conn.execute(text(statement), {"id": newest})
            with engine.connect() as conn:
                assert conn.execute(read, {"id": newest}).one() == before
        finally:
            engine.dispose()

    def test_a_user_balance_cannot_go_negative_even_by_hand(
        self, client: TestClient, signer: Signer, auth_fake: AuthFake, database_url: str
    ) -> None:
        wallet = open_wallet(client, new_user(signer, auth_fake), balance=10)
        engine = make_engine(database_url)
        try:
            with pytest.raises(IntegrityError), engine.begin() as conn:
                conn.execute(text("UPDATE wallets SET balance = -1 WHERE id = :id"), {"id": wallet["id"]})
        finally:
            engine.dispose()


class TestAudit:
    def test_the_suites_database_is_clean(
        self,
        client: TestClient,
        signer: Signer,
        auth_fake: AuthFake,
        database_url: str,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        jane, john = new_user(signer, auth_fake), new_user(signer, auth_fake)
        open_wallet(client, jane, balance=100)
        john_wallet = open_wallet(client, john)
        move(client, jane, "transfer", amount=40, to_account_id=john_wallet["id"])
        move(client, john, "withdraw", amount=15)
        with pytest.raises(SystemExit) as exit_info:
            main(["--database-url", database_url])
        out = capsys.readouterr().out
        assert exit_info.value.code == 0, out
        assert "violations: 0" in out

    def test_it_catches_a_tampered_balance(
        self,
        tmp_path: object,
        client: TestClient,
        signer: Signer,
        auth_fake: AuthFake,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        # A private database, so the tampering cannot leak into the shared one.
        url = f"sqlite:///{tmp_path}/tampered.db"
        alembic(INI, url, "upgrade", "head")
        engine = create_engine(url)
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO wallets (id, user_id, kind, status, currency, balance, owner_name, created_at, updated_at)"
                    " VALUES (1, NULL, 'system', 'open', 'USD', -100, 'External', '2026-01-01', '2026-01-01'),"
                    " (2, 7, 'user', 'open', 'USD', 100, 'Jane Doe', '2026-01-01', '2026-01-01')"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO transactions (id, type, amount, currency, from_wallet_id, to_wallet_id, initiated_by,"
                    " created_at) VALUES (1, 'deposit', 100, 'USD', 1, 2, 7, '2026-01-01')"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO ledger_entries (transaction_id, wallet_id, entry_type, amount, currency, balance_snapshot,"
                    " created_at) VALUES (1, 1, 'debit', 100, 'USD', -100, '2026-01-01'),"
                    " (1, 2, 'credit', 100, 'USD', 100, '2026-01-01')"
                )
            )
        assert audit(make_engine(url)).violations == []
        with engine.begin() as conn:
            conn.execute(text("UPDATE wallets SET balance = 150 WHERE id = 2"))  # money invented
        violations = audit(make_engine(url)).violations
        assert any("wallet 2: balance 150 != credits - debits 100" in v for v in violations)
        assert any("currency USD: wallets sum to 50" in v for v in violations)
        with pytest.raises(SystemExit) as exit_info:
            main(["--database-url", url])
        assert exit_info.value.code == 1
        engine.dispose()


class TestBookingGuard:
    def test_a_booking_whose_snapshots_disagree_with_the_balances_is_refused(
        self, client: TestClient, signer: Signer, auth_fake: AuthFake
    ) -> None:
        """Under the row locks the booked snapshots always match; if they ever did not, the
        booking refuses to commit rather than write a ledger that lies."""
        user = new_user(signer, auth_fake)
        wallet = open_wallet(client, user, balance=100)["id"]
        state = client.app.state  # type: ignore[attr-defined]
        system = state.system_wallets.for_user("USD", user.id)
        before = audit(sync_engine(client))

        async def book_with_a_wrong_snapshot() -> None:
            async with transaction(state.db) as conn:
                locked = await repository.lock_for_movement(conn, user_id=user.id, other_id=system)
                source, destination = postings(source=system, destination=wallet, amount=5)
                booking = Booking(
                    transaction_id=locked.transaction_id,
                    type="deposit",
                    amount=5,
                    currency="USD",
                    source=source,
                    destination=destination,
                    snapshots={system: locked.balances[system] - 5, wallet: 999},  # right: 105
                    initiated_by=user.id,
                    now=utcnow(),
                    links={system: (None, "0" * 64), wallet: (None, "1" * 64)},
                )
                await repository.write_booking(conn, booking)

        with pytest.raises(RuntimeError, match="differ"):
            client.portal.call(book_with_a_wrong_snapshot)  # type: ignore[union-attr]
        after = audit(sync_engine(client))
        assert (after.transactions, after.entries, after.violations) == (before.transactions, before.entries, [])
        assert client.get("/wallet", headers=user.headers).json()["balance"] == 100
