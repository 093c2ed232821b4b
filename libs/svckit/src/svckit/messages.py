"""The notifier's message contracts: the interface between producers and the notifier.

Producers stage these in their outbox; the relay publishes them to Dramatiq by actor
name, so no producer imports notifier code. The outbox id doubles as the Dramatiq message
id and as Brevo's idempotencyKey: one email, one id, end to end.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

QUEUE = "notifications"
# Redis markers the notifier sets per email id: delivered, or given up on (dead-lettered).
# The outbox relays read them to confirm delivery, and republish what is unconfirmed.
SENT_MARKER = "notifier:sent:{}"
DEAD_MARKER = "notifier:dead:{}"
SEND_WELCOME = "notifier.send_welcome"
SEND_RECEIPT = "notifier.send_receipt"
# Several emails in one Dramatiq message (the relay groups what one round publishes): each
# item is the message the relay would otherwise have published alone (dramatiq_payload).
SEND_BATCH = "notifier.send_batch"


class Recipient(BaseModel):
    """Who gets the email, carried by a producer that knows it (auth at signup): the
    notifier then needs no lookup at the auth service."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    email: str
    first_name: str
    last_name: str


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    email_id: str  # the outbox id: stable across retries and redeliveries
    user_id: int  # the recipient; without `recipient` the notifier looks up the address at auth
    # Optional, and left out of the JSON when absent (dramatiq_payload): a message without
    # it has the shape notifiers before this field read. A notifier that reads it must be
    # deployed before the producers that send it (deploy/README.md).
    recipient: Recipient | None = None


class WelcomeEmail(_Message):
    actor: Literal["notifier.send_welcome"] = SEND_WELCOME


class Receipt(_Message):
    actor: Literal["notifier.send_receipt"] = SEND_RECEIPT
    transaction_id: int
    kind: Literal["deposit", "withdrawal", "transfer_sent", "transfer_received"]
    amount: int
    currency: str
    balance_after: int
    counterparty: str  # a display name, "External Source" or "External Destination"
    occurred_at: datetime


NotifierMessage = WelcomeEmail | Receipt


def new_email_id() -> str:
    return uuid.uuid4().hex


def dramatiq_payload(message: NotifierMessage, *, request_id: str | None) -> dict[str, Any]:
    """The JSON a Dramatiq worker decodes (dramatiq.Message.asdict() shape)."""
    return {
        "queue_name": QUEUE,
        "actor_name": message.actor,
        "args": [],
        "kwargs": {
            "message": message.model_dump(mode="json", exclude={"recipient"} if message.recipient is None else None)
        },
        "options": {"request_id": request_id} if request_id else {},
        "message_id": message.email_id,
    }


def batch_payload(payloads: list[dict[str, Any]]) -> dict[str, Any]:
    """One Dramatiq message carrying several emails' own messages (each a dramatiq_payload).

    Its id is new each time: the emails keep theirs (the outbox ids), which the notifier's
    markers and Brevo's idempotencyKey go by, so a batch published twice sends nothing twice.
    """
    return {
        "queue_name": QUEUE,
        "actor_name": SEND_BATCH,
        "args": [],
        "kwargs": {"messages": payloads},
        "options": {},
        "message_id": uuid.uuid4().hex,
    }
