"""Tables of the wallet service (SQLModel table classes live here and nowhere else).

Amounts and balances are BIGINT minor units. Transactions and ledger entries are
append-only: database triggers (see the migrations) refuse UPDATE and DELETE on them,
and on SQLite an INSERT over an existing row (`INSERT OR REPLACE`).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import registry
from sqlmodel import Field, SQLModel

from svckit.db import UTCDateTime, utcnow
from svckit.outbox import OUTBOX_GRANTS


class Base(SQLModel, registry=registry()):
    """The wallet service's own metadata: its tables never mix with another service's."""


USER = "user"
SYSTEM = "system"
OPEN = "open"
CLOSED = "closed"


def _money(nullable: bool = False) -> Column[int]:
    return Column(BigInteger, nullable=nullable)


# Transactions, ledger entries and idempotency records outgrow 32 bits: BIGINT ids on
# Postgres (migration 0005). On SQLite an INTEGER primary key is 64-bit already, and only
# INTEGER (not BIGINT) makes it the rowid that numbers new rows.
LONG_ID = BigInteger().with_variant(Integer(), "sqlite")


def _long_id() -> Column[int]:
    return Column(LONG_ID, primary_key=True)


def _transaction_ref(*, nullable: bool, index: bool = False) -> Column[int]:
    return Column(LONG_ID, ForeignKey("transactions.id"), nullable=nullable, index=index)


def _time() -> Column[datetime]:
    return Column(UTCDateTime(), nullable=False)


class Wallet(Base, table=True):
    __tablename__ = "wallets"
    __table_args__ = (
        # One open wallet per user; per currency, a few system wallets (the outside world,
        # sharded so that deposits and withdrawals do not all wait for one row lock).
        Index(
            "uq_wallets_open_user",
            "user_id",
            unique=True,
            sqlite_where=text("status = 'open'"),
            postgresql_where=text("status = 'open'"),
        ),
        Index(
            "uq_wallets_system_currency_shard",
            "currency",
            "shard",
            unique=True,
            sqlite_where=text("kind = 'system'"),
            postgresql_where=text("kind = 'system'"),
        ),
        CheckConstraint("kind = 'system' OR balance >= 0", name="ck_wallets_user_balance_not_negative"),
        CheckConstraint("kind IN ('user', 'system')", name="ck_wallets_kind"),
        CheckConstraint("status IN ('open', 'closed')", name="ck_wallets_status"),
        CheckConstraint("(kind = 'system') = (user_id IS NULL)", name="ck_wallets_owner"),
        # Held money is part of the balance (migration 0008): a hold reserves no more than
        # is available, and a movement spends no more than is available.
        CheckConstraint("held >= 0 AND (kind = 'system' OR held <= balance)", name="ck_wallets_held"),
    )

    id: int | None = Field(default=None, sa_column=Column(Integer, primary_key=True))
    user_id: int | None = Field(default=None, index=True)
    kind: str = Field(default=USER, sa_column=Column(String(10), nullable=False))
    status: str = Field(default=OPEN, sa_column=Column(String(10), nullable=False))
    currency: str = Field(sa_column=Column(String(3), nullable=False))
    balance: int = Field(default=0, sa_column=_money())
    owner_name: str = Field(sa_column=Column(String(201), nullable=False))
    # What the wallet's active holds reserve (their amounts summed), kept in step with the
    # holds table under the wallet's row lock: available = balance - held.
    held: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, server_default="0"))
    # The receipts' recipient, from auth when the wallet was opened (none on older wallets).
    owner_email: str | None = Field(default=None, sa_column=Column(String(320), nullable=True))
    owner_first_name: str | None = Field(default=None, sa_column=Column(String(100), nullable=True))
    owner_last_name: str | None = Field(default=None, sa_column=Column(String(100), nullable=True))
    # System wallets only: which of the currency's shards of the outside world (0 for users).
    shard: int = Field(default=0, sa_column=Column(Integer, nullable=False, server_default="0"))
    created_at: datetime = Field(default_factory=utcnow, sa_column=_time())
    updated_at: datetime = Field(default_factory=utcnow, sa_column=_time())
    closed_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime(), nullable=True))
    # The hash of the wallet's newest ledger entry (wallet.chain; null before its first).
    chain_head: str | None = Field(default=None, sa_column=Column(String(64), nullable=True))


class Transaction(Base, table=True):
    __tablename__ = "transactions"
    __table_args__ = (
        CheckConstraint("amount > 0", name="ck_transactions_amount_positive"),
        CheckConstraint("type IN ('deposit', 'withdrawal', 'transfer')", name="ck_transactions_type"),
        CheckConstraint("from_wallet_id <> to_wallet_id", name="ck_transactions_distinct_wallets"),
    )

    id: int | None = Field(default=None, sa_column=_long_id())
    type: str = Field(sa_column=Column(String(20), nullable=False))
    amount: int = Field(sa_column=_money())
    currency: str = Field(sa_column=Column(String(3), nullable=False))
    from_wallet_id: int = Field(foreign_key="wallets.id")
    to_wallet_id: int = Field(foreign_key="wallets.id")
    initiated_by: int = Field(description="user id of the caller")
    created_at: datetime = Field(default_factory=utcnow, sa_column=_time())


class LedgerEntry(Base, table=True):
    __tablename__ = "ledger_entries"
    __table_args__ = (
        CheckConstraint("amount > 0", name="ck_ledger_amount_positive"),
        CheckConstraint("entry_type IN ('debit', 'credit')", name="ck_ledger_entry_type"),
        # History and audits read a wallet's entries newest first.
        Index("ix_ledger_wallet_transaction", "wallet_id", "transaction_id"),
        # A wallet's balance at a past time: its newest entry at or before it (0008).
        Index("ix_ledger_wallet_created_at", "wallet_id", "created_at"),
    )

    id: int | None = Field(default=None, sa_column=_long_id())
    transaction_id: int = Field(sa_column=_transaction_ref(nullable=False, index=True))
    wallet_id: int = Field(foreign_key="wallets.id")
    entry_type: str = Field(sa_column=Column(String(6), nullable=False))
    amount: int = Field(sa_column=_money())
    currency: str = Field(sa_column=Column(String(3), nullable=False))
    balance_snapshot: int = Field(sa_column=_money())
    created_at: datetime = Field(default_factory=utcnow, sa_column=_time())
    # The wallet's hash chain (wallet.chain): the previous entry's hash (null for the
    # wallet's first) and this entry's. Null only for an entry written behind the
    # service's back, which `wallet-audit --verify-chain` reports.
    prev_hash: str | None = Field(default=None, sa_column=Column(String(64), nullable=True))
    hash: str | None = Field(default=None, sa_column=Column(String(64), nullable=True))


ACTIVE = "active"
CAPTURED = "captured"
VOIDED = "voided"
EXPIRED = "expired"
HOLD_STATUSES = (ACTIVE, CAPTURED, VOIDED, EXPIRED)


class Hold(Base, table=True):
    """Money reserved on a wallet without moving it (a two-phase payment). No ledger entry:
    only a capture books, as an ordinary transfer (`transaction_id`). A hold changes only
    under its wallet's row lock, with the wallet's `held` (see wallet.service)."""

    __tablename__ = "holds"
    __table_args__ = (
        CheckConstraint("amount > 0", name="ck_holds_amount_positive"),
        CheckConstraint("captured_amount >= 0 AND captured_amount <= amount", name="ck_holds_captured"),
        CheckConstraint("status IN ('active', 'captured', 'voided', 'expired')", name="ck_holds_status"),
        CheckConstraint("(status = 'captured') = (transaction_id IS NOT NULL)", name="ck_holds_capture_transaction"),
        # A user's holds newest first, and a wallet's active ones (release, audit).
        Index("ix_holds_wallet_status", "wallet_id", "status", "id"),
        # The sweeper's scan: only active holds, by expiry.
        Index(
            "ix_holds_active_expires_at",
            "expires_at",
            sqlite_where=text("status = 'active'"),
            postgresql_where=text("status = 'active'"),
        ),
    )

    id: int | None = Field(default=None, sa_column=_long_id())
    wallet_id: int = Field(foreign_key="wallets.id")
    recipient_wallet_id: int | None = Field(default=None, foreign_key="wallets.id")
    amount: int = Field(sa_column=_money())
    captured_amount: int = Field(default=0, sa_column=_money())
    currency: str = Field(sa_column=Column(String(3), nullable=False))
    status: str = Field(default=ACTIVE, sa_column=Column(String(10), nullable=False))
    transaction_id: int | None = Field(default=None, sa_column=_transaction_ref(nullable=True))
    initiated_by: int = Field(description="user id of the caller")
    expires_at: datetime = Field(sa_column=_time())
    created_at: datetime = Field(default_factory=utcnow, sa_column=_time())
    updated_at: datetime = Field(default_factory=utcnow, sa_column=_time())


class Refund(Base, table=True):
    """A transfer that refunds (part of) an earlier transfer: append-only, like the ledger.
    A transfer's refunded total is the sum over its refunds, read under the row locks of
    its two wallets, which every refund of it takes (see wallet.service.refund)."""

    __tablename__ = "refunds"

    transaction_id: int = Field(sa_column=Column(LONG_ID, ForeignKey("transactions.id"), primary_key=True))
    refund_of: int = Field(sa_column=_transaction_ref(nullable=False, index=True))
    amount: int = Field(sa_column=_money())


class IdempotencyRecord(Base, table=True):
    """The database's last word on an idempotency key: at most one outcome per key.

    Written in the same transaction as the money movement it guards (or, for a business
    refusal, on its own), so a movement can never happen twice for one key, whatever
    happened to Redis.
    """

    __tablename__ = "idempotency_records"
    __table_args__ = (
        UniqueConstraint("user_id", "endpoint", "key", name="uq_idempotency_user_endpoint_key"),
        # wallet-purge's cursor (migration 0007).
        Index("ix_idempotency_records_created_at", "created_at", "id"),
    )

    id: int | None = Field(default=None, sa_column=_long_id())
    user_id: int
    endpoint: str = Field(sa_column=Column(String(40), nullable=False))
    key: str = Field(sa_column=Column(String(255), nullable=False))
    fingerprint: str = Field(sa_column=Column(String(64), nullable=False))
    status_code: int
    response_body: str = Field(sa_column=Column(Text, nullable=False))
    transaction_id: int | None = Field(default=None, sa_column=_transaction_ref(nullable=True))
    created_at: datetime = Field(default_factory=utcnow, sa_column=_time())
    # The random token of the request that wrote the record: a request whose connection
    # died at COMMIT, run again, finds its own record and answers as the first answer.
    request_token: str | None = Field(default=None, sa_column=Column(String(32), nullable=True))


class OutboxMessage(Base, table=True):
    """A message for the notifier, committed with the change it reports (transactional
    outbox); the relay publishes it to Dramatiq and stamps `published_at`."""

    __tablename__ = "outbox"

    id: str = Field(sa_column=Column(String(32), primary_key=True))
    actor_name: str = Field(sa_column=Column(String(60), nullable=False))
    payload: str = Field(sa_column=Column(Text, nullable=False))
    created_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    published_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime(), nullable=True))
    confirmed_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime(), nullable=True))
    # 'sent' or 'dead_lettered' once confirmed (svckit.outbox); null before.
    outcome: str | None = Field(default=None, sa_column=Column(String(16), nullable=True))


# What the service's database role may do (applied by every migration run, see
# svckit.migrate): the ledger is SELECT and INSERT only, so history cannot be rewritten
# whatever the triggers; wallets change only the columns movements, holds and closing move
# (never their owner, currency or kind: a wallet cannot be handed to another user by the
# service's role); records are written once and
# deleted by wallet-purge (a trigger refuses it before 24 hours, migration 0007), and so
# are outbox rows once confirmed. The entries' hashes are as append-only as the rest of
# them; `wallets.chain_head` the service moves with every booking (the published digest of
# `wallet-audit --chain-head` is what holds against a rewrite by the tables' owner).
GRANTS = {
    "wallets": ("SELECT", "INSERT", "UPDATE (balance, held, chain_head, status, closed_at, updated_at)"),
    "transactions": ("SELECT", "INSERT"),
    "ledger_entries": ("SELECT", "INSERT"),
    "idempotency_records": ("SELECT", "INSERT", "DELETE"),
    "outbox": (*OUTBOX_GRANTS, "DELETE"),
    # Holds change status (active to captured, voided or expired) and are never deleted;
    # refunds are written once.
    "holds": ("SELECT", "INSERT", "UPDATE (status, captured_amount, recipient_wallet_id, transaction_id, updated_at)"),
    "refunds": ("SELECT", "INSERT"),
}
# The functions it runs: a batch's look-up of its keys' records (migration 0012).
FUNCTIONS = ("idempotency_keys_recorded(bigint[], text[], text[])",)
