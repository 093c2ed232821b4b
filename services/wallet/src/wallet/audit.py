"""`wallet-audit`: check the ledger and exit non-zero on any violation.

The checks, and how far each one reaches:

1. every transaction balances: at least two entries, debits equal credits equal its
   amount, every entry in its currency (per transaction);
2. every wallet's balance equals its credits minus its debits (per wallet);
3. and equals its newest entry's snapshot (per wallet);
4. no user wallet's balance is negative (per wallet);
5. each snapshot is its wallet's running balance (per wallet, in entry order);
6. all wallets of a currency sum to zero (global: every wallet of the currency at once);
7. every wallet's held amount equals what its active holds reserve (per wallet);
8. and never exceeds its balance, nor is negative (per wallet).

By default everything is checked in one snapshot (REPEATABLE READ on Postgres). A large
ledger can be audited in parts, each part a run of its own (its own snapshot), and an
interrupted audit resumed by running again the parts that did not finish:

- `--currency USD`: the whole audit of one currency. There is no FX: a transaction, its
  entries and its wallets share one currency, so the runs of every currency together
  are the whole audit, check 6 included.
- `--wallet-ids 1000-1999`: checks 2 to 5 for the wallets with those ids, and check 1 for
  every transaction from or to one of them (with all of its entries: a transfer between
  two ranges is checked in both). Ranges that together cover every wallet id (see
  `--json`'s `max_wallet_id`) cover checks 1 to 5 completely. Check 6 is global: it needs
  every balance of a currency from one snapshot, so every run checks it over all wallets
  (of `--currency`, with it); it reads the wallets table only, which is small next to
  the ledger. The system wallets (the outside world, a few per currency) carry every
  deposit and withdrawal: their range is the heaviest one.

The two combine (`--currency USD --wallet-ids 1-50000`). Progress goes to stderr when it
is a terminal, or with `--progress`; `--json` prints the report as one JSON document
(the same facts as the text: the scope, the counts, every check run, the violations,
the first MAX_KEPT of them listed). Exit codes: 0 no violation, 1 violations, 2 usage.

Tamper evidence (wallet.chain), instead of the checks above:

- `--verify-chain` recomputes every wallet's hash chain (with `--currency` or
  `--wallet-ids`, those wallets' chains, which are complete in themselves) and names each
  entry whose content, order or presence no longer matches, and each wallet whose head is
  not its newest entry's hash; the same report, text or `--json`, and exit codes.
- `--chain-head` prints one digest over every wallet's chain head (`--json`: with the
  heads), for an operator to publish elsewhere: a later rewrite of the ledger, even by the
  tables' owner who recomputes every hash and head, gives another digest.
- `--verify-chain --published FILE` (FILE: an earlier `--chain-head --json`, its heads
  checked against its digest) also reports each wallet whose chain no longer holds the
  head published then: the ledger up to it was rewritten, even if every hash after the
  rewrite was recomputed.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, TextIO

from sqlalchemy import ColumnElement, Connection, Engine, and_, case, func, or_, select

from svckit.db import SessionLimits, make_engine
from wallet import chain
from wallet.models import ACTIVE, SYSTEM, Hold, LedgerEntry, Transaction, Wallet

W = Wallet.__table__  # type: ignore[attr-defined]
T = Transaction.__table__  # type: ignore[attr-defined]
L = LedgerEntry.__table__  # type: ignore[attr-defined]
H = Hold.__table__  # type: ignore[attr-defined]
MAX_LISTED = 20  # in the text report
MAX_KEPT = 1_000  # in memory and in --json: the count goes on past it
STREAM = 10_000  # rows fetched at a time

CHECKS = (
    "transactions_balance",
    "balance_is_credits_minus_debits",
    "balance_is_newest_snapshot",
    "user_balance_not_negative",
    "snapshots_are_running_balances",
    "currency_sums_to_zero",
    "held_is_active_holds",
    "held_within_balance",
    "transaction_matches_its_entries",
)


@dataclass(frozen=True)
class Scope:
    """Which part of the ledger a run checks (everything by default)."""

    currency: str | None = None
    wallet_ids: tuple[int, int] | None = None

    def wallets(self) -> list[ColumnElement[bool]]:
        where = [W.c.currency == self.currency] if self.currency else []
        if self.wallet_ids:
            where.append(W.c.id.between(*self.wallet_ids))
        return where

    def entries(self) -> list[ColumnElement[bool]]:
        """The entries of the scope's wallets (by the wallet's currency, not the entry's:
        an entry in the wrong currency still counts in its wallet's balance)."""
        where = [L.c.wallet_id.between(*self.wallet_ids)] if self.wallet_ids else []
        if self.currency:
            where.append(L.c.wallet_id.in_(select(W.c.id).where(W.c.currency == self.currency)))
        return where

    def transactions(self) -> list[ColumnElement[bool]]:
        where = [T.c.currency == self.currency] if self.currency else []
        if self.wallet_ids:
            # By the transaction's own two wallets, not its entries: a transaction that lost
            # its entries still belongs to a range.
            where.append(or_(T.c.from_wallet_id.between(*self.wallet_ids), T.c.to_wallet_id.between(*self.wallet_ids)))
        return where

    def describe(self) -> str:
        parts = [f"currency {self.currency}"] if self.currency else []
        if self.wallet_ids:
            parts.append(f"wallets {self.wallet_ids[0]}-{self.wallet_ids[1]}")
        return ", ".join(parts)


@dataclass(frozen=True)
class Violation:
    check: str
    subject: str  # transaction, wallet, ledger_entry or currency
    id: int | str
    message: str


@dataclass
class Report:
    scope: Scope = field(default_factory=Scope)
    wallets: int = 0
    transactions: int = 0
    entries: int = 0
    max_wallet_id: int = 0
    count: int = 0  # every violation found; `found` keeps the first MAX_KEPT
    found: list[Violation] = field(default_factory=list)
    checks: tuple[str, ...] = CHECKS

    @property
    def violations(self) -> list[str]:
        return [v.message for v in self.found]

    def add(self, check: str, subject: str, id_: int | str, message: str) -> None:
        self.count += 1
        if len(self.found) < MAX_KEPT:
            self.found.append(Violation(check, subject, id_, message))

    def render(self) -> str:
        scope = f" ({self.scope.describe()})" if self.scope.describe() else ""
        lines = [
            f"wallet-audit: {self.wallets} wallets, {self.transactions} transactions, {self.entries} ledger entries"
            + scope,
            f"violations: {self.count}",
        ]
        lines += [f"  - {v}" for v in self.violations[:MAX_LISTED]]
        if self.count > MAX_LISTED:
            lines.append(f"  ... and {self.count - MAX_LISTED} more")
        return "\n".join(lines)

    def as_json(self) -> dict[str, Any]:
        """The stable shape of `--json` (add members, never rename or remove one)."""
        return {
            "ok": self.count == 0,
            "scope": {
                "currency": self.scope.currency,
                "wallet_ids": list(self.scope.wallet_ids) if self.scope.wallet_ids else None,
            },
            "wallets": self.wallets,
            "transactions": self.transactions,
            "ledger_entries": self.entries,
            "max_wallet_id": self.max_wallet_id,
            "checks": list(self.checks),
            "violation_count": self.count,
            "violations": [v.__dict__ for v in self.found],
            "violations_truncated": self.count > len(self.found),
        }


class Progress:
    """`phase: done/total (pct)` on stderr, rewritten in place on a terminal, a line every
    few seconds elsewhere (--progress into a log). Silent when not enabled."""

    def __init__(self, stream: TextIO | None, *, every_s: float | None = None) -> None:
        self.stream = stream
        self.tty = bool(stream and stream.isatty())
        self.every_s = every_s if every_s is not None else (0.2 if self.tty else 10.0)
        self.name, self.total, self.done, self._shown = "", 0, 0, 0.0

    def start(self, name: str, total: int) -> None:
        self.name, self.total, self.done = name, total, 0
        self._show(force=True)

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.stream and time.monotonic() - self._shown >= self.every_s:
            self._show()

    def finish(self) -> None:
        self.done = max(self.done, self.total)
        self._show(force=True, end="\n")

    def _show(self, *, force: bool = False, end: str = "") -> None:
        if not self.stream or not (force or time.monotonic() - self._shown >= self.every_s):
            return
        pct = f" ({100 * self.done // self.total}%)" if self.total else ""
        line = f"wallet-audit: {self.name}: {self.done}/{self.total}{pct}"
        if self.tty:
            self.stream.write("\r\033[K" + line + end)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self._shown = time.monotonic()


def _signed() -> Any:
    return case((L.c.entry_type == "credit", L.c.amount), else_=-L.c.amount)


def audit(engine: Engine, *, scope: Scope | None = None, progress: Progress | None = None) -> Report:
    scope = scope or Scope()
    progress = progress or Progress(None)
    report = Report(scope=scope)
    with engine.connect() as conn, conn.begin():  # one snapshot on Postgres (REPEATABLE READ below)
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        _count(conn, scope, report)
        progress.start("transactions", report.transactions)
        _check_transactions(conn, scope, report, progress)
        progress.finish()
        progress.start("wallets", report.wallets)
        _check_balances(conn, scope, report, progress)
        progress.finish()
        progress.start("ledger entries", report.entries)
        _check_snapshots(conn, scope, report, progress)
        progress.finish()
        _check_currency_sums(conn, scope, report)
    return report


def _count(conn: Connection, scope: Scope, report: Report) -> None:
    report.wallets = conn.execute(select(func.count()).select_from(W).where(*scope.wallets())).scalar_one()
    report.transactions = conn.execute(select(func.count()).select_from(T).where(*scope.transactions())).scalar_one()
    report.entries = conn.execute(select(func.count()).select_from(L).where(*scope.entries())).scalar_one()
    report.max_wallet_id = conn.execute(select(func.coalesce(func.max(W.c.id), 0))).scalar_one()


def _stream(conn: Connection, query: Any) -> Iterable[Any]:
    return conn.execution_options(yield_per=STREAM).execute(query)


def _check_transactions(conn: Connection, scope: Scope, report: Report, progress: Progress) -> None:
    """1. Every transaction balances, in its own amount and currency."""
    per_txn = (
        select(
            T.c.id,
            T.c.amount,
            func.count(L.c.id),
            func.coalesce(func.sum(case((L.c.entry_type == "debit", L.c.amount), else_=0)), 0),
            func.coalesce(func.sum(case((L.c.entry_type == "credit", L.c.amount), else_=0)), 0),
            func.sum(case((L.c.currency != T.c.currency, 1), else_=0)),
            # The row says what its entries say: who paid, who was paid, when (the hash chain
            # covers the entries; this ties the transaction row to them).
            func.sum(
                case(
                    (and_(L.c.entry_type == "debit", L.c.wallet_id != T.c.from_wallet_id), 1),
                    (and_(L.c.entry_type == "credit", L.c.wallet_id != T.c.to_wallet_id), 1),
                    (L.c.created_at != T.c.created_at, 1),
                    else_=0,
                )
            ),
        )
        .select_from(T.outerjoin(L, L.c.transaction_id == T.c.id))
        .where(*scope.transactions())
        .group_by(T.c.id, T.c.amount)
    )
    for txn_id, amount, n, debits, credits, wrong_currency, mismatched in _stream(conn, per_txn):
        progress.advance()
        if mismatched:
            report.add(
                CHECKS[8],
                "transaction",
                txn_id,
                f"transaction {txn_id}: its payer, payee or time differs from its ledger entries'",
            )
        if n < 2 or debits != credits or debits != amount or wrong_currency:
            report.add(
                CHECKS[0],
                "transaction",
                txn_id,
                f"transaction {txn_id}: {n} entries, debits {debits}, credits {credits}, amount {amount}"
                f"{', entries in another currency' if wrong_currency else ''}",
            )


def _check_balances(conn: Connection, scope: Scope, report: Report, progress: Progress) -> None:
    """2-4, 7-8. Balances: credits minus debits, newest snapshot, never negative for users, held
    (one row per wallet, streamed: memory stays flat however many wallets)."""
    entries = scope.entries()
    sums = select(L.c.wallet_id, func.sum(_signed()).label("total")).where(*entries).group_by(L.c.wallet_id)
    sums = sums.subquery()
    newest_ids = select(func.max(L.c.id)).where(*entries).group_by(L.c.wallet_id)
    newest = select(L.c.wallet_id, L.c.balance_snapshot).where(L.c.id.in_(newest_ids)).subquery()
    reserved = select(H.c.wallet_id, func.sum(H.c.amount).label("reserved")).where(H.c.status == ACTIVE)
    reserved = reserved.group_by(H.c.wallet_id).subquery()
    query = (
        select(W.c.id, W.c.kind, W.c.balance, sums.c.total, newest.c.balance_snapshot, W.c.held, reserved.c.reserved)
        .select_from(
            W.outerjoin(sums, sums.c.wallet_id == W.c.id)
            .outerjoin(newest, newest.c.wallet_id == W.c.id)
            .outerjoin(reserved, reserved.c.wallet_id == W.c.id)
        )
        .where(*scope.wallets())
    )
    for wallet_id, kind, balance, total, snapshot, held, active in _stream(conn, query):
        progress.advance()
        if balance != (total or 0):
            report.add(
                CHECKS[1],
                "wallet",
                wallet_id,
                f"wallet {wallet_id}: balance {balance} != credits - debits {total or 0}",
            )
        if snapshot is not None and snapshot != balance:
            report.add(
                CHECKS[2], "wallet", wallet_id, f"wallet {wallet_id}: balance {balance} != newest snapshot {snapshot}"
            )
        if kind != SYSTEM and balance < 0:
            report.add(CHECKS[3], "wallet", wallet_id, f"wallet {wallet_id}: negative balance {balance}")
        _check_held(report, wallet_id, kind, balance, held, active or 0)


def _check_held(report: Report, wallet_id: int, kind: str, balance: int, held: int, active: int) -> None:
    """7-8. Held money: what the active holds reserve (an overdue one too, until it is
    released under the wallet's lock), and part of the balance."""
    if held != active:
        report.add(CHECKS[6], "wallet", wallet_id, f"wallet {wallet_id}: held {held} != active holds {active}")
    if held < 0 or (kind != SYSTEM and held > balance):
        report.add(CHECKS[7], "wallet", wallet_id, f"wallet {wallet_id}: held {held} outside 0..balance {balance}")


def _check_snapshots(conn: Connection, scope: Scope, report: Report, progress: Progress) -> None:
    """5. Each snapshot is the running balance of its wallet (streamed in wallet order:
    one running sum in memory at a time)."""
    query = select(L.c.id, L.c.wallet_id, _signed(), L.c.balance_snapshot).where(*scope.entries())
    current, running = None, 0
    for entry_id, wallet_id, delta, snapshot in _stream(conn, query.order_by(L.c.wallet_id, L.c.id)):
        progress.advance()
        if wallet_id != current:
            current, running = wallet_id, 0
        running += delta
        if snapshot != running:
            report.add(
                CHECKS[4],
                "ledger_entry",
                entry_id,
                f"ledger entry {entry_id}: snapshot {snapshot} != running balance {running}",
            )
            running = snapshot  # report each break once


def _check_currency_sums(conn: Connection, scope: Scope, report: Report) -> None:
    """6. All wallets of a currency sum to zero: over every wallet (of --currency), whatever
    --wallet-ids says."""
    query = select(W.c.currency, func.sum(W.c.balance)).group_by(W.c.currency).order_by(W.c.currency)
    if scope.currency:
        query = query.where(W.c.currency == scope.currency)
    for currency, total in conn.execute(query):
        if total != 0:
            report.add(CHECKS[5], "currency", currency, f"currency {currency}: wallets sum to {total}, not 0")


CHAIN_CHECK = "entry_chain"


def verify_chain(
    engine: Engine,
    *,
    scope: Scope | None = None,
    progress: Progress | None = None,
    published: dict[int, str] | None = None,
) -> Report:
    """`--verify-chain`: recompute every wallet's hash chain (of the scope's wallets) and
    report each break, the first of a wallet first (wallet.chain.verify); with `published`
    heads, also each wallet whose chain no longer holds its published head."""
    scope = scope or Scope()
    progress = progress or Progress(None)
    report = Report(scope=scope, checks=(CHAIN_CHECK,))
    with engine.connect() as conn, conn.begin():  # the heads and the entries from one snapshot
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        _count(conn, scope, report)
        progress.start("chains", report.entries)
        for found in chain.verify(
            conn, entries_where=scope.entries(), wallets_where=scope.wallets(), published=published
        ):
            subject, id_ = (
                ("ledger_entry", found.entry_id) if found.entry_id is not None else ("wallet", found.wallet_id)
            )
            report.add(CHAIN_CHECK, subject, id_, found.message)
        progress.finish()
    return report


def chain_head(engine: Engine) -> dict[str, Any]:
    """`--chain-head`: the digest over every wallet's chain head (wallet.chain.head_digest),
    with the heads it covers."""
    with engine.connect() as conn:
        heads = chain.current_heads(conn)
    return {"chain_head": chain.head_digest(heads), "wallets": len(heads), "heads": [list(h) for h in heads]}


def published_heads(path: str) -> dict[int, str]:
    """The heads of a `--chain-head --json` document, once they are checked to give its
    digest (so they are the ones that were published)."""
    with open(path, encoding="utf-8") as f:
        document = json.load(f)
    heads = [(int(w), str(h)) for w, h in document["heads"]]
    if chain.head_digest(heads) != document["chain_head"]:
        raise ValueError(f"{path}: its heads do not give its chain_head {document['chain_head']}")
    return dict(heads)


def _currency(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z]{3}", value):
        raise argparse.ArgumentTypeError(f"not an ISO 4217 code: {value!r}")
    return value.upper()


def _id_range(value: str) -> tuple[int, int]:
    found = re.fullmatch(r"(\d+)-(\d+)", value)
    if not found or int(found[1]) > int(found[2]):
        raise argparse.ArgumentTypeError(f"not a range LOW-HIGH of ids (LOW <= HIGH): {value!r}")
    return int(found[1]), int(found[2])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="wallet-audit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--database-url", help="default: WALLET_DATABASE_URL (the service's own setting)")
    parser.add_argument("--currency", type=_currency, help="audit this currency only (a complete audit of it)")
    parser.add_argument(
        "--wallet-ids",
        type=_id_range,
        metavar="LOW-HIGH",
        help="per-wallet and per-transaction checks of these wallets",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--verify-chain",
        action="store_true",
        help="recompute every wallet's hash chain instead, naming each entry that no longer matches",
    )
    mode.add_argument(
        "--chain-head",
        action="store_true",
        help="print one digest over every wallet's chain head, to publish (with --json, the heads too)",
    )
    parser.add_argument(
        "--published",
        metavar="FILE",
        help="with --verify-chain: the output of an earlier --chain-head --json; also check every wallet's chain"
        " still holds the head published then",
    )
    parser.add_argument("--json", action="store_true", help="print the report as one JSON document")
    parser.add_argument("--progress", action="store_true", help="show progress on stderr even when it is no terminal")
    args = parser.parse_args(argv)
    from wallet.config import get_settings

    settings = get_settings()
    # No statement timeout: the audit's scans read the whole ledger, for minutes when it is
    # large. It takes no row locks, so the other limits stay the service's.
    limits = SessionLimits.from_settings(settings, statement_timeout_ms=0)
    engine = make_engine(args.database_url or settings.database_url, limits=limits)
    progress = Progress(sys.stderr if args.progress or sys.stderr.isatty() else None)
    scope = Scope(currency=args.currency, wallet_ids=args.wallet_ids)
    if args.chain_head and (args.currency or args.wallet_ids):
        parser.error("--chain-head covers every wallet: no --currency or --wallet-ids")
    if args.published and not args.verify_chain:
        parser.error("--published goes with --verify-chain")
    try:
        published = published_heads(args.published) if args.published else None
    except (OSError, ValueError, KeyError, TypeError) as error:
        parser.error(f"--published: {error}")
    try:
        if args.chain_head:
            head = chain_head(engine)
            print(
                json.dumps(head, indent=2)
                if args.json
                else f"chain head {head['chain_head']} ({head['wallets']} wallets)"
            )
            sys.exit(0)
        if args.verify_chain:
            report = verify_chain(engine, scope=scope, progress=progress, published=published)
        else:
            report = audit(engine, scope=scope, progress=progress)
    finally:
        engine.dispose()
    print(json.dumps(report.as_json(), indent=2) if args.json else report.render())
    sys.exit(1 if report.count else 0)


if __name__ == "__main__":
    main()
