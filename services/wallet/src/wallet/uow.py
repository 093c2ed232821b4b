"""The wallet's unit of work: what every use case is handed first.

The database (svckit.aiodb: asyncpg on Postgres, aiosqlite on SQLite), the idempotency
cache in Redis, how often a lost attempt is run again, and the system wallets of each
currency.
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
