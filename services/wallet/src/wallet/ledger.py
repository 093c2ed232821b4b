"""Double-entry rules, pure (no I/O), so they can be checked exhaustively with hypothesis.

Money always flows from a source wallet to a destination wallet: the source is debited,
the destination credited, by the same amount. A wallet's balance is its credits minus
its debits. Deposits flow from the currency's system wallet (the outside world) and
withdrawals to it, so the balances of all wallets of a currency always sum to zero.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

EntryType = Literal["debit", "credit"]
DEBIT: EntryType = "debit"
CREDIT: EntryType = "credit"


@dataclass(frozen=True)
class Posting:
    wallet_id: int
    entry_type: EntryType
    amount: int


def postings(*, source: int, destination: int, amount: int) -> tuple[Posting, Posting]:
    if amount <= 0:
        raise ValueError("amount must be positive")
    if source == destination:
        raise ValueError("source and destination must differ")
    return Posting(source, DEBIT, amount), Posting(destination, CREDIT, amount)


def signed(posting: Posting) -> int:
    return posting.amount if posting.entry_type == CREDIT else -posting.amount


def apply(balance: int, posting: Posting) -> int:
    """The balance after the posting (its snapshot)."""
    return balance + signed(posting)


def is_balanced(entries: Iterable[Posting]) -> bool:
    entries = list(entries)
    debits = sum(p.amount for p in entries if p.entry_type == DEBIT)
    credits = sum(p.amount for p in entries if p.entry_type == CREDIT)
    return len(entries) >= 2 and debits == credits


def balance_of(entries: Iterable[Posting], wallet_id: int) -> int:
    return sum(signed(p) for p in entries if p.wallet_id == wallet_id)
