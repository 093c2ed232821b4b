"""`wallet-relay` (entry point wallet.relay): publishes this service's committed outbox rows to the notifier's queue.
(Movements write their outbox rows as part of their booking: see repository.write_booking.)"""

from __future__ import annotations

from svckit import outbox
from wallet.config import get_settings
from wallet.models import OutboxMessage

TABLE = OutboxMessage.__table__  # type: ignore[attr-defined]


def main() -> None:
    outbox.relay_main("wallet", get_settings(), TABLE)
