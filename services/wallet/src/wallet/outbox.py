"""`wallet-relay`: publishes this service's committed outbox rows to the notifier's queue."""

from __future__ import annotations

from sqlmodel import Session

from svckit import outbox
from svckit.messages import NotifierMessage
from wallet.config import get_settings
from wallet.models import OutboxMessage

TABLE = OutboxMessage.__table__  # type: ignore[attr-defined]


def stage(session: Session, *messages: NotifierMessage) -> None:
    """Write the messages in the caller's transaction: they commit with the change, or not at all."""
    if messages:
        session.execute(TABLE.insert(), [outbox.outbox_row(m) for m in messages])


def main() -> None:
    settings = get_settings()
    outbox.serve(
        service="wallet",
        database_url=settings.database_url,
        redis_url=settings.redis_url,
        table=TABLE,
        log_level=settings.log_level,
        metrics_port=settings.relay_metrics_port,
        republish_after_s=settings.outbox_republish_after_s,
    )
