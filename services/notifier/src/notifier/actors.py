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
from collections.abc import Iterable, Iterator
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
from svckit.messages import QUEUE, SEND_BATCH, SEND_RECEIPT, SEND_WELCOME, NotifierMessage, Receipt, WelcomeEmail
from svckit.redis import redis_client
from svckit.requestid import request_id_var

log = logging.getLogger("notifier.actors")
settings = get_settings()


@dataclass
class Context:
    transport: Transport
    markers: SentMarkers
    auth: httpx.Client | _AuthOnFirstUse


class _AuthOnFirstUse:
    """The auth service's client, built at the first lookup: a worker whose messages all
    carry their recipient never builds one (httpx's transport imports httpcore and h11 as
    it is built: a one-off of as much CPU as a few hundred emails cost)."""

    def __init__(self) -> None:
        self.client: httpx.Client | None = None
        self.lock = threading.Lock()

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        if self.client is None:
            with self.lock:
                if self.client is None:
                    self.client = service_client(
                        settings.auth_url,
                        service_token=settings.service_token.get_secret_value(),
                        timeout_s=settings.http_timeout_s,
                        retries=settings.http_retries,
                    )
        return self.client.get(url, **kwargs)


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
    # A claim outlives one Brevo call (its timeout) by a margin, renewed after each send of a
    # batch for the emails still to send, so a killed worker's claims expire soon after its
    # message is redelivered.
    claim_ms = int(settings.brevo_timeout_s * 1000) + 5_000
    markers = SentMarkers(
        redis_client(settings.redis_url, timeout_s=2.0), ttl_s=settings.sent_marker_ttl_s, claim_ms=claim_ms
    )
    return Context(transport=transport, markers=markers, auth=_AuthOnFirstUse())


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


_BY_KIND: dict[str, tuple[Any, Any]] = {}  # DELIVERED and ALREADY_AT_BREVO of each kind


def _count(email_id: str, outcome: str, kind: str) -> None:
    # Counted before the marker: a worker killed between the two leaves an email that its
    # redelivery sends again (Brevo answers "duplicate") and counts once more, so the counts
    # never miss a delivery (delivered >= sent, delivered - already_at_brevo <= sent).
    counters = _BY_KIND.get(kind)
    if counters is None:  # labels() takes a lock and builds a key per call: once per kind
        counters = _BY_KIND[kind] = (DELIVERED.labels(kind), ALREADY_AT_BREVO.labels(kind))
    counters[0].inc()
    if outcome == "duplicate":
        counters[1].inc()
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


def _email(message: NotifierMessage) -> Email:
    user = carried_or_looked_up(message)
    names = {"to_email": user["email"], "first_name": user["first_name"], "last_name": user["last_name"]}
    if isinstance(message, Receipt):
        return emails.receipt(message, **names)
    return emails.welcome(email_id=message.email_id, **names)


def _lag(receipt: Receipt) -> None:
    RECEIPT_LAG.observe(max((datetime.now(UTC) - receipt.occurred_at).total_seconds(), 0.0))


def deliver(pending: Iterable[tuple[NotifierMessage, dict[str, Any] | None]]) -> None:
    """Send each email unless it was sent already: every actor's one path per email.

    `pending` holds each email's message and, for one of a batch, the message the relay
    would otherwise have published for it alone (None for a message's own email). All are
    checked and claimed in one round trip before the first send, and each is marked sent
    right after its send, by a write that also renews the claims still held and whose
    answer is read with the others when the message is done (SentMarkers): a message
    of one email or of n costs one round trip, a write per email and one read of the
    answers. One that cannot be sent now (another worker holds its claim, or its send failed
    in any way) goes on: a message's own email by raising, for Dramatiq's retry (after a
    known wait, else its backoff; a permanent failure dead-letters it); one of a batch as
    the relay's message for it, which then takes that path (_hand_off). An interruption (a
    time limit raised into the thread) releases the claims of what it did not send.
    """
    ctx = context()
    token = secrets.token_hex(8)
    pending = list(pending)
    # Until the claims are known, every email's claim is released on the way out (if ours).
    held = {message.email_id for message, _ in pending}
    try:
        begun_all = ctx.markers.begin_all(token, [message.email_id for message, _ in pending])
        held = {message.email_id for (message, _), begun in zip(pending, begun_all, strict=True) if begun.token}
        for (message, item), begun in zip(pending, begun_all, strict=True):
            email_id = message.email_id
            if item is not None:  # one of a batch: its own message's request id while it is sent
                request_id_var.set(_request_id(item, email_id))
            if begun.sent:
                DUPLICATES.inc()
                log.info("email %s already sent; duplicate dropped", email_id)
                continue
            if begun.token is None:  # another worker is sending it: try again after its claim
                delay = begun.busy_ms + random.randint(100, 1_000)  # nosec B311
                if item is None:  # one retry, not a string of them
                    raise dramatiq.Retry(f"email {email_id} is being sent by another worker", delay=delay)
                _hand_off(item, delay)
                continue
            ctx.markers.make_good()  # Redis went away: stop here rather than send on unmarked
            try:
                outcome = ctx.transport.send(_email(message))
            except Exception as exc:
                held.discard(email_id)
                ctx.markers.release_soon(token, email_id, still=held)  # before its retry or hand-off begins it
                if item is None:
                    if isinstance(exc, TransientError) and exc.retry_after_ms is not None:  # Brevo's reset
                        raise dramatiq.Retry(str(exc), delay=_delay_after(exc)) from exc
                    raise
                log.warning("email %s of a batch not sent (%s); it goes on alone", email_id, exc)
                _hand_off(item, _delay_after(exc))
                continue
            # Sent: from here on nothing may hand it on or release it unmarked.
            try:
                _count(email_id, outcome, message.kind if isinstance(message, Receipt) else "welcome")
                if isinstance(message, Receipt):
                    _lag(message)
            finally:
                held.discard(email_id)
                ctx.markers.mark_sent(token, email_id, still=held)
    except BaseException:
        try:  # the message's own failure is what Dramatiq must see (a dead letter, Brevo's delay)
            ctx.markers.settle(token, held=sorted(held))
        except Exception:
            log.warning("the markers of a failed message could not be settled", exc_info=True)
        raise
    ctx.markers.settle(token, held=sorted(held))


@dramatiq.actor(actor_name=SEND_WELCOME, **_OPTIONS)
def send_welcome(message: dict[str, Any]) -> None:
    deliver([(_parse(WelcomeEmail, message), None)])


@dramatiq.actor(actor_name=SEND_RECEIPT, **_OPTIONS)
def send_receipt(message: dict[str, Any]) -> None:
    deliver([(_parse(Receipt, message), None)])


@dramatiq.actor(actor_name=SEND_BATCH, **_OPTIONS)
def send_batch(messages: list[dict[str, Any]]) -> None:
    """Several emails in one Dramatiq message (the relay groups what one round publishes):
    one fetch and acknowledgement per batch, one marker round trip per batch and a marker
    written per email (deliver).

    One that cannot be sent now goes on as the message the relay would otherwise have
    published: its own id, retries with backoff and dead letter. A batch interrupted or
    retried sends nothing again that it marked sent (the markers; the one email an
    interruption kept unmarked, Brevo's idempotencyKey refuses); an email it handed on may
    be handed on again by its retry (a permanent failure then lies twice in the dead-letter
    queue; replaying both sends once).
    """
    try:
        ids = [str(item["message_id"]) for item in messages]
    except (KeyError, TypeError) as exc:
        raise PermanentError(f"malformed batch: {type(exc).__name__}") from exc
    deliver(_batched(messages, ids))


_MODELS: dict[Any, type[WelcomeEmail] | type[Receipt]] = {SEND_WELCOME: WelcomeEmail, SEND_RECEIPT: Receipt}


def _batched(messages: list[dict[str, Any]], ids: list[str]) -> Iterator[tuple[NotifierMessage, dict[str, Any]]]:
    """A batch's emails for deliver, each once, in order (deliver sets each one's request
    id while it is sent). One that is malformed goes on alone at once, logged with its own
    message's request id: its own message dead-letters it."""
    seen: set[str] = set()
    for item, email_id in zip(messages, ids, strict=True):
        if email_id in seen:  # twice in this batch
            continue
        seen.add(email_id)
        try:
            model = _MODELS.get(item.get("actor_name"))
            if model is None:
                raise PermanentError(f"no email actor {item.get('actor_name')!r}")
            message: NotifierMessage = _parse(model, (item.get("kwargs") or {}).get("message"))
        except PermanentError as exc:
            request_id_var.set(_request_id(item, email_id))
            log.warning("email %s of a batch not sent (%s); it goes on alone", email_id, exc)
            _hand_off(item, 0)
            continue
        yield message, item


def _request_id(item: dict[str, Any], email_id: str) -> str:
    """The request id of a batch's email: its own message's, else its id."""
    return str((item.get("options") or {}).get("request_id") or email_id)


def _delay_after(exc: Exception) -> int:
    """When an email that could not be sent is tried again: at once for a permanent failure
    (its own message dead-letters it), after Brevo's reset for a 429, else after a backoff."""
    if isinstance(exc, PermanentError):
        return 0
    if isinstance(exc, TransientError) and exc.retry_after_ms is not None:
        # No longer than the longest backoff: a reset of a day is no reason to wait a day.
        return min(exc.retry_after_ms, settings.max_backoff_ms) + random.randint(0, 1_000)  # nosec B311
    return random.randint(settings.min_backoff_ms, 2 * settings.min_backoff_ms)  # nosec B311


def _hand_off(item: dict[str, Any], delay_ms: int) -> None:
    """Enqueue one email of a batch as its own message, with its id (the outbox id)."""
    dramatiq.get_broker().enqueue(dramatiq.Message(**item), delay=delay_ms or None)
