"""The wallet's business metrics (HTTP metrics come from svckit)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

MONEY_MOVED = Counter("wallet_money_moved_minor_units_total", "Money moved, in minor units", ["type", "currency"])
MOVEMENTS = Counter("wallet_movements_total", "Money movement requests by outcome", ["type", "outcome"])
IDEMPOTENCY = Counter(
    "wallet_idempotency_events_total",
    "Idempotency keys answered from storage or refused",
    ["event"],  # replay | in_progress | reused
)
BATCH_SIZE = Histogram(
    "wallet_movement_batch_size",
    "Movements per group-commit transaction (wallet.movements)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
BATCH_FAILURES = Counter(
    "wallet_movement_batch_failures_total",
    "Group-commit transactions that did not commit, by reason",
    ["reason"],  # no_connection (each answered 503) | commit (each looks up its record) | other
)
QUEUE_TIMEOUTS = Counter(
    "wallet_movement_queue_timeouts_total",
    "Movements answered 503 after waiting the lock timeout for their batch to start",
)
