"""Tamper evidence: every wallet's ledger entries are hash-chained (wallet.chain), and
`wallet-audit --verify-chain` names the entry that someone with the tables' owner rights
rewrote, deleted, inserted or moved behind the service's back."""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Connection, Engine, select, text, update

from svckit.db import make_engine
from svckit.testing import alembic, fresh_database
from wallet import chain
from wallet.audit import audit, chain_head, main, published_heads, verify_chain
from wallet.config import Settings

from .conftest import INI, app_client
from .factories import AuthFake, Signer, User, call, move, new_user, open_wallet, place_hold, post, run_all

_databases = itertools.count()


@dataclass
class Ledger:
    client: TestClient
    engine: Engine
    url: str
    jane: User
    john: User
    jane_wallet: int
    john_wallet: int

    def entries(self, wallet_id: int) -> list[Any]:
        """The wallet's entries in chain order."""
        query = select(chain.L).where(chain.L.c.wallet_id == wallet_id).order_by(*chain.CHAIN_ORDER)
        with self.engine.connect() as conn:
            return list(conn.execute(query).all())

    def breaks(self) -> list[chain.Break]:
        with self.engine.connect() as conn:
            return list(chain.verify(conn))


@pytest.fixture
def ledger(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, signer: Signer, auth_fake: AuthFake
) -> Iterator[Ledger]:
    """A private database (the tests tamper with it) with two users who moved money."""
    with fresh_database(f"wallet_chain{next(_databases)}", tmp_path_factory.mktemp("chain")) as url:
        alembic(INI, url, "upgrade", "head")
        settings = Settings(
            database_url=url, redis_url=redis_url, service_token="test-service-token", allow_dev_service_token=True
        )
        engine = make_engine(url)
        with app_client(settings, signer, auth_fake) as client:
            jane, john = new_user(signer, auth_fake), new_user(signer, auth_fake, first="John")
            jane_wallet = open_wallet(client, jane, balance=1000)["id"]
            john_wallet = open_wallet(client, john, balance=50)["id"]
            for kind, body in [
                ("transfer", {"to_account_id": john_wallet, "amount": 100}),
                ("deposit", {"amount": 30}),
                ("withdraw", {"amount": 20}),
                ("transfer", {"to_account_id": john_wallet, "amount": 5}),
            ]:
                assert move(client, jane, kind, **body).status_code == 200
            yield Ledger(client, engine, url, jane, john, jane_wallet, john_wallet)
        engine.dispose()


@contextmanager
def as_owner(engine: Engine) -> Iterator[Connection]:
    """A transaction of the tables' owner with the append-only triggers out of the way, as
    an attacker with full database access would do it (and then puts them back)."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SET LOCAL session_replication_role = replica"))  # no trigger fires
            yield conn
            return
        for action in ("update", "delete"):
            conn.execute(text(f"DROP TRIGGER ledger_entries_no_{action}"))
        yield conn
        for action in ("UPDATE", "DELETE"):
            conn.execute(
                text(
                    f"CREATE TRIGGER IF NOT EXISTS ledger_entries_no_{action.lower()} BEFORE {action} ON ledger_entries "
                    f"BEGIN SELECT RAISE(ABORT, 'ledger_entries is append-only: {action} refused'); END"
                )
            )


def only_break(ledger: Ledger) -> chain.Break:
    breaks = ledger.breaks()
    assert len(breaks) == 1, [b.message for b in breaks]
    return breaks[0]


class TestWriting:
    def test_each_entry_extends_its_wallets_chain_and_the_head(self, ledger: Ledger) -> None:
        for wallet_id in (ledger.jane_wallet, ledger.john_wallet):
            entries = ledger.entries(wallet_id)
            assert len(entries) >= 3
            prev = None
            for entry in entries:
                assert entry.prev_hash == prev
                assert entry.hash == chain.row_hash(entry, prev)
                prev = entry.hash
            with ledger.engine.connect() as conn:
                head = conn.execute(text("SELECT chain_head FROM wallets WHERE id = :w"), {"w": wallet_id}).scalar()
            assert head == prev
        assert ledger.breaks() == []

    def test_the_hash_is_not_in_the_public_entry(self, ledger: Ledger) -> None:
        history = ledger.client.get("/transaction/history", headers=ledger.jane.headers).json()["transactions"]
        entries = ledger.client.get(f"/transaction/{history[0]['id']}/ledger", headers=ledger.jane.headers).json()
        assert {frozenset(e) for e in entries} == {
            frozenset(
                {
                    "id",
                    "transaction_id",
                    "wallet_id",
                    "entry_type",
                    "amount",
                    "currency",
                    "balance_snapshot",
                    "created_at",
                }
            )
        }

    def test_the_encoding_is_fixed_and_unambiguous(self) -> None:
        from datetime import UTC, datetime

        fields: dict[str, Any] = {
            "wallet_id": 12,
            "transaction_id": 345,
            "entry_type": "credit",
            "amount": 200,
            "currency": "USD",
            "balance_snapshot": -7,
            "created_at": datetime(2026, 5, 31, 12, 0, 0, 1, tzinfo=UTC),
            "prev_hash": None,
        }
        assert chain.encode(**fields) == (
            b"wallet-ledger-chain/v1;2:12;3:345;6:credit;3:200;3:USD;2:-7;27:2026-05-31T12:00:00.000001Z;0:"
        )
        assert chain.entry_hash(**fields) == chain.entry_hash(**fields)
        assert chain.entry_hash(**fields) != chain.entry_hash(**{**fields, "wallet_id": 1, "transaction_id": 2345})
        assert chain.head_digest([(2, "b"), (1, "a")]) == chain.head_digest([(1, "a"), (2, "b")])

    def test_many_concurrent_movements_on_two_wallets_leave_clean_chains(self, ledger: Ledger) -> None:
        jobs = []
        for i in range(40):
            sender, to = (ledger.jane, ledger.john_wallet) if i % 2 else (ledger.john, ledger.jane_wallet)
            jobs.append(
                lambda s=sender, t=to: call(ledger.client, s, "transfer", uuid.uuid4().hex, amount=3, to_account_id=t)
            )
            jobs.append(lambda s=sender: call(ledger.client, s, "deposit", uuid.uuid4().hex, amount=2))
        assert {status for status, _ in run_all(jobs)} == {200}
        assert ledger.breaks() == []
        assert len(ledger.entries(ledger.jane_wallet)) > 40
        report = verify_chain(ledger.engine)
        assert (report.count, report.entries) == (0, report.entries)
        assert audit(ledger.engine).violations == []

    def test_captures_and_refunds_extend_the_chains(self, ledger: Ledger) -> None:
        """The holds' and refunds' movements book through the same lock and book()."""
        hold = place_hold(ledger.client, ledger.jane, amount=40, to_account_id=ledger.john_wallet)
        assert post(ledger.client, ledger.jane, f"/holds/{hold['id']}/capture").status_code == 200
        history = ledger.client.get("/transaction/history?limit=1", headers=ledger.john.headers).json()
        refund = post(ledger.client, ledger.john, f"/transaction/{history['transactions'][0]['id']}/refund", amount=15)
        assert refund.status_code == 200, refund.text
        entries = ledger.entries(ledger.john_wallet)
        assert entries[-1].prev_hash == entries[-2].hash
        assert ledger.breaks() == []
        assert audit(ledger.engine).violations == []


class TestTampering:
    def test_a_rewritten_amount_names_the_entry(self, ledger: Ledger) -> None:
        target = ledger.entries(ledger.john_wallet)[1]
        with as_owner(ledger.engine) as conn:
            conn.execute(text("UPDATE ledger_entries SET amount = amount + 1 WHERE id = :id"), {"id": target.id})
        found = only_break(ledger)
        assert (found.entry_id, found.wallet_id, found.what) == (target.id, ledger.john_wallet, "content")
        assert f"ledger entry {target.id} " in found.message

    def test_a_deleted_entry_names_the_one_after_the_gap(self, ledger: Ledger) -> None:
        entries = ledger.entries(ledger.jane_wallet)
        with as_owner(ledger.engine) as conn:
            conn.execute(text("DELETE FROM ledger_entries WHERE id = :id"), {"id": entries[2].id})
        found = only_break(ledger)
        assert (found.entry_id, found.wallet_id, found.what) == (entries[3].id, ledger.jane_wallet, "link")

    def test_a_deleted_newest_entry_breaks_the_head(self, ledger: Ledger) -> None:
        entries = ledger.entries(ledger.john_wallet)
        with as_owner(ledger.engine) as conn:
            conn.execute(text("DELETE FROM ledger_entries WHERE id = :id"), {"id": entries[-1].id})
        found = only_break(ledger)
        assert (found.entry_id, found.wallet_id, found.what) == (entries[-2].id, ledger.john_wallet, "head")

    def test_an_inserted_entry_is_named(self, ledger: Ledger) -> None:
        """A plain INSERT (no trigger even refuses it) carries no hash; one with a made-up
        hash does not link; either way the audit names it."""
        before = ledger.entries(ledger.jane_wallet)
        with as_owner(ledger.engine) as conn:
            conn.execute(
                text(
                    "INSERT INTO ledger_entries (transaction_id, wallet_id, entry_type, amount, currency,"
                    " balance_snapshot, created_at, prev_hash, hash) SELECT transaction_id, wallet_id, 'credit',"
                    " 500, currency, balance_snapshot + 500, created_at, prev_hash, :forged FROM ledger_entries"
                    " WHERE id = :id"
                ),
                {"id": before[1].id, "forged": "f" * 64},
            )
        inserted = [e for e in ledger.entries(ledger.jane_wallet) if e.id not in {b.id for b in before}]
        breaks = ledger.breaks()
        assert breaks[0].entry_id == inserted[0].id, [b.message for b in breaks]
        assert breaks[0].what == "link"  # it claims entry 1's place, after entry 0

    def test_an_insert_without_a_hash_is_named(self, ledger: Ledger) -> None:
        copied = ledger.entries(ledger.john_wallet)[0].id
        with as_owner(ledger.engine) as conn:
            conn.execute(
                text(
                    "INSERT INTO ledger_entries (transaction_id, wallet_id, entry_type, amount, currency,"
                    " balance_snapshot, created_at) SELECT transaction_id, wallet_id, entry_type, amount, currency,"
                    " balance_snapshot, created_at FROM ledger_entries WHERE id = :id"
                ),
                {"id": copied},
            )
            new_id = conn.execute(text("SELECT max(id) FROM ledger_entries")).scalar_one()
        breaks = ledger.breaks()
        assert [(b.entry_id, b.what) for b in breaks] == [(new_id, "unchained")]

    @pytest.mark.parametrize("column", ["created_at", "balance_snapshot"])
    def test_two_swapped_entries_are_caught(self, ledger: Ledger, column: str) -> None:
        first, second = ledger.entries(ledger.jane_wallet)[1:3]
        with as_owner(ledger.engine) as conn:
            for row, other in ((first, second), (second, first)):
                conn.execute(update(chain.L).where(chain.L.c.id == row.id).values({column: getattr(other, column)}))
        breaks = ledger.breaks()
        assert [(b.entry_id, b.what) for b in breaks] == [(first.id, "content"), (second.id, "content")]

    def test_a_rewrite_that_recomputes_every_hash_is_caught_by_the_published_head(
        self, ledger: Ledger, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """The chain cannot stop the owner from rewriting an entry and rehashing everything
        after it; the head published before can: the digest differs, and the wallet's
        chain no longer holds the published head."""
        with pytest.raises(SystemExit) as exit_info:
            main(["--database-url", ledger.url, "--chain-head"])
        assert exit_info.value.code == 0
        published = capsys.readouterr().out.split()[2]
        assert published == chain_head(ledger.engine)["chain_head"]
        archive = tmp_path / "head.json"
        archive.write_text(json.dumps(chain_head(ledger.engine)))
        assert verify_chain(ledger.engine, published=published_heads(str(archive))).count == 0
        target = ledger.entries(ledger.john_wallet)[0]
        with as_owner(ledger.engine) as conn:
            conn.execute(text("UPDATE ledger_entries SET hash = NULL WHERE wallet_id = :w"), {"w": target.wallet_id})
            conn.execute(text("UPDATE ledger_entries SET amount = amount + 1 WHERE id = :id"), {"id": target.id})
            chain.chain_unchained(conn)
        assert ledger.breaks() == []  # a perfect forgery, as far as the chain goes
        assert chain_head(ledger.engine)["chain_head"] != published
        report = verify_chain(ledger.engine, published=published_heads(str(archive)))
        assert [(v.subject, v.id) for v in report.found] == [("wallet", ledger.john_wallet)]
        assert "published head" in report.violations[0]
        with pytest.raises(SystemExit) as exit_info:
            main(["--database-url", ledger.url, "--verify-chain", "--published", str(archive)])
        assert exit_info.value.code == 1

    def test_a_published_file_that_does_not_give_its_digest_is_refused(self, ledger: Ledger, tmp_path: Path) -> None:
        document = chain_head(ledger.engine)
        document["heads"][0][1] = "0" * 64
        archive = tmp_path / "head.json"
        archive.write_text(json.dumps(document))
        with pytest.raises(ValueError, match="do not give its chain_head"):
            published_heads(str(archive))
        with pytest.raises(SystemExit) as exit_info:
            main(["--database-url", ledger.url, "--verify-chain", "--published", str(archive)])
        assert exit_info.value.code == 2

    def test_the_cli_names_the_entry_and_exits_1(self, ledger: Ledger, capsys: pytest.CaptureFixture[str]) -> None:
        target = ledger.entries(ledger.jane_wallet)[0]
        with pytest.raises(SystemExit) as exit_info:
            main(["--database-url", ledger.url, "--verify-chain"])
        assert exit_info.value.code == 0, capsys.readouterr().out
        capsys.readouterr()
        with as_owner(ledger.engine) as conn:
            conn.execute(text("UPDATE ledger_entries SET amount = 1 WHERE id = :id"), {"id": target.id})
        with pytest.raises(SystemExit) as exit_info:
            main(["--database-url", ledger.url, "--verify-chain", "--json"])
        out = capsys.readouterr().out
        assert exit_info.value.code == 1
        assert f'"id": {target.id}' in out
        assert "entry_chain" in out
        assert "rewritten" in out


class TestTheTransactionRow:
    """The chain covers the entries; the audit ties each transaction row to them, so a
    rewritten payer, payee or time (which a refund or history would believe) is named."""

    @pytest.mark.parametrize(
        "rewrite",
        [
            "from_wallet_id = to_wallet_id, to_wallet_id = from_wallet_id",
            "created_at = '2025-01-01 00:00:00+00:00'",
        ],
    )
    def test_a_rewritten_transaction_row_is_named_by_the_audit(self, ledger: Ledger, rewrite: str) -> None:
        with ledger.engine.connect() as conn:
            txn = conn.execute(
                text("SELECT max(id) FROM transactions WHERE type = 'transfer' AND from_wallet_id = :w"),
                {"w": ledger.jane_wallet},
            ).scalar_one()
        assert audit(ledger.engine).violations == []
        with ledger.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SET LOCAL session_replication_role = replica"))
            else:
                conn.execute(text("DROP TRIGGER transactions_no_update"))
            conn.execute(text(f"UPDATE transactions SET {rewrite} WHERE id = :id"), {"id": txn})
        violations = audit(ledger.engine).violations
        assert any(f"transaction {txn}: its payer, payee or time differs" in v for v in violations), violations
