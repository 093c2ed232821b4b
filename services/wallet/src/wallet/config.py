from __future__ import annotations

from functools import lru_cache

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from svckit.settings import BaseServiceSettings


class Settings(BaseServiceSettings):
    model_config = SettingsConfigDict(env_prefix="WALLET_", extra="ignore")

    database_url: str = "sqlite:///var/data/wallet.db"
    # Where the read-only calls that may lag (history, a transaction's ledger) are served:
    # a streaming replica of database_url's Postgres. Empty: database_url. Everything that
    # decides whether money moves reads database_url (deploy/SCALING.md).
    read_database_url: str = ""
    # ISO 4217 codes a wallet may hold (comma-separated in WALLET_CURRENCIES).
    currencies: str = "USD,EUR,GBP,NGN,KES,GHS,ZAR,CAD,JPY"
    idempotency_ttl_s: int = 86_400  # stored outcomes are replayable for at least a day
    idempotency_lock_ttl_ms: int = 30_000
    # System wallets (the outside world) per currency: deposits and withdrawals lock one.
    system_wallet_shards: int = Field(default=8, ge=1, le=64)
    # Serialization/deadlock losers are retried this many times before a 503.
    db_retries: int = 3
    # Group commit (wallet.movements): deposits, withdrawals and transfers are booked up to
    # this many to a database transaction (1: each in its own), with this many such
    # transactions in flight per process (more while some wait for a row lock, up to four
    # times as many); a movement waits for the next batch when all of them are busy.
    batch_max_movements: int = Field(default=32, ge=1, le=1000)
    batches_in_flight: int = Field(default=1, ge=1, le=64)
    # GET /transaction/{id}/ledger shows both sides of a transfer, as the contract's example
    # does; the other side's balance_snapshot is then the other wallet's balance. False
    # shows the caller only their own entries.
    ledger_show_counterparty: bool = True
    # GET /wallet/statement answers at most this many lines; a range holding more is a 422
    # (statement_too_large) naming where to cut it, never a silently truncated statement.
    statement_max_lines: int = Field(default=10_000, ge=1, le=100_000)
    # Every this many seconds each replica marks overdue holds expired (0: never; they
    # reserve nothing once past their expiry either way). The contract: within 60 s.
    hold_sweep_interval_s: float = Field(default=15.0, ge=0, le=45)

    @model_validator(mode="after")
    def _batches_leave_connections(self) -> Settings:
        # Each batch in flight holds a pooled connection for its whole transaction; holds,
        # refunds, reads and the retries' record lookups need the others.
        if self.batches_in_flight > self.db_pool_size + self.db_max_overflow:
            raise ValueError(
                f"WALLET_BATCHES_IN_FLIGHT ({self.batches_in_flight}) must be at most the pool's "
                f"WALLET_DB_POOL_SIZE + WALLET_DB_MAX_OVERFLOW ({self.db_pool_size + self.db_max_overflow})"
            )
        return self

    @property
    def currency_set(self) -> frozenset[str]:
        return _currency_set(self.currencies)  # asked on every movement: parsed once per value


@lru_cache(maxsize=8)
def _currency_set(currencies: str) -> frozenset[str]:
    return frozenset(c.strip().upper() for c in currencies.split(",") if c.strip())


@lru_cache
def get_settings() -> Settings:
    return Settings()
