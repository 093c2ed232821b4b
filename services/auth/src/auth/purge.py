"""`auth-purge`: delete outbox rows the notifier confirmed sent, `AUTH_RETENTION_OUTBOX_AGE_S`
after the confirmation (svckit.retention; scheduled by the CronJob auth-purge). Auth keeps
nothing else that expires: users stay, and login lockouts and rate limits live in Redis
with their own expiry."""

from __future__ import annotations

from auth.config import get_settings
from auth.models import OutboxMessage
from svckit import retention
from svckit.settings import BaseServiceSettings

OUTBOX = OutboxMessage.__table__  # type: ignore[attr-defined]


def targets(settings: BaseServiceSettings) -> list[retention.Target]:
    return [retention.outbox_target(OUTBOX, settings.retention_outbox_age_s)]


def main(argv: list[str] | None = None) -> None:
    retention.purge_main("auth", get_settings(), targets, argv)


if __name__ == "__main__":
    main()
