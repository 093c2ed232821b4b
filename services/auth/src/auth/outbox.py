"""`auth-relay` (entry point auth.relay): publishes this service's committed outbox rows to the
notifier's queue."""

from __future__ import annotations

from sqlmodel import Session

from auth.config import get_settings
from auth.models import OutboxMessage
from svckit import outbox
from svckit.messages import NotifierMessage

TABLE = OutboxMessage.__table__  # type: ignore[attr-defined]


def stage(session: Session, *messages: NotifierMessage) -> None:
    """Stage messages in the caller's transaction (see svckit.outbox.stage)."""
    outbox.stage(session, TABLE, *messages)


def main() -> None:
    outbox.relay_main("auth", get_settings(), TABLE)
