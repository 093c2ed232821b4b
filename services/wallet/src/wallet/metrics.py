"""The wallet's business metrics (HTTP metrics come from svckit)."""

from __future__ import annotations

from prometheus_client import Counter

MONEY_MOVED = Counter("wallet_money_moved_minor_units_total", "Money moved, in minor units", ["type", "currency"])
MOVEMENTS = Counter("wallet_movements_total", "Money movement requests by outcome", ["type", "outcome"])
IDEMPOTENCY = Counter(
    "wallet_idempotency_events_total",
    "Idempotency keys answered from storage or refused",
    ["event"],  # replay | in_progress | reused
)
