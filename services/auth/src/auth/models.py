"""Tables of the auth service (SQLModel table classes live here and nowhere else)."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Column, DateTime, String, Text
from sqlalchemy.orm import registry
from sqlmodel import Field, SQLModel

from svckit.db import UTCDateTime
from svckit.outbox import OUTBOX_GRANTS


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(SQLModel, registry=registry()):
    """The auth service's own metadata: its tables never mix with another service's."""


class User(Base, table=True):
    __tablename__ = "users"

    id: int | None = Field(default=None, primary_key=True)
    email: str = Field(max_length=320, unique=True, index=True)
    first_name: str = Field(max_length=100)
    last_name: str = Field(max_length=100)
    password_hash: str = Field(max_length=100)
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(DateTime(timezone=True), nullable=False))


class OutboxMessage(Base, table=True):
    """A message for the notifier, committed with the change it reports (transactional
    outbox); the relay publishes it to Dramatiq and stamps `published_at`."""

    __tablename__ = "outbox"

    id: str = Field(sa_column=Column(String(32), primary_key=True))
    actor_name: str = Field(sa_column=Column(String(60), nullable=False))
    payload: str = Field(sa_column=Column(Text, nullable=False))
    created_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    published_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime(), nullable=True))
    confirmed_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime(), nullable=True))
    # 'sent' or 'dead_lettered' once confirmed (svckit.outbox); null before.
    outcome: str | None = Field(default=None, sa_column=Column(String(16), nullable=True))


# What the service's database role may do (applied by every migration run, see
# svckit.migrate): accounts are created and read, never changed or removed; outbox rows
# are deleted by auth-purge once confirmed.
GRANTS = {
    "users": ("SELECT", "INSERT"),
    "outbox": (*OUTBOX_GRANTS, "DELETE"),
}
