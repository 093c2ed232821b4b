"""The wallet's domain types and the one rule that turns locked wallets into a booking.

Pure: no I/O. The repository reads `Locked` (the wallets of a movement, locked, with the
transaction id and time drawn after the locks) and writes a `Booking`; what goes between
the two, a movement worked out in full, is here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from svckit.messages import Receipt, Recipient, new_email_id
from svckit.outbox import outbox_row
from wallet import chain, ledger
from wallet.ledger import Posting
from wallet.models import OPEN, USER

EXTERNAL_SOURCE = "External Source"
EXTERNAL_DESTINATION = "External Destination"


@dataclass(frozen=True)
class SystemWallets:
    """Each currency's outside world: `shards` system wallets. A user's deposits and
    withdrawals always use the same shard, and different users spread over all of them, so
    they do not queue for one row lock (the audit sums the shards like any wallets)."""

    ids: dict[str, list[int]]

    def for_user(self, currency: str, user_id: int) -> int:
        shards = self.ids[currency]
        return shards[user_id % len(shards)]


@dataclass(frozen=True)
class LockedWallet:
    id: int
    user_id: int | None
    kind: str
    status: str
    currency: str
    balance: int
    owner_name: str
    held: int = 0  # what its active holds reserve (some perhaps overdue: see holds_repository.available)
    chain_head: str | None = None  # the hash of its newest ledger entry (wallet.chain)
    # The receipts' recipient; None on wallets opened before the wallet kept it.
    owner_email: str | None = None
    owner_first_name: str | None = None
    owner_last_name: str | None = None
    updated_at: datetime | None = None  # its last movement's time (or its opening's)

    @property
    def available(self) -> int:
        """What may be spent: the balance less what the active holds reserve (once the
        overdue ones are released, as a movement's batch does first)."""
        return self.balance - self.held

    @property
    def recipient(self) -> Recipient | None:
        if self.owner_email is None or self.owner_first_name is None or self.owner_last_name is None:
            return None
        return Recipient(email=self.owner_email, first_name=self.owner_first_name, last_name=self.owner_last_name)


@dataclass(frozen=True)
class Locked:
    """The wallets a movement locked, and what it drew once they were locked."""

    wallets: dict[int, LockedWallet]
    transaction_id: int  # the id this movement's transaction row will have
    now: datetime  # the movement's time, read once both locks were held

    @property
    def balances(self) -> dict[int, int]:
        return {w.id: w.balance for w in self.wallets.values()}

    @classmethod
    def of(
        cls, wallets: dict[int, LockedWallet], *, user_id: int, other_id: int, transaction_id: int, now: datetime
    ) -> Locked:
        """One movement's share of the wallets locked (perhaps with other movements'): the
        caller's open wallet and the other wallet, with its id, and the time drawn.

        A wallet's entries never go back in time, whatever the clock did (an NTP step, a
        failover to a server whose clock is behind, a movement before this one in the same
        batch): statements, balances at a time and time-filtered history read them in time
        order, so the time is at least a microsecond after each wallet's last movement."""
        mine = {w.id: w for w in wallets.values() if w.id == other_id or (w.user_id == user_id and w.status == OPEN)}
        last = max((w.updated_at for w in mine.values() if w.updated_at is not None), default=None)
        if last is not None and now <= last:
            now = last + timedelta(microseconds=1)
        return cls(wallets=mine, transaction_id=transaction_id, now=now)


@dataclass(frozen=True)
class Party:
    """A side of a movement: its wallet, and its owner (None for the outside world)."""

    wallet_id: int
    user_id: int | None
    name: str
    recipient: Recipient | None = None  # carried in its receipt (none: the notifier looks it up)

    @classmethod
    def external(cls, wallet_id: int, name: str) -> Party:
        return cls(wallet_id, None, name)

    @classmethod
    def of(cls, wallet: LockedWallet) -> Party:
        if wallet.kind != USER:
            return cls(wallet.id, None, wallet.owner_name)
        return cls(wallet.id, wallet.user_id, wallet.owner_name, wallet.recipient)


@dataclass(frozen=True)
class Booking:
    """Every row one money movement writes, worked out in full while the wallets are locked
    (their balances are known, and the transaction id and time are drawn), so that all of
    it goes to the database in one statement just before the commit. The locks are then
    held for one round trip instead of five."""

    transaction_id: int
    type: str
    amount: int
    currency: str
    source: Posting
    destination: Posting
    snapshots: dict[int, int]  # each wallet's balance after the movement
    initiated_by: int
    now: datetime
    outbox: list[dict[str, Any]] = field(default_factory=list)
    # Each wallet's (previous head, new head): its entry's prev_hash and hash (wallet.chain).
    links: dict[int, tuple[str | None, str]] = field(default_factory=dict)

    def transaction_row(self) -> dict[str, Any]:
        return {
            "id": self.transaction_id,
            "type": self.type,
            "amount": self.amount,
            "currency": self.currency,
            "from_wallet_id": self.source.wallet_id,
            "to_wallet_id": self.destination.wallet_id,
            "initiated_by": self.initiated_by,
            "created_at": self.now,
        }

    def entry_rows(self) -> list[dict[str, Any]]:
        return [
            {
                "transaction_id": self.transaction_id,
                "wallet_id": p.wallet_id,
                "entry_type": p.entry_type,
                "amount": p.amount,
                "currency": self.currency,
                "balance_snapshot": self.snapshots[p.wallet_id],
                "created_at": self.now,
                "prev_hash": self.links[p.wallet_id][0],
                "hash": self.links[p.wallet_id][1],
            }
            for p in (self.source, self.destination)
        ]


# (transaction type, is the receipt's owner the source?) -> receipt kind
_RECEIPT_KIND = {
    ("deposit", False): "deposit",
    ("withdrawal", True): "withdrawal",
    ("transfer", True): "transfer_sent",
    ("transfer", False): "transfer_received",
}


def book(
    *, kind: str, source: Party, destination: Party, amount: int, currency: str, locked: Locked, user_id: int
) -> Booking:
    """Work out a movement in full from the `locked` wallets' balances, and the id and time
    drawn once they were locked: the transaction, its balanced ledger entries with their
    snapshots and their hashes (each extends its wallet's chain from the locked head), and a
    receipt in the outbox for each user involved. Nothing is written yet
    (see repository.write_booking)."""
    source_posting, destination_posting = ledger.postings(
        source=source.wallet_id, destination=destination.wallet_id, amount=amount
    )
    if not ledger.is_balanced((source_posting, destination_posting)):  # checked even under python -O
        raise RuntimeError("unbalanced postings")
    balances = locked.balances
    after = {p.wallet_id: ledger.apply(balances[p.wallet_id], p) for p in (source_posting, destination_posting)}
    receipts = [
        Receipt(
            email_id=new_email_id(),
            user_id=me.user_id,
            recipient=me.recipient,
            transaction_id=locked.transaction_id,
            kind=_RECEIPT_KIND[(kind, is_source)],  # type: ignore[arg-type]
            amount=amount,
            currency=currency,
            balance_after=after[me.wallet_id],
            counterparty=other.name,
            occurred_at=locked.now,
        )
        for me, other, is_source in ((source, destination, True), (destination, source, False))
        if me.user_id is not None
    ]
    links: dict[int, tuple[str | None, str]] = {}
    for p in (source_posting, destination_posting):
        prev = locked.wallets[p.wallet_id].chain_head
        links[p.wallet_id] = (
            prev,
            chain.entry_hash(
                wallet_id=p.wallet_id,
                transaction_id=locked.transaction_id,
                entry_type=p.entry_type,
                amount=p.amount,
                currency=currency,
                balance_snapshot=after[p.wallet_id],
                created_at=locked.now,
                prev_hash=prev,
            ),
        )
    return Booking(
        transaction_id=locked.transaction_id,
        type=kind,
        amount=amount,
        currency=currency,
        source=source_posting,
        destination=destination_posting,
        snapshots=after,
        initiated_by=user_id,
        now=locked.now,
        outbox=[outbox_row(r) for r in receipts],
        links=links,
    )
