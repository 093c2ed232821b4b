"""What the ledger's hash chain costs, on SQLite in process (no stack, a few seconds):

- `book()` alone (µs per call: two SHA-256 over the canonical encoding on top);
- a transfer's lock, book and write (`repository.lock_for_movement`, `domain.book`,
  `repository.write_booking`), one transaction each, on a migrated SQLite file;
- `wallet-audit --verify-chain` over a ledger of `--entries` entries, seeded in SQL and
  chained with `wallet.chain.chain_unchained` (the migration's code).

Run it against another checkout's code for a before/after, e.g. main's:
`PYTHONPATH=/work/main/services/wallet/src:/work/main/libs/svckit/src python bench/chain_cost.py`
(the verify part needs wallet.chain and is skipped without it). Figures are noisy on a
shared machine: compare runs taken one after the other.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import tempfile
import time
from pathlib import Path

from sqlalchemy import create_engine, text

import wallet
from svckit.aiodb import make_database, transaction
from svckit.db import make_engine, utcnow
from svckit.testing import alembic
from wallet import repository
from wallet.domain import Locked, LockedWallet, Party, book

INI = Path(wallet.__file__).resolve().parents[2] / "alembic.ini"
HAS_CHAIN = importlib.util.find_spec("wallet.chain") is not None


def bench_book(n: int) -> float:
    wallets = {
        1: LockedWallet(1, 7, "user", "open", "USD", 10**9, "Jane Doe"),
        2: LockedWallet(2, 8, "user", "open", "USD", 0, "John Doe"),
    }
    locked = Locked(wallets=wallets, transaction_id=42, now=utcnow())
    source, destination = Party.of(wallets[1]), Party.of(wallets[2])
    started = time.perf_counter()
    for _ in range(n):
        book(
            kind="transfer", source=source, destination=destination, amount=5, currency="USD", locked=locked, user_id=7
        )
    return (time.perf_counter() - started) / n * 1e6


def _seed_wallets(url: str) -> None:
    with create_engine(url).begin() as conn:
        conn.execute(
            text(
                "INSERT INTO wallets (id, user_id, kind, status, currency, balance, owner_name, shard, created_at,"
                " updated_at) VALUES (1, NULL, 'system', 'open', 'USD', 0, 'External', 0, :t, :t),"
                " (2, 7, 'user', 'open', 'USD', 0, 'Jane Doe', 0, :t, :t),"
                " (3, 8, 'user', 'open', 'USD', 0, 'John Doe', 0, :t, :t)"
            ),
            {"t": "2026-01-01 00:00:00.000000"},
        )


async def bench_transfers(url: str, n: int) -> float:
    db = await make_database(url)
    try:
        for user_id, other in ((7, 1), (8, 1)):  # fund both, from the outside
            async with transaction(db) as conn:
                locked = await repository.lock_for_movement(conn, user_id=user_id, other_id=other)
                me = next(w for w in locked.wallets.values() if w.user_id == user_id)
                booking = book(
                    kind="deposit",
                    source=Party.external(other, "External Source"),
                    destination=Party.of(me),
                    amount=10**9,
                    currency="USD",
                    locked=locked,
                    user_id=user_id,
                )
                await repository.write_booking(conn, booking)
        started = time.perf_counter()
        for i in range(n):
            user_id, other = (7, 3) if i % 2 else (8, 2)
            async with transaction(db) as conn:
                locked = await repository.lock_for_movement(conn, user_id=user_id, other_id=other)
                me = next(w for w in locked.wallets.values() if w.user_id == user_id)
                booking = book(
                    kind="transfer",
                    source=Party.of(me),
                    destination=Party.of(locked.wallets[other]),
                    amount=3,
                    currency="USD",
                    locked=locked,
                    user_id=user_id,
                )
                await repository.write_booking(conn, booking)
        return (time.perf_counter() - started) / n * 1e6
    finally:
        await db.dispose()


def bench_verify(url: str, entries: int) -> tuple[float, float, int]:
    """Seed `entries` entries (1-cent deposits into wallet 2), chain them, verify them."""
    from wallet.audit import verify_chain
    from wallet.chain import chain_unchained

    n = entries // 2
    engine = create_engine(url)
    with engine.begin() as conn:
        first = conn.execute(text("SELECT coalesce(max(id), 0) + 1 FROM transactions")).scalar_one()
        series = "WITH RECURSIVE g(x) AS (SELECT 0 UNION ALL SELECT x + 1 FROM g WHERE x < :n - 1) "
        params = {"first": first, "n": n, "t": "2026-01-02 00:00:00.000000"}
        conn.execute(
            text(
                "INSERT INTO transactions (id, type, amount, currency, from_wallet_id, to_wallet_id, initiated_by,"  # noqa: S608 (constant SQL)
                f" created_at) {series}SELECT :first + x, 'deposit', 1, 'USD', 1, 2, 7, :t FROM g"
            ),
            params,
        )
        sys_balance, user_balance = conn.execute(
            text("SELECT balance FROM wallets WHERE id IN (1, 2) ORDER BY id")
        ).scalars()
        conn.execute(
            text(
                "INSERT INTO ledger_entries (transaction_id, wallet_id, entry_type, amount, currency, balance_snapshot,"  # noqa: S608 (constant SQL)
                f" created_at) {series}SELECT :first + x, w, et, 1, 'USD', snap, :t FROM"
                " (SELECT x, 1 AS w, 'debit' AS et, :sb - x - 1 AS snap FROM g UNION ALL"
                "  SELECT x, 2, 'credit', :ub + x + 1 FROM g) ORDER BY x, et DESC"
            ),
            {**params, "sb": sys_balance, "ub": user_balance},
        )
        conn.execute(text("UPDATE wallets SET balance = balance - :n WHERE id = 1"), params)
        conn.execute(text("UPDATE wallets SET balance = balance + :n WHERE id = 2"), params)
        started = time.perf_counter()
        chain_unchained(conn)
        chained = time.perf_counter() - started
    engine.dispose()
    audit_engine = make_engine(url)
    started = time.perf_counter()
    report = verify_chain(audit_engine)
    verified = time.perf_counter() - started
    audit_engine.dispose()
    if report.count:
        raise SystemExit(f"the seeded ledger does not verify: {report.violations[:3]}")
    return chained, verified, report.entries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--book", type=int, default=20_000, help="book() calls")
    parser.add_argument("--transfers", type=int, default=2_000, help="transfers on SQLite")
    parser.add_argument("--entries", type=int, default=10**6, help="ledger entries to verify (0: skip)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/chain_cost.db"
        alembic(INI, url, "upgrade", "head")
        _seed_wallets(url)
        print(f"code: {Path(wallet.__file__).parent} (hash chain: {'yes' if HAS_CHAIN else 'no'})")
        print(f"book(): {bench_book(args.book):.1f} µs per call")
        print(
            f"transfer (lock, book, write) on SQLite: {asyncio.run(bench_transfers(url, args.transfers)):.0f} µs each"
        )
        if HAS_CHAIN and args.entries:
            chained, verified, entries = bench_verify(url, args.entries)
            print(f"chain_unchained (the migration) over {args.entries} seeded entries: {chained:.1f} s")
            print(f"wallet-audit --verify-chain over {entries} entries: {verified:.1f} s")


if __name__ == "__main__":
    main()
