"""Every migration goes up and down cleanly (SQLite here, Postgres in the Postgres pass)."""

from __future__ import annotations

import os

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, text
from sqlalchemy import select as sa_select

from svckit.db import make_engine
from svckit.testing import alembic, fresh_database, migration_roundtrip
from wallet.audit import audit
from wallet.config import Settings
from wallet.models import Base

from .conftest import INI, app_client
from .factories import AuthFake, Signer, move, new_user, open_wallet, sync_engine


def test_upgrade_downgrade_upgrade(tmp_path_factory: pytest.TempPathFactory) -> None:
    with fresh_database("wallet_migrations", tmp_path_factory.mktemp("mig")) as url:
        up, down, again = migration_roundtrip(INI, url)
    assert up == set(Base.metadata.tables)  # the migrations build exactly the models' tables
    assert down == set()
    assert again == up


def test_the_models_match_the_migrated_columns(database_url: str) -> None:
    """Every column the models declare has the migrated database's type and nullability."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            diffs = compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()
    # Each entry is a tuple for an index or table, a list of tuples for a column's changes.
    column_diffs = [d for d in diffs if isinstance(d, list) or d[0] in {"add_column", "remove_column"}]
    assert column_diffs == []


LONG_IDS = [
    ("transactions", "id"),
    ("ledger_entries", "id"),
    ("ledger_entries", "transaction_id"),
    ("idempotency_records", "id"),
    ("idempotency_records", "transaction_id"),
]


def test_ledger_ids_are_64_bit_on_postgres(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, signer: Signer, auth_fake: AuthFake
) -> None:
    if not os.environ.get("TEST_DATABASE_URL"):
        pytest.skip("Postgres only (TEST_DATABASE_URL): SQLite's INTEGER keys are 64-bit already")
    # A private database: the ids jump past 2^31 for everything booked after the setval.
    with fresh_database("wallet_long_ids", tmp_path_factory.mktemp("ids")) as url:
        alembic(INI, url, "upgrade", "head")
        engine = create_engine(url)
        try:
            with engine.begin() as conn:
                types = dict(
                    conn.execute(
                        text(
                            "SELECT table_name || '.' || column_name, data_type FROM information_schema.columns"
                            " WHERE table_schema = current_schema()"
                        )
                    ).all()
                )
                assert {f"{t}.{c}": types[f"{t}.{c}"] for t, c in LONG_IDS} == {
                    f"{t}.{c}": "bigint" for t, c in LONG_IDS
                }
                assert types["outbox.id"] == "character varying"  # a 32-character string id (svckit)
                for table in ("transactions", "ledger_entries", "idempotency_records"):
                    sequence = f"pg_get_serial_sequence('{table}', 'id')"
                    top = conn.execute(
                        text(f"SELECT seqmax FROM pg_sequence WHERE seqrelid = {sequence}::regclass")
                    ).scalar_one()
                    assert top == 2**63 - 1
                    conn.execute(text(f"SELECT setval({sequence}, {2**31 + 10})"))
        finally:
            engine.dispose()
        settings = Settings(
            database_url=url, redis_url=redis_url, service_token="test-service-token", allow_dev_service_token=True
        )
        with app_client(settings, signer, auth_fake) as client:
            user = new_user(signer, auth_fake)
            wallet = open_wallet(client, user, balance=100)  # a deposit: one transaction, two entries
            moved = move(client, user, "withdraw", amount=30)
            assert (moved.status_code, moved.json()["current_balance"]) == (200, 70)
            history = client.get("/transaction/history", headers=user.headers).json()["transactions"]
            assert [t["id"] for t in history] == [2**31 + 12, 2**31 + 11]
            ledger = client.get(f"/transaction/{history[0]['id']}/ledger", headers=user.headers).json()
            assert [(e["id"] > 2**31, e["wallet_id"] == wallet["id"]) for e in ledger] == [(True, True), (True, False)]
            assert audit(sync_engine(client)).violations == []


def test_0010_chains_the_existing_ledger(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A ledger written before 0010 comes out of it chained, per wallet in order, with every
    wallet's head set; the batching does not change a hash."""
    from wallet import chain
    from wallet.audit import verify_chain

    with fresh_database("wallet_chain_migration", tmp_path_factory.mktemp("chainmig")) as url:
        alembic(INI, url, "upgrade", "0007")
        engine = create_engine(url)
        try:
            with engine.begin() as conn:
                conn.execute(
                    text(
                        "INSERT INTO wallets (id, user_id, kind, status, currency, balance, owner_name, created_at,"
                        " updated_at) VALUES (1, NULL, 'system', 'open', 'USD', -130, 'External', :t, :t),"
                        " (2, 7, 'user', 'open', 'USD', 90, 'Jane Doe', :t, :t),"
                        " (3, 8, 'user', 'open', 'USD', 40, 'John Doe', :t, :t)"
                    ),
                    {"t": "2026-01-01 00:00:00.000000"},
                )
                movements = [(1, "deposit", 100, 1, 2), (2, "deposit", 30, 1, 3), (3, "transfer", 10, 2, 3)]
                balances = {1: 0, 2: 0, 3: 0}
                for txn, kind, amount, source, destination in movements:
                    at = f"2026-01-01 00:00:0{txn}.123456"
                    conn.execute(
                        text(
                            "INSERT INTO transactions (id, type, amount, currency, from_wallet_id, to_wallet_id,"
                            " initiated_by, created_at) VALUES (:id, :kind, :amount, 'USD', :s, :d, 7, :t)"
                        ),
                        {"id": txn, "kind": kind, "amount": amount, "s": source, "d": destination, "t": at},
                    )
                    for wallet, entry_type, delta in ((source, "debit", -amount), (destination, "credit", amount)):
                        balances[wallet] += delta
                        conn.execute(
                            text(
                                "INSERT INTO ledger_entries (transaction_id, wallet_id, entry_type, amount, currency,"
                                " balance_snapshot, created_at) VALUES (:txn, :w, :et, :amount, 'USD', :snap, :t)"
                            ),
                            {
                                "txn": txn,
                                "w": wallet,
                                "et": entry_type,
                                "amount": amount,
                                "snap": balances[wallet],
                                "t": at,
                            },
                        )
            alembic(INI, url, "upgrade", "head")
            assert verify_chain(make_engine(url)).violations == []
            query = sa_select(chain.L).order_by(*chain.CHAIN_ORDER)
            with engine.connect() as conn:
                rows = conn.execute(query).all()
                heads = dict(conn.execute(text("SELECT id, chain_head FROM wallets")).all())
            assert all(r.hash for r in rows)
            prev: dict[int, str | None] = {}
            for row in rows:
                assert row.prev_hash == prev.get(row.wallet_id)
                assert row.hash == chain.row_hash(row, row.prev_hash)
                prev[row.wallet_id] = row.hash
            assert heads == prev
            with engine.begin() as conn:  # rechained one entry at a time: the same hashes
                if conn.dialect.name == "postgresql":
                    conn.execute(text("SET LOCAL session_replication_role = replica"))
                    conn.execute(text("UPDATE ledger_entries SET hash = NULL, prev_hash = NULL"))
                    conn.execute(text("SET LOCAL session_replication_role = origin"))
                else:
                    conn.execute(text("DROP TRIGGER ledger_entries_no_update"))
                    conn.execute(text("UPDATE ledger_entries SET hash = NULL, prev_hash = NULL"))
                assert chain.chain_unchained(conn, batch=1) == len(rows)
            with engine.connect() as conn:
                assert conn.execute(query).all() == rows
            alembic(INI, url, "downgrade", "0007")
            alembic(INI, url, "upgrade", "head")
            assert verify_chain(make_engine(url)).violations == []
        finally:
            engine.dispose()
