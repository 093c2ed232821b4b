"""The notifier's Dramatiq actors (declared here and nowhere else).

Each job: validate the message, skip it if this email was already sent, look the
recipient up at the auth service, render, deliver (Brevo, with the email id as its
idempotencyKey; or the local outbox folder), then mark it sent. Timeouts, 5xx and 429 are
retried with exponential backoff and jitter (429 waits for Brevo's reset); any other
4xx, or an exhausted retry budget, sends the message to the dead-letter queue. A batch
(send_batch) does the same for each of its emails, and hands any it cannot send on as
a message of its own, which then takes that path.
"""

from __future__ import annotations

import logging
import random
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import dramatiq
import httpx
from pydantic import ValidationError

from notifier import emails
from notifier.brevo import BrevoTransport, Email, FolderTransport, PermanentError, TransientError, Transport
from notifier.config import get_settings
from notifier.dedupe import SentMarkers
from notifier.metrics import ALREADY_AT_BREVO, DELIVERED, DUPLICATES, RECEIPT_LAG
from svckit.http import service_client
from svckit.messages import QUEUE, SEND_BATCH, SEND_RECEIPT, SEND_WELCOME, Receipt, WelcomeEmail
from svckit.redis import redis_client
from svckit.requestid import request_id_var

log = logging.getLogger("notifier.actors")
settings = get_settings()


@dataclass
class Context:
    transport: Transport
    markers: SentMarkers
    auth: httpx.Client


_CONTEXT_LOCK = threading.Lock()


def context() -> Context:
    """One per worker process, shared by its threads (the Brevo transport's keep-alive
    connections among them); built on first use, never at import."""
    if _CONTEXT:
        return _CONTEXT[0]
    with _CONTEXT_LOCK:  # the threads' first messages arrive together: build it once
        if not _CONTEXT:
            _CONTEXT.append(_build_context())
    return _CONTEXT[0]


_CONTEXT: list[Context] = []


def _build_context() -> Context:
    if settings.brevo_api_key.get_secret_value():
        transport: Transport = BrevoTransport(
            base_url=settings.brevo_base_url,
            api_key=settings.brevo_api_key.get_secret_value(),
            sender_email=settings.sender_email,
            sender_name=settings.sender_name,
            timeout_s=settings.brevo_timeout_s,
        )
    else:
        transport = FolderTransport(
            settings.outbox_dir, sender_email=settings.sender_email, sender_name=settings.sender_name
        )
    auth = service_client(
        settings.auth_url,
        service_token=settings.service_token.get_secret_value(),
        timeout_s=settings.http_timeout_s,
        retries=settings.http_retries,
    )
    # A claim outlives one Brevo call (its timeout) by a margin, so a killed worker's claim
    # expires soon after its message is redelivered.
    claim_ms = int(settings.brevo_timeout_s * 1000) + 5_000
    markers = SentMarkers(
        redis_client(settings.redis_url, timeout_s=2.0), ttl_s=settings.sent_marker_ttl_s, claim_ms=claim_ms
    )
    return Context(transport=transport, markers=markers, auth=auth)


def should_retry(retries: int, exc: BaseException) -> bool:
    return not isinstance(exc, PermanentError) and retries < settings.max_retries


_RECIPIENTS: dict[int, tuple[float, dict[str, Any]]] = {}
RECIPIENT_TTL_S = 300.0  # names and addresses change rarely; the auth service is spared a call per email
RECIPIENT_CACHE_MAX = 50_000


def recipient(user_id: int) -> dict[str, Any]:
    cached = _RECIPIENTS.get(user_id)
    if cached is not None and cached[0] > time.monotonic():
        return cached[1]
    try:
        response = context().auth.get("/internal/users", params={"ids": user_id})
        response.raise_for_status()
        users = response.json()["users"]
    except (httpx.HTTPError, KeyError, ValueError) as exc:
        raise TransientError(f"user lookup failed: {type(exc).__name__}") from exc
    match = next((u for u in users if u["id"] == user_id), None)
    if match is None:
        raise PermanentError(f"user {user_id} does not exist")
    if len(_RECIPIENTS) >= RECIPIENT_CACHE_MAX:  # bounded: expired entries are never looked at again
        _RECIPIENTS.clear()
    _RECIPIENTS[user_id] = (time.monotonic() + RECIPIENT_TTL_S, dict(match))
    return dict(match)


def carried_or_looked_up(message: WelcomeEmail | Receipt) -> dict[str, Any]:
    """The message's own recipient if it carries one (no call to auth), else the lookup."""
    if message.recipient is not None:
        return message.recipient.model_dump()
    return recipient(message.user_id)


def deliver(email_id: str, build: Callable[[], Email], *, kind: str = "email") -> bool:
    """Send the email unless it was sent already; True when this call delivered it."""
    ctx = context()
    begun = ctx.markers.begin(email_id)  # one round trip: sent already, ours, or another's
    if begun.sent:
        DUPLICATES.inc()
        log.info("email %s already sent; duplicate dropped", email_id)
        return False
    token = begun.token
    if token is None:
        # Another worker is sending it, or was killed while sending: come back when its
        # claim has expired (one retry, not a string of them).
        delay = begun.busy_ms + random.randint(100, 1_000)  # nosec B311
        raise dramatiq.Retry(f"email {email_id} is being sent by another worker", delay=delay)
    try:
        outcome = ctx.transport.send(build())
    except TransientError as exc:
        ctx.markers.release(email_id, token)
        if exc.retry_after_ms is not None:  # Brevo said when its rate limit resets
            raise dramatiq.Retry(str(exc), delay=exc.retry_after_ms + random.randint(0, 1_000)) from exc  # nosec B311
        raise
    except BaseException:
        ctx.markers.release(email_id, token)
        raise
    _count(email_id, outcome, kind)
    ctx.markers.finish(email_id, token)  # one round trip: the sent marker, the claim released
    return True


def _count(email_id: str, outcome: str, kind: str) -> None:
    # Counted before the marker: a worker killed between the two leaves an email that its
    # redelivery sends again (Brevo answers "duplicate") and counts once more, so the counts
    # never miss a delivery (delivered >= sent, delivered - already_at_brevo <= sent).
    DELIVERED.labels(kind).inc()
    if outcome == "duplicate":
        ALREADY_AT_BREVO.labels(kind).inc()
    # DEBUG: a line per routine delivery cost a sixth of the notifier's CPU per email
    # (bench/notifier_cpu.py); deliveries are counted (DELIVERED), failures still logged.
    log.debug("email %s delivered (%s)", email_id, outcome)


def _parse(model: type[WelcomeEmail] | type[Receipt], message: dict[str, Any]) -> Any:
    try:
        return model.model_validate(message)
    except ValidationError as exc:
        raise PermanentError(f"malformed message: {exc.error_count()} errors") from exc


_OPTIONS: dict[str, Any] = {
    "queue_name": QUEUE,
    "max_retries": settings.max_retries,
    "min_backoff": settings.min_backoff_ms,
    "max_backoff": settings.max_backoff_ms,
    "retry_when": should_retry,
}


def _welcome(welcome: WelcomeEmail) -> Email:
    user = carried_or_looked_up(welcome)
    return emails.welcome(
        email_id=welcome.email_id, to_email=user["email"], first_name=user["first_name"], last_name=user["last_name"]
    )


def _receipt(receipt: Receipt) -> Email:
    user = carried_or_looked_up(receipt)
    return emails.receipt(receipt, to_email=user["email"], first_name=user["first_name"], last_name=user["last_name"])


def _lag(receipt: Receipt) -> None:
    RECEIPT_LAG.observe(max((datetime.now(UTC) - receipt.occurred_at).total_seconds(), 0.0))


@dramatiq.actor(actor_name=SEND_WELCOME, **_OPTIONS)
def send_welcome(message: dict[str, Any]) -> None:
    welcome: WelcomeEmail = _parse(WelcomeEmail, message)
    deliver(welcome.email_id, lambda: _welcome(welcome), kind="welcome")


@dramatiq.actor(actor_name=SEND_RECEIPT, **_OPTIONS)
def send_receipt(message: dict[str, Any]) -> None:
    receipt: Receipt = _parse(Receipt, message)
    if deliver(receipt.email_id, lambda: _receipt(receipt), kind=receipt.kind):
        _lag(receipt)


@dramatiq.actor(actor_name=SEND_BATCH, **_OPTIONS)
def send_batch(messages: list[dict[str, Any]]) -> None:
    """Several emails in one Dramatiq message (the relay groups what one round publishes):
    one fetch and acknowledgement per batch, one marker round trip per email.

    Each email is checked and claimed right before its send and marked sent right after
    it (the same round trip as the next one's check), as a message of its own would be. One
    that cannot be sent now (another worker holds its claim, or its send failed in any way)
    goes on as the message the relay would otherwise have published: its own id, retries
    with backoff and dead letter. A batch interrupted or retried sends nothing again that it
    marked sent (the markers; the one email an interruption kept unmarked, Brevo's
    idempotencyKey refuses); an email it handed on may be handed on again by its retry (a
    permanent failure then lies twice in the dead-letter queue; replaying both sends once).
    """
    ctx = context()
    try:
        ids = [str(item["message_id"]) for item in messages]
    except (KeyError, TypeError) as exc:
        raise PermanentError(f"malformed batch: {type(exc).__name__}") from exc
    token = secrets.token_hex(8)
    done: str | None = None  # sent, its marker not yet written
    claimed: str | None = None  # claimed, its send not yet over
    seen: set[str] = set()
    try:
        for item, email_id in zip(messages, ids, strict=True):
            request_id_var.set((item.get("options") or {}).get("request_id") or email_id)
            if email_id in seen:  # twice in this batch
                continue
            seen.add(email_id)
            begun = ctx.markers.step(token, done=done, sent=True, then=email_id)
            done = None
            if begun.sent:
                DUPLICATES.inc()
                log.info("email %s already sent; duplicate dropped", email_id)
            elif begun.token is None:  # another worker is sending it: try again after its claim
                _hand_off(item, begun.busy_ms + random.randint(100, 1_000))  # nosec B311
            else:
                claimed = email_id
                try:
                    email, kind, receipt = _built(item)
                    outcome = ctx.transport.send(email)
                except Exception as exc:  # noqa: BLE001  (any failure: this email goes on alone, the rest are sent)
                    claimed = None
                    ctx.markers.release(email_id, token)
                    log.warning("email %s of a batch not sent (%s); it goes on alone", email_id, exc)
                    _hand_off(item, _delay_after(exc))
                else:
                    # Sent: from here on nothing may hand it on or release it unmarked.
                    done, claimed = email_id, None
                    _count(email_id, outcome, kind)
                    if receipt is not None:
                        _lag(receipt)
    finally:
        if done is not None:
            ctx.markers.finish(done, token)
        elif claimed is not None:  # interrupted during its send
            ctx.markers.release(claimed, token)


def _built(item: dict[str, Any]) -> tuple[Email, str, Receipt | None]:
    """A batch item's email, its kind (the metrics' label) and, for a receipt, the receipt."""
    actor = item.get("actor_name")
    message = (item.get("kwargs") or {}).get("message")
    if actor == SEND_RECEIPT:
        receipt: Receipt = _parse(Receipt, message)
        return _receipt(receipt), receipt.kind, receipt
    if actor == SEND_WELCOME:
        return _welcome(_parse(WelcomeEmail, message)), "welcome", None
    raise PermanentError(f"no email actor {actor!r}")


def _delay_after(exc: Exception) -> int:
    """When an email a batch could not send goes on alone: at once for a permanent failure
    (its own message dead-letters it), after Brevo's reset for a 429, else after a backoff."""
    if isinstance(exc, PermanentError):
        return 0
    if isinstance(exc, TransientError) and exc.retry_after_ms is not None:
        return exc.retry_after_ms + random.randint(0, 1_000)  # nosec B311
    return random.randint(settings.min_backoff_ms, 2 * settings.min_backoff_ms)  # nosec B311


def _hand_off(item: dict[str, Any], delay_ms: int) -> None:
    """Enqueue one email of a batch as its own message, with its id (the outbox id)."""
    dramatiq.get_broker().enqueue(dramatiq.Message(**item), delay=delay_ms or None)
