"""`wallet-audit` at size: one currency or one range of wallet ids at a time, progress on
stderr, and --json; the parts of a split audit together find what the whole audit finds."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from svckit.db import make_engine
from svckit.testing import alembic, fresh_database
from wallet import audit as audit_module
from wallet.audit import CHECKS, Progress, Scope, audit, main

from .conftest import INI

# Two currencies. USD: the outside world (1) paid 100 to wallet 2 and 50 to wallet 3.
# EUR: the outside world (4) paid 70 to wallet 5; wallet 6 is empty.
WALLETS = [
    (1, None, "system", "USD", -150),
    (2, 7, "user", "USD", 100),
    (3, 8, "user", "USD", 50),
    (4, None, "system", "EUR", -70),
    (5, 9, "user", "EUR", 70),
    (6, 10, "user", "EUR", 0),
]
TRANSACTIONS = [(1, "USD", 100, 1, 2), (2, "USD", 50, 1, 3), (3, "EUR", 70, 4, 5)]


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A small ledger, then tampered with: wallet 3 gets 10 USD from nowhere, and a EUR
    transaction 4 (wallet 6 to 5) is booked without its entries."""
    with fresh_database("wallet_audit", tmp_path_factory.mktemp("audit")) as url:
        alembic(INI, url, "upgrade", "head")
        engine = make_engine(url)
        with engine.begin() as conn:
            for wallet_id, user_id, kind, currency, balance in WALLETS:
                conn.execute(
                    text(
                        "INSERT INTO wallets (id, user_id, kind, status, currency, balance, owner_name, created_at,"
                        " updated_at) VALUES (:id, :user, :kind, 'open', :currency, :balance, 'Someone',"
                        " '2026-01-01', '2026-01-01')"
                    ),
                    {"id": wallet_id, "user": user_id, "kind": kind, "currency": currency, "balance": balance},
                )
            for txn_id, currency, amount, source, destination in TRANSACTIONS:
                book(conn, txn_id, currency, amount, source, destination)
                conn.execute(
                    text(
                        "INSERT INTO ledger_entries (transaction_id, wallet_id, entry_type, amount, currency,"
                        " balance_snapshot, created_at) VALUES"
                        " (:t, :source, 'debit', :amount, :currency, :debited, '2026-01-01'),"
                        " (:t, :destination, 'credit', :amount, :currency, :credited, '2026-01-01')"
                    ),
                    {
                        "t": txn_id,
                        "source": source,
                        "destination": destination,
                        "amount": amount,
                        "currency": currency,
                        "debited": -amount - (100 if txn_id == 2 else 0),
                        "credited": amount,
                    },
                )
            conn.execute(text("UPDATE wallets SET balance = 60 WHERE id = 3"))
            book(conn, 4, "EUR", 5, 6, 5)
        engine.dispose()
        yield url


def book(conn: object, txn_id: int, currency: str, amount: int, source: int, destination: int) -> None:
    conn.execute(  # type: ignore[attr-defined]
        text(
            "INSERT INTO transactions (id, type, amount, currency, from_wallet_id, to_wallet_id, initiated_by,"
            " created_at) VALUES (:id, 'transfer', :amount, :currency, :source, :destination, 7, '2026-01-01')"
        ),
        {"id": txn_id, "amount": amount, "currency": currency, "source": source, "destination": destination},
    )


def found(url: str, scope: Scope | None = None) -> set[tuple[str, object]]:
    engine = make_engine(url)
    try:
        return {(v.check, v.id) for v in audit(engine, scope=scope).found}
    finally:
        engine.dispose()


EVERYTHING = {
    ("balance_is_credits_minus_debits", 3),
    ("balance_is_newest_snapshot", 3),
    ("currency_sums_to_zero", "USD"),
    ("transactions_balance", 4),
}


def run(url: str, *args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(["--database-url", url, *args])
    out, err = capsys.readouterr()
    code = exit_info.value.code
    return int(code) if isinstance(code, int) else 2, out, err


class TestOneCurrency:
    def test_the_audits_of_every_currency_are_the_whole_audit(self, ledger: str) -> None:
        assert found(ledger) == EVERYTHING
        usd, eur = found(ledger, Scope(currency="USD")), found(ledger, Scope(currency="EUR"))
        assert usd == {v for v in EVERYTHING if v[1] in (3, "USD")}
        assert eur == {("transactions_balance", 4)}
        assert usd | eur == EVERYTHING

    def test_it_counts_and_names_only_its_currency(self, ledger: str, capsys: pytest.CaptureFixture[str]) -> None:
        code, out, _ = run(ledger, "--currency", "eur", capsys=capsys)
        assert code == 1
        assert out.splitlines()[0] == ("wallet-audit: 3 wallets, 2 transactions, 2 ledger entries (currency EUR)")
        assert "transaction 4: 0 entries" in out
        assert "wallet 3" not in out
        code, out, _ = run(ledger, "--currency", "GBP", capsys=capsys)
        assert (code, out.splitlines()[1]) == (0, "violations: 0")


class TestWalletRanges:
    def test_ranges_covering_every_wallet_find_what_the_whole_audit_finds(self, ledger: str) -> None:
        parts = [found(ledger, Scope(wallet_ids=r)) for r in ((1, 2), (3, 4), (5, 100))]
        assert set().union(*parts) == EVERYTHING
        # The sums are global: every part checks them over all wallets.
        assert all(("currency_sums_to_zero", "USD") in part for part in parts)

    def test_a_range_checks_its_wallets_and_the_transactions_from_or_to_them(self, ledger: str) -> None:
        assert found(ledger, Scope(wallet_ids=(1, 2))) == {("currency_sums_to_zero", "USD")}
        assert found(ledger, Scope(wallet_ids=(3, 3))) == {
            ("balance_is_credits_minus_debits", 3),
            ("balance_is_newest_snapshot", 3),
            ("currency_sums_to_zero", "USD"),
        }
        # Transaction 4 lost its entries: it is still in the range of its wallets.
        assert ("transactions_balance", 4) in found(ledger, Scope(wallet_ids=(6, 6)))
        assert ("transactions_balance", 4) not in found(ledger, Scope(wallet_ids=(1, 4)))

    def test_with_a_currency_the_range_counts_and_the_sums_are_that_currencys(
        self, ledger: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        code, out, _ = run(ledger, "--currency", "EUR", "--wallet-ids", "1-4", capsys=capsys)
        assert code == 0
        assert out.splitlines()[0] == (
            "wallet-audit: 1 wallets, 1 transactions, 1 ledger entries (currency EUR, wallets 1-4)"
        )

    @pytest.mark.parametrize("bad", ["5-3", "1000", "a-b", "-1-4", "1-"])
    def test_a_malformed_range_is_a_usage_error(
        self, ledger: str, bad: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        code, _, err = run(ledger, f"--wallet-ids={bad}", capsys=capsys)
        assert code == 2
        assert "--wallet-ids" in err

    def test_a_malformed_currency_is_a_usage_error(self, ledger: str, capsys: pytest.CaptureFixture[str]) -> None:
        code, _, err = run(ledger, "--currency", "US1", capsys=capsys)
        assert (code, "not an ISO 4217 code" in err) == (2, True)


class TestJson:
    def test_the_same_facts_as_the_text_in_a_stable_shape(
        self, ledger: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        code, out, err = run(ledger, "--json", "--wallet-ids", "3-3", capsys=capsys)
        assert code == 1
        assert err == ""  # no terminal, no --progress: no progress
        report = json.loads(out)
        assert list(report) == [
            "ok",
            "scope",
            "wallets",
            "transactions",
            "ledger_entries",
            "max_wallet_id",
            "checks",
            "violation_count",
            "violations",
            "violations_truncated",
        ]
        assert report["ok"] is False
        assert report["scope"] == {"currency": None, "wallet_ids": [3, 3]}
        assert (report["wallets"], report["transactions"], report["ledger_entries"]) == (1, 1, 1)
        assert report["max_wallet_id"] == 6
        assert report["checks"] == list(CHECKS)
        assert report["violation_count"] == 3
        assert report["violations_truncated"] is False
        assert report["violations"][0] == {
            "check": "balance_is_credits_minus_debits",
            "subject": "wallet",
            "id": 3,
            "message": "wallet 3: balance 60 != credits - debits 50",
        }
        assert {(v["check"], v["id"]) for v in report["violations"]} == {
            ("balance_is_credits_minus_debits", 3),
            ("balance_is_newest_snapshot", 3),
            ("currency_sums_to_zero", "USD"),
        }

    def test_a_clean_scope_is_ok_and_exits_0(self, ledger: str, capsys: pytest.CaptureFixture[str]) -> None:
        code, out, _ = run(ledger, "--json", "--wallet-ids", "4-4", "--currency", "EUR", capsys=capsys)
        report = json.loads(out)
        assert (code, report["ok"], report["violation_count"], report["violations"]) == (0, True, 0, [])

    def test_past_max_kept_violations_are_counted_not_listed(
        self, ledger: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(audit_module, "MAX_KEPT", 2)
        code, out, _ = run(ledger, "--json", capsys=capsys)
        report = json.loads(out)
        assert (code, report["violation_count"], len(report["violations"])) == (1, 4, 2)
        assert report["violations_truncated"] is True
        code, out, _ = run(ledger, capsys=capsys)
        assert "violations: 4" in out


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class TestProgress:
    def test_with_progress_each_phase_reports_on_stderr(self, ledger: str, capsys: pytest.CaptureFixture[str]) -> None:
        code, out, err = run(ledger, "--progress", "--json", capsys=capsys)
        assert code == 1
        json.loads(out)  # stdout stays the report alone
        lines = err.splitlines()
        for phase, total in (("transactions", 4), ("wallets", 6), ("ledger entries", 6)):
            assert f"wallet-audit: {phase}: 0/{total} (0%)" in lines
            assert f"wallet-audit: {phase}: {total}/{total} (100%)" in lines

    def test_on_a_terminal_it_rewrites_one_line(self, ledger: str) -> None:
        terminal = FakeTerminal()
        engine = make_engine(ledger)
        try:
            audit(engine, progress=Progress(terminal, every_s=0))
        finally:
            engine.dispose()
        shown = terminal.getvalue()
        assert shown.startswith("\r\033[Kwallet-audit: transactions: 0/4 (0%)")
        assert "\r\033[Kwallet-audit: ledger entries: 6/6 (100%)\n" in shown
        assert shown.count("\n") == 3  # one finished line per phase

    def test_without_a_terminal_or_progress_nothing_is_shown(self, ledger: str, tmp_path: Path) -> None:
        progress = Progress(None)
        engine = make_engine(ledger)
        try:
            report = audit(engine, progress=progress)
        finally:
            engine.dispose()
        assert report.count == 4
        assert progress.done == 6  # counted, never written
