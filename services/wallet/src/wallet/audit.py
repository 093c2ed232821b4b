"""`wallet-audit`: check the whole ledger and exit non-zero on any violation.

Checks that every transaction balances (at least two entries, debits equal credits, in the
transaction's currency and amount), that every wallet's balance equals its credits minus
its debits and its newest snapshot, that each snapshot is the running balance, that no
user balance is negative, and that all wallets of a currency sum to zero.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

from sqlalchemy import Engine, case, func, select

from svckit.db import SessionLimits, make_engine
from wallet.models import SYSTEM, LedgerEntry, Transaction, Wallet

W = Wallet.__table__  # type: ignore[attr-defined]
T = Transaction.__table__  # type: ignore[attr-defined]
L = LedgerEntry.__table__  # type: ignore[attr-defined]
MAX_LISTED = 20


@dataclass
class Report:
    wallets: int = 0
    transactions: int = 0
    entries: int = 0
    violations: list[str] = field(default_factory=list)

    def add(self, message: str) -> None:
        self.violations.append(message)

    def render(self) -> str:
        lines = [
            f"wallet-audit: {self.wallets} wallets, {self.transactions} transactions, {self.entries} ledger entries",
            f"violations: {len(self.violations)}",
        ]
        lines += [f"  - {v}" for v in self.violations[:MAX_LISTED]]
        if len(self.violations) > MAX_LISTED:
            lines.append(f"  ... and {len(self.violations) - MAX_LISTED} more")
        return "\n".join(lines)


def _signed() -> object:
    return case((L.c.entry_type == "credit", L.c.amount), else_=-L.c.amount)


def audit(engine: Engine) -> Report:
    report = Report()
    with engine.connect() as conn, conn.begin():  # one snapshot on Postgres (REPEATABLE READ below)
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        report.wallets = conn.execute(select(func.count()).select_from(W)).scalar_one()
        report.transactions = conn.execute(select(func.count()).select_from(T)).scalar_one()
        report.entries = conn.execute(select(func.count()).select_from(L)).scalar_one()

        # 1. Every transaction balances, in its own amount and currency.
        per_txn = (
            select(
                T.c.id,
                T.c.amount,
                T.c.currency,
                func.count(L.c.id),
                func.coalesce(func.sum(case((L.c.entry_type == "debit", L.c.amount), else_=0)), 0),
                func.coalesce(func.sum(case((L.c.entry_type == "credit", L.c.amount), else_=0)), 0),
                func.sum(case((L.c.currency != T.c.currency, 1), else_=0)),
            )
            .select_from(T.outerjoin(L, L.c.transaction_id == T.c.id))
            .group_by(T.c.id, T.c.amount, T.c.currency)
        )
        for txn_id, amount, _currency, n, debits, credits, wrong_currency in conn.execute(per_txn):
            if n < 2 or debits != credits or debits != amount or wrong_currency:
                report.add(
                    f"transaction {txn_id}: {n} entries, debits {debits}, credits {credits}, amount {amount}"
                    f"{', entries in another currency' if wrong_currency else ''}"
                )

        # 2-4. Balances: credits minus debits, newest snapshot, never negative for users.
        sums = dict(conn.execute(select(L.c.wallet_id, func.sum(_signed())).group_by(L.c.wallet_id)).all())
        newest = dict(
            conn.execute(
                select(L.c.wallet_id, L.c.balance_snapshot).where(
                    L.c.id.in_(select(func.max(L.c.id)).group_by(L.c.wallet_id))
                )
            ).all()
        )
        totals: dict[str, int] = {}
        for wallet_id, kind, currency, balance in conn.execute(select(W.c.id, W.c.kind, W.c.currency, W.c.balance)):
            totals[currency] = totals.get(currency, 0) + balance
            if balance != sums.get(wallet_id, 0):
                report.add(f"wallet {wallet_id}: balance {balance} != credits - debits {sums.get(wallet_id, 0)}")
            if wallet_id in newest and newest[wallet_id] != balance:
                report.add(f"wallet {wallet_id}: balance {balance} != newest snapshot {newest[wallet_id]}")
            if kind != SYSTEM and balance < 0:
                report.add(f"wallet {wallet_id}: negative balance {balance}")
        for currency, total in sorted(totals.items()):
            if total != 0:
                report.add(f"currency {currency}: wallets sum to {total}, not 0")

        # 5. Each snapshot is the running balance of its wallet (streamed, constant memory).
        running: dict[int, int] = {}
        stream = conn.execution_options(yield_per=10_000).execute(
            select(L.c.id, L.c.wallet_id, _signed(), L.c.balance_snapshot).order_by(L.c.wallet_id, L.c.id)
        )
        for entry_id, wallet_id, delta, snapshot in stream:
            running[wallet_id] = running.get(wallet_id, 0) + delta
            if snapshot != running[wallet_id]:
                report.add(f"ledger entry {entry_id}: snapshot {snapshot} != running balance {running[wallet_id]}")
                running[wallet_id] = snapshot  # report each break once
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="wallet-audit", description=__doc__)
    parser.add_argument("--database-url", help="default: WALLET_DATABASE_URL (the service's own setting)")
    args = parser.parse_args(argv)
    from wallet.config import get_settings

    settings = get_settings()
    # No statement timeout: the audit's scans read the whole ledger, for minutes when it is
    # large. It takes no row locks, so the other limits stay the service's.
    limits = SessionLimits.from_settings(settings, statement_timeout_ms=0)
    engine = make_engine(args.database_url or settings.database_url, limits=limits)
    try:
        report = audit(engine)
    finally:
        engine.dispose()
    print(report.render())
    sys.exit(1 if report.violations else 0)


if __name__ == "__main__":
    main()
