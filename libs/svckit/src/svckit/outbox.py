"""The transactional outbox relay shared by every producing service.

A service writes a row in its `outbox` table in the same database transaction as the
change the message reports. This relay publishes committed rows to Dramatiq's Redis
broker (by actor name: producers never import notifier code) and then marks them
published. A crash between the two republishes the row later: delivery is at least once,
and the notifier drops duplicates by message id.

Several replicas may run: on Postgres each claims its rows with FOR UPDATE SKIP LOCKED;
on SQLite (one writer anyway) a Redis lease lets only one relay work at a time.
"""

from __future__ import annotations

import json
import logging
import secrets
import signal
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import redis
from dramatiq.brokers.redis import RedisBroker
from prometheus_client import Counter, Gauge
from sqlalchemy import Engine, Table, func, select, update

from svckit.db import utcnow
from svckit.messages import DEAD_MARKER, QUEUE, SENT_MARKER, NotifierMessage, dramatiq_payload
from svckit.requestid import current_request_id

log = logging.getLogger("svckit.outbox")

BACKLOG = Gauge("outbox_backlog", "Outbox rows not yet published", ["service"])
OLDEST_AGE = Gauge("outbox_oldest_age_seconds", "Age of the oldest unpublished outbox row", ["service"])
PUBLISHED = Counter("outbox_published_total", "Outbox rows published to the queue", ["service"])
REPUBLISHED = Counter(
    "outbox_republished_total", "Rows published again because their delivery was never confirmed", ["service"]
)

# What a producing service's database role needs on its outbox table: rows are staged with
# the change they report; the relay claims them (FOR UPDATE SKIP LOCKED needs UPDATE) and
# stamps published_at and confirmed_at. Nothing deletes its rows.
OUTBOX_GRANTS = ("SELECT", "INSERT", "UPDATE")


def outbox_row(message: NotifierMessage) -> dict[str, Any]:
    """The values of the outbox row that carries `message` (insert it in your transaction)."""
    return {
        "id": message.email_id,
        "actor_name": message.actor,
        "payload": json.dumps(dramatiq_payload(message, request_id=current_request_id())),
        "created_at": utcnow(),
        "published_at": None,
        "confirmed_at": None,
    }


def stage(session: Any, table: Table, *messages: NotifierMessage) -> None:
    """Write the messages in the caller's transaction: they commit with the change, or not at all."""
    if messages:
        session.execute(table.insert(), [outbox_row(m) for m in messages])


def relay_main(service: str, settings: Any, table: Table) -> None:
    """The body of `<service>-relay`, from the service's settings."""
    serve(
        service=service,
        database_url=settings.database_url,
        redis_url=settings.redis_url,
        table=table,
        log_level=settings.log_level,
        metrics_port=settings.relay_metrics_port,
        republish_after_s=settings.outbox_republish_after_s,
    )


class Publisher:
    """Enqueue pre-built Dramatiq messages without importing any actor."""

    def __init__(self, client: redis.Redis) -> None:
        self.broker = RedisBroker(client=client)
        self.broker.declare_queue(QUEUE)

    def publish(self, payload: str) -> None:
        from dramatiq import Message

        self.broker.enqueue(Message(**json.loads(payload)))


class Relay:
    def __init__(
        self,
        engine: Engine,
        table: Table,
        publish: Callable[[str], None],
        *,
        lease: redis.Redis | None,
        name: str,
        batch: int = 100,
        idle_s: float = 0.2,
        markers: redis.Redis | None = None,
        republish_after_s: float = 60.0,
        check_every_s: float = 5.0,
    ) -> None:
        self.engine = engine
        self.table = table
        self.publish = publish
        self.lease = lease
        self.lease_key = f"outbox:relay:{name}"
        self.token = secrets.token_hex(8)
        self.batch = batch
        self.idle_s = idle_s
        self.running = True
        self.name = name
        self._measured = 0.0
        self.markers = markers
        self.republish_after_s = republish_after_s
        self.check_every_s = check_every_s
        self._reconciled = float("-inf")

    def _has_lease(self) -> bool:
        if self.engine.dialect.name == "postgresql" or self.lease is None:
            return True  # rows are claimed with SKIP LOCKED instead
        try:
            # Take the lease, or extend it if it is ours already.
            if self.lease.set(self.lease_key, self.token, nx=True, px=10_000):
                return True
            if self.lease.get(self.lease_key) in (self.token, self.token.encode()):
                self.lease.pexpire(self.lease_key, 10_000)
                return True
        except redis.RedisError:
            return False
        return False

    def run_once(self) -> int:
        """Publish one batch; returns how many rows were published."""
        if not self._has_lease():
            return 0
        t = self.table
        with self.engine.begin() as conn:
            query = (
                select(t.c.id, t.c.payload)
                .where(t.c.published_at.is_(None))
                .order_by(t.c.created_at, t.c.id)
                .limit(self.batch)
            )
            if conn.dialect.name == "postgresql":
                query = query.with_for_update(skip_locked=True)
            rows = conn.execute(query).all()
            for _, payload in rows:
                self.publish(payload)
            if rows:
                conn.execute(update(t).where(t.c.id.in_([r.id for r in rows])).values(published_at=utcnow()))
        PUBLISHED.labels(self.name).inc(len(rows))
        return len(rows)

    def reconcile(self) -> int:
        """Confirm or republish rows whose delivery was never confirmed.

        The queue lives in Redis: a flush, a failover, or a crash between append-only syncs
        can lose messages the relay already published. So a published row stays
        unconfirmed until the notifier's "sent" (or "dead-lettered") marker for its id
        shows up; rows still unconfirmed `republish_after_s` after publishing go out again.
        A republished email that had in fact been sent is dropped by the notifier (marker)
        or by Brevo (same idempotencyKey). Returns how many rows went out again.
        """
        if self.markers is None or time.monotonic() - self._reconciled < self.check_every_s:
            return 0
        self._reconciled = time.monotonic()
        if not self._has_lease():
            return 0
        t = self.table
        cutoff = utcnow() - timedelta(seconds=self.republish_after_s)
        with self.engine.begin() as conn:
            query = (
                select(t.c.id, t.c.payload)
                .where(t.c.published_at.is_not(None), t.c.confirmed_at.is_(None), t.c.published_at < cutoff)
                .order_by(t.c.published_at)
                .limit(self.batch * 5)
            )
            if conn.dialect.name == "postgresql":
                query = query.with_for_update(skip_locked=True)
            rows = conn.execute(query).all()
            if not rows:
                return 0
            pipe = self.markers.pipeline()
            for row in rows:
                pipe.exists(SENT_MARKER.format(row.id), DEAD_MARKER.format(row.id))
            done = pipe.execute()
            confirmed = [row.id for row, found in zip(rows, done, strict=True) if found]
            again = [row for row, found in zip(rows, done, strict=True) if not found]
            for row in again:
                self.publish(row.payload)
            now = utcnow()
            if confirmed:
                conn.execute(update(t).where(t.c.id.in_(confirmed)).values(confirmed_at=now))
            if again:
                conn.execute(update(t).where(t.c.id.in_([r.id for r in again])).values(published_at=now))
        if again:
            REPUBLISHED.labels(self.name).inc(len(again))
            log.warning("republished %d outbox messages whose delivery was never confirmed", len(again))
        return len(again)

    def measure(self) -> None:
        """Refresh the backlog gauges (at most once a second)."""
        if time.monotonic() - self._measured < 1.0:
            return
        self._measured = time.monotonic()
        t = self.table
        with self.engine.connect() as conn:
            count, oldest = conn.execute(
                select(func.count(), func.min(t.c.created_at)).where(t.c.published_at.is_(None))
            ).one()
        BACKLOG.labels(self.name).set(count)
        age = (utcnow() - oldest).total_seconds() if oldest is not None else 0.0
        OLDEST_AGE.labels(self.name).set(max(age, 0.0))

    def run_forever(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "running", False))
        signal.signal(signal.SIGINT, lambda *_: setattr(self, "running", False))
        log.info("outbox relay started")
        while self.running:
            try:
                published = self.run_once()
                self.reconcile()
                self.measure()
            except Exception:
                log.exception("outbox relay error")
                published = 0
            if published:
                log.info("published %d outbox messages", published)
            else:
                time.sleep(self.idle_s)
        log.info("outbox relay stopped")


def serve(
    *,
    service: str,
    database_url: str,
    redis_url: str,
    table: Table,
    log_level: str = "INFO",
    metrics_port: int = 0,
    republish_after_s: float = 60.0,
) -> None:
    """The body of each producing service's `<service>-relay` command."""
    from svckit.db import make_engine
    from svckit.logging import configure_logging
    from svckit.metrics import serve_metrics
    from svckit.redis import redis_client

    configure_logging(f"{service}-relay", log_level)
    serve_metrics(metrics_port)
    engine = make_engine(database_url)
    client = redis_client(redis_url, timeout_s=2.0)
    Relay(
        engine,
        table,
        Publisher(client).publish,
        lease=client,
        name=service,
        markers=client,
        republish_after_s=republish_after_s,
    ).run_forever()
    engine.dispose()
