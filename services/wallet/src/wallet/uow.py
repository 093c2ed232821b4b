"""The wallet's unit of work: what every use case is handed first.

The database (svckit.aiodb: asyncpg on Postgres, SQLite in process), the idempotency
cache in Redis, how often a lost attempt is run again, the system wallets of each
currency, where the reads that may lag go (a replica, or the same database), and the
batcher that books deposits, withdrawals and transfers several to a transaction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from svckit.aiodb import Database
from wallet.domain import SystemWallets
from wallet.idempotency import IdempotencyCache
from wallet.movements import Movements


@dataclass(frozen=True)
class UnitOfWork:
    db: Database
    idempotency: IdempotencyCache
    system_wallets: SystemWallets
    retries: int = 3
    replica: Database | None = None  # WALLET_READ_DATABASE_URL's, when it is set
    movements: Movements = field(default=None)  # type: ignore[assignment]  # None: one with defaults

    def __post_init__(self) -> None:
        if self.movements is None:
            object.__setattr__(self, "movements", Movements(self.db))

    @property
    def reads(self) -> Database:
        """The database for reads that may show a replica's lag: history and ledgers. Never
        for a balance, a hold or anything a movement decides on."""
        return self.replica or self.db
