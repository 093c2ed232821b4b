"""`wallet-purge`: delete idempotency records and confirmed outbox rows past their ages
(svckit.retention; scheduled by the CronJob wallet-purge).

An idempotency record is kept `WALLET_RETENTION_IDEMPOTENCY_AGE_S` (default two days,
never less than the contract's 24 hours: a smaller setting is refused, and migration 0007's
trigger refuses to delete a younger record whoever asks). Once it is gone, and Redis's copy
has expired too (`WALLET_IDEMPOTENCY_TTL_S`), the key is forgotten: the same key with the
same body runs as a new request, and moves money again.
"""

from __future__ import annotations

import sys

from pydantic import Field, ValidationError, field_validator

from svckit import retention
from wallet.config import Settings
from wallet.models import IdempotencyRecord, OutboxMessage

IDEMPOTENCY = IdempotencyRecord.__table__  # type: ignore[attr-defined]
OUTBOX = OutboxMessage.__table__  # type: ignore[attr-defined]
# The contract: "its outcome is kept for at least 24 hours".
CONTRACT_MIN_AGE_S = 86_400


class PurgeSettings(Settings):
    """The service's settings (WALLET_*) and the one only the purge reads."""

    retention_idempotency_age_s: int = Field(default=2 * 86_400)

    @field_validator("retention_idempotency_age_s")
    @classmethod
    def _at_least_the_contract(cls, value: int) -> int:
        if value < CONTRACT_MIN_AGE_S:
            raise ValueError(
                f"WALLET_RETENTION_IDEMPOTENCY_AGE_S must be at least {CONTRACT_MIN_AGE_S} "
                "(the contract keeps an outcome replayable for 24 hours)"
            )
        return value


def targets(settings: PurgeSettings) -> list[retention.Target]:
    return [
        retention.Target(
            name="idempotency_records",
            table=IDEMPOTENCY,
            time_column="created_at",
            max_age_s=settings.retention_idempotency_age_s,
            # Nothing locks a record (requests insert and read them; the service's role may
            # not UPDATE, hence not lock, them), so there is nothing to skip.
            skip_locked=False,
        ),
        retention.outbox_target(OUTBOX, settings.retention_outbox_age_s),
    ]


def main(argv: list[str] | None = None) -> None:
    try:
        settings = PurgeSettings()
    except ValidationError as exc:
        sys.exit(f"wallet-purge: refused: {exc}")
    retention.purge_main("wallet", settings, targets, argv)


if __name__ == "__main__":
    main()
