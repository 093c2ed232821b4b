"""The wallet's unit of work: what every use case is handed first.

The database (svckit.aiodb: asyncpg on Postgres, SQLite in process), the idempotency
cache in Redis, how often a lost attempt is run again, the system wallets of each
currency, and where the reads that may lag go (a replica, or the same database).
"""

from __future__ import annotations

from dataclasses import dataclass

from svckit.aiodb import Database
from wallet.domain import SystemWallets
from wallet.idempotency import IdempotencyCache


@dataclass(frozen=True)
class UnitOfWork:
    db: Database
    idempotency: IdempotencyCache
    system_wallets: SystemWallets
    retries: int = 3
    replica: Database | None = None  # WALLET_READ_DATABASE_URL's, when it is set

    @property
    def reads(self) -> Database:
        """The database for reads that may show a replica's lag: history and ledgers. Never
        for a balance, a hold or anything a movement decides on."""
        return self.replica or self.db
