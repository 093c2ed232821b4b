"""The transactional outbox relay shared by every producing service.

A service writes a row in its `outbox` table in the same database transaction as the
change the message reports. This relay publishes committed rows to Dramatiq's Redis
broker (by actor name: producers never import notifier code) and then marks them
published. A crash between the two republishes the row later: delivery is at least once,
and the notifier drops duplicates by message id.

Several replicas may run: on Postgres each claims its rows with FOR UPDATE SKIP LOCKED;
on SQLite (one writer anyway) a Redis lease lets only one relay work at a time.

Each row records its outcome (`sent` or `dead_lettered`) from the notifier's markers, so
the database is the durable record of what was given up on: `<service>-relay
dead-letters` lists those rows and replays them (svckit.deadletters).
"""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import signal
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any
from uuid import uuid4

import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.common import current_millis
from prometheus_client import Counter, Gauge
from sqlalchemy import Engine, Table, func, select, update

from svckit import heartbeat
from svckit.db import READ_ONLY, SessionLimits, utcnow
from svckit.messages import (
    DEAD_MARKER,
    QUEUE,
    SEND_RECEIPT,
    SEND_WELCOME,
    SENT_MARKER,
    NotifierMessage,
    batch_payload,
    dramatiq_payload,
)
from svckit.requestid import current_request_id
from svckit.settings import OUTBOX_EMAILS_PER_MESSAGE

log = logging.getLogger("svckit.outbox")

# The outcome column: the notifier's marker for the row's email (see Relay.reconcile).
SENT = "sent"
DEAD_LETTERED = "dead_lettered"
# A dead-lettered email can still be sent from the notifier's own dead-letter queue
# (`notifier-dlq replay`), which keeps messages 30 days (NOTIFIER_DEAD_MESSAGE_TTL_MS):
# for that long the relay looks for a "sent" marker that turns the outcome into `sent`.
DEAD_RECHECK_S = 31 * 24 * 3600.0

# Labelled only: nothing here writes a file into PROMETHEUS_MULTIPROC_DIR at import, so
# serve() can create and clean that folder first. With the folder, a gauge's newest value
# wins over any an earlier relay process (another pid) left there, and has no pid label.
BACKLOG = Gauge("outbox_backlog", "Outbox rows not yet published", ["service"], multiprocess_mode="mostrecent")
OLDEST_AGE = Gauge(
    "outbox_oldest_age_seconds",
    "Age of the oldest unpublished outbox row",
    ["service"],
    multiprocess_mode="mostrecent",
)
PUBLISHED = Counter("outbox_published_total", "Outbox rows published to the queue", ["service"])
DEAD = Gauge(
    "outbox_dead_lettered",
    "Outbox messages the notifier gave up on (dead letters)",
    ["service"],
    multiprocess_mode="mostrecent",
)
REPUBLISHED = Counter(
    "outbox_republished_total", "Rows published again because their delivery was never confirmed", ["service"]
)

# What a producing service's database role needs on its outbox table: rows are staged with
# the change they report; the relay claims them (FOR UPDATE SKIP LOCKED needs UPDATE) and
# stamps published_at and confirmed_at. Nothing deletes its rows.
OUTBOX_GRANTS = ("SELECT", "INSERT", "UPDATE")
# What Publisher.publish_many may group into one Dramatiq message (svckit.messages.SEND_BATCH).
BATCHED = frozenset({SEND_WELCOME, SEND_RECEIPT})


def outbox_row(message: NotifierMessage) -> dict[str, Any]:
    """The values of the outbox row that carries `message` (insert it in your transaction)."""
    return {
        "id": message.email_id,
        "actor_name": message.actor,
        "payload": json.dumps(dramatiq_payload(message, request_id=current_request_id())),
        "created_at": utcnow(),
        "published_at": None,
        "confirmed_at": None,
        "outcome": None,
    }


def stage(session: Any, table: Table, *messages: NotifierMessage) -> None:
    """Write the messages in the caller's transaction: they commit with the change, or not at all."""
    if messages:
        session.execute(table.insert(), [outbox_row(m) for m in messages])


def relay_main(service: str, settings: Any, table: Table, argv: list[str] | None = None) -> None:
    """The body of `<service>-relay`, from the service's settings: without arguments it
    relays; `dead-letters` lists (and with --replay ID... or --all replays) dead letters;
    `alive` is its liveness probe (the services' `<service>-relay` commands answer that one
    before importing this module: svckit.heartbeat)."""
    parser = argparse.ArgumentParser(
        prog=f"{service}-relay",
        description="Publish the outbox to the notifier's queue; `dead-letters` lists or replays what it gave up on.",
    )
    sub = parser.add_subparsers(dest="command")
    dead = sub.add_parser("dead-letters", help="list the outbox messages the notifier gave up on, or replay them")
    which = dead.add_mutually_exclusive_group()
    which.add_argument("--replay", nargs="+", metavar="ID", help="publish these dead letters again")
    which.add_argument("--all", action="store_true", help="publish every dead letter again")
    probe = sub.add_parser("alive", help="exit 0 if the relay loop completed a round within --max-age, else 1")
    heartbeat.add_arguments(probe)
    args = parser.parse_args(argv)
    if args.command == "alive":
        sys.exit(heartbeat.alive(heartbeat.path_for(service, settings.relay_heartbeat_file), args.max_age))
    if args.command == "dead-letters":
        from svckit.deadletters import main as dead_letters_main

        sys.exit(dead_letters_main(settings, table, replay=args.replay, replay_all=args.all))
    serve(
        service=service,
        database_url=settings.database_url,
        redis_url=settings.redis_url,
        table=table,
        log_level=settings.log_level,
        metrics_port=settings.relay_metrics_port,
        republish_after_s=settings.outbox_republish_after_s,
        limits=SessionLimits.from_settings(settings),
        heartbeat_file=heartbeat.path_for(service, settings.relay_heartbeat_file),
        emails_per_message=settings.outbox_emails_per_message,
    )


class Publisher:
    """Enqueue pre-built Dramatiq messages without importing any actor.

    `publish_many` puts up to `emails_per_message` emails in one Dramatiq message
    (svckit.messages.batch_payload): the notifier then fetches, acknowledges and checks its
    markers once per batch instead of once per email, which was most of its CPU per email
    (bench/notifier_cpu.py). The emails of a batch are sent one after another by one worker
    thread, so with a slow mail API a smaller batch spreads a burst over more threads; 1
    publishes each email on its own. The default is the setting's
    (`*_OUTBOX_EMAILS_PER_MESSAGE`: svckit.settings.OUTBOX_EMAILS_PER_MESSAGE).
    """

    def __init__(self, client: redis.Redis, *, emails_per_message: int = OUTBOX_EMAILS_PER_MESSAGE) -> None:
        self.client = client
        self.emails_per_message = max(emails_per_message, 1)
        # No queue maintenance from here: it would apply this broker's defaults (dead letters
        # dropped after 7 days, a 60 s heartbeat timeout), not the notifier's, which runs it.
        self.broker = RedisBroker(client=client, maintenance_chance=0)
        self.broker.declare_queue(QUEUE)

    def publish(self, payload: str) -> None:
        from dramatiq import Message

        self.broker.enqueue(Message(**json.loads(payload)))

    def publish_many(self, payloads: Sequence[str]) -> None:
        """Enqueue a batch in one round trip (a pipeline; redis-py checks the script is
        loaded in one more per batch) instead of one per message.

        Each message goes in exactly as RedisBroker.enqueue puts it (a fresh
        redis_message_id, Dramatiq's own dispatch script and arguments, the enqueue
        hooks), only pipelined. Not a transaction: if Redis fails half way, the exception
        leaves every row of the batch unpublished, and the ones that did get in are
        published again, which the notifier drops as duplicates (sent markers).
        """
        from dramatiq import Message

        if not payloads:
            return
        broker = self.broker
        dispatch = broker.scripts["dispatch"]
        unpack = broker._max_unpack_size()  # fetched once per process, as enqueue does
        pipe = self.client.pipeline(transaction=False)
        messages = []
        for fields in self._grouped([json.loads(payload) for payload in payloads]):
            message = Message(**fields).copy(options={"redis_message_id": str(uuid4())})
            broker.emit_before("enqueue", message, None)
            # RedisBroker._dispatch's arguments (dispatch.lua), then enqueue's own two.
            args = [
                *("enqueue", current_millis(), message.queue_name, broker.broker_id),
                *(broker.heartbeat_timeout, broker.dead_message_ttl, broker._should_do_maintenance("enqueue"), unpack),
                *(message.options["redis_message_id"], message.encode()),
            ]
            dispatch(keys=[broker.namespace], args=args, client=pipe)
            messages.append(message)
        pipe.execute()
        for message in messages:
            broker.emit_after("enqueue", message, None)

    def _grouped(self, decoded: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The messages to enqueue: the emails in batches of up to `emails_per_message`
        (one left over goes alone), anything else as it is."""
        size = self.emails_per_message
        if size == 1:
            return decoded
        emails = [m for m in decoded if m.get("actor_name") in BATCHED]
        out = [m for m in decoded if m.get("actor_name") not in BATCHED]
        for start in range(0, len(emails), size):
            chunk = emails[start : start + size]
            out.append(chunk[0] if len(chunk) == 1 else batch_payload(chunk))
        return out


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
        gather_s: float = 0.05,
        markers: redis.Redis | None = None,
        republish_after_s: float = 60.0,
        check_every_s: float = 5.0,
        heartbeat_file: str | None = None,
        publish_many: Callable[[Sequence[str]], None] | None = None,
    ) -> None:
        self.engine = engine
        self.table = table
        self.publish = publish
        # A batch at once (Publisher.publish_many: one Redis round trip), else one by one.
        self.publish_many = publish_many or self._one_by_one
        self.lease = lease
        self.lease_key = f"outbox:relay:{name}"
        self.token = secrets.token_hex(8)
        self.batch = batch
        self.idle_s = idle_s
        self.gather_s = gather_s
        self.running = True
        self.name = name
        self._measured = 0.0
        self.markers = markers
        self.republish_after_s = republish_after_s
        self.check_every_s = check_every_s
        self._reconciled = float("-inf")
        self._dead_cursor = ""  # where the next dead-letter recheck starts (ids are hex)
        self.heartbeat = heartbeat.Heartbeat(heartbeat_file) if heartbeat_file else None

    def _one_by_one(self, payloads: Sequence[str]) -> None:
        for payload in payloads:
            self.publish(payload)

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
        query = (
            select(t.c.id, t.c.payload)
            .where(t.c.published_at.is_(None))
            .order_by(t.c.created_at, t.c.id)
            .limit(self.batch)
        )
        if self.engine.dialect.name == "postgresql":
            # The rows stay claimed (SKIP LOCKED) while they are published: replicas share the work.
            with self.engine.begin() as conn:
                rows = conn.execute(query.with_for_update(skip_locked=True)).all()
                self.publish_many([payload for _, payload in rows])
                if rows:
                    conn.execute(update(t).where(t.c.id.in_([r.id for r in rows])).values(published_at=utcnow()))
        else:
            # SQLite: the lease makes this the only relay, so the rows are read without the
            # database's write lock and marked in a short write transaction once published:
            # the service's writers never wait on the Redis round trip. A crash between the
            # two publishes them again, as one before COMMIT would: the notifier drops what
            # it has sent (the outbox id).
            with self.engine.execution_options(**READ_ONLY).begin() as conn:
                rows = conn.execute(query).all()
            self.publish_many([payload for _, payload in rows])
            if rows:
                with self.engine.begin() as conn:
                    conn.execute(update(t).where(t.c.id.in_([r.id for r in rows])).values(published_at=utcnow()))
        PUBLISHED.labels(self.name).inc(len(rows))
        return len(rows)

    def reconcile(self) -> int:
        """Record the outcome of published rows, and republish those never confirmed.

        The queue lives in Redis: a flush, a failover, or a crash between append-only syncs
        can lose messages the relay already published. So a published row stays
        unconfirmed until the notifier's "sent" or "dead-lettered" marker for its id shows
        up, and then records which (`outcome`; "sent" wins if both exist); rows still
        unconfirmed `republish_after_s` after publishing go out again. A republished email
        that had in fact been sent is dropped by the notifier (marker) or by Brevo (same
        idempotencyKey). Returns how many rows went out again.
        """
        if self.markers is None or time.monotonic() - self._reconciled < self.check_every_s:
            return 0
        self._reconciled = time.monotonic()
        if not self._has_lease():
            return 0
        t = self.table
        now = utcnow()
        cutoff = now - timedelta(seconds=self.republish_after_s)
        with self.engine.begin() as conn:
            # Every unconfirmed row, not only overdue ones: a dead letter is on record
            # within one check, not `republish_after_s` later.
            query = (
                select(t.c.id, t.c.payload, t.c.published_at)
                .where(t.c.published_at.is_not(None), t.c.confirmed_at.is_(None))
                .order_by(t.c.published_at)
                .limit(self.batch * 5)
            )
            if conn.dialect.name == "postgresql":
                query = query.with_for_update(skip_locked=True)
            rows = conn.execute(query).all()
            pipe = self.markers.pipeline()
            for row in rows:
                pipe.exists(SENT_MARKER.format(row.id))
                pipe.exists(DEAD_MARKER.format(row.id))
            found = pipe.execute() if rows else []
            outcomes: dict[str, list[str]] = {SENT: [], DEAD_LETTERED: []}
            again = []
            for row, sent, dead in zip(rows, found[::2], found[1::2], strict=True):
                if sent or dead:
                    outcomes[SENT if sent else DEAD_LETTERED].append(row.id)
                elif row.published_at < cutoff:
                    again.append(row)
            self.publish_many([row.payload for row in again])
            for outcome, ids in outcomes.items():
                if ids:
                    conn.execute(update(t).where(t.c.id.in_(ids)).values(confirmed_at=now, outcome=outcome))
            if again:
                conn.execute(update(t).where(t.c.id.in_([r.id for r in again])).values(published_at=now))
        if outcomes[DEAD_LETTERED]:
            log.warning(
                "%d outbox messages were dead-lettered (see %s-relay dead-letters)",
                len(outcomes[DEAD_LETTERED]),
                self.name,
            )
        if again:
            REPUBLISHED.labels(self.name).inc(len(again))
            log.warning("republished %d outbox messages whose delivery was never confirmed", len(again))
        self._recheck_dead_letters(self.markers, now)
        return len(again)

    def _recheck_dead_letters(self, markers: redis.Redis, now: datetime) -> None:
        """Turn dead letters that were sent after all (`notifier-dlq replay`, or another copy
        of the message) into `sent`, a batch per call, round the recent ones."""
        t = self.table
        limit = self.batch * 5
        with self.engine.execution_options(**READ_ONLY).connect() as conn:
            ids = list(
                conn.execute(
                    select(t.c.id)
                    .where(
                        t.c.outcome == DEAD_LETTERED,
                        t.c.confirmed_at >= now - timedelta(seconds=DEAD_RECHECK_S),
                        t.c.id > self._dead_cursor,
                    )
                    .order_by(t.c.id)
                    .limit(limit)
                ).scalars()
            )
        self._dead_cursor = ids[-1] if len(ids) == limit else ""
        if not ids:
            return
        pipe = markers.pipeline()
        for email_id in ids:
            pipe.exists(SENT_MARKER.format(email_id))
        sent = [email_id for email_id, found in zip(ids, pipe.execute(), strict=True) if found]
        if sent:
            with self.engine.begin() as conn:
                conn.execute(
                    update(t)
                    .where(t.c.id.in_(sent), t.c.outcome == DEAD_LETTERED)
                    .values(outcome=SENT, confirmed_at=now)
                )
            log.info("%d dead-lettered outbox messages were sent after all", len(sent))

    def measure(self) -> None:
        """Refresh the backlog gauges (at most once a second)."""
        if time.monotonic() - self._measured < 1.0:
            return
        self._measured = time.monotonic()
        t = self.table
        with self.engine.execution_options(**READ_ONLY).connect() as conn:  # no write lock on SQLite
            count, oldest = conn.execute(
                select(func.count(), func.min(t.c.created_at)).where(t.c.published_at.is_(None))
            ).one()
            dead = conn.execute(select(func.count()).where(t.c.outcome == DEAD_LETTERED)).scalar_one()
        BACKLOG.labels(self.name).set(count)
        DEAD.labels(self.name).set(dead)
        age = (utcnow() - oldest).total_seconds() if oldest is not None else 0.0
        OLDEST_AGE.labels(self.name).set(max(age, 0.0))

    def run_forever(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "running", False))
        signal.signal(signal.SIGINT, lambda *_: setattr(self, "running", False))
        self.loop()

    def loop(self) -> None:
        """Rounds until `running` turns false (run_forever: on SIGTERM or SIGINT)."""
        log.info("outbox relay started")
        self.beat()  # this process is alive (a file left by an earlier one may be older)
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
            # A full batch: more are waiting, go on at once. A part of one: the rows come as
            # the service commits them, so let a few more commit (gather_s) and take them
            # together: fewer rounds, each one query, one Redis write and fuller email
            # batches for the notifier. None: idle_s.
            if published < self.batch:
                time.sleep(self.gather_s if published else self.idle_s)
            # After every round, failed ones too: a relay whose database or Redis is down
            # still goes round (and restarting it would not help); a stuck one does not.
            self.beat()
        log.info("outbox relay stopped")

    def beat(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.beat()


def serve(
    *,
    service: str,
    database_url: str,
    redis_url: str,
    table: Table,
    log_level: str = "INFO",
    metrics_port: int = 0,
    republish_after_s: float = 60.0,
    limits: SessionLimits | None = None,
    heartbeat_file: str | None = None,
    emails_per_message: int = OUTBOX_EMAILS_PER_MESSAGE,
) -> None:
    """The body of each producing service's `<service>-relay` command."""
    from svckit.db import make_engine
    from svckit.heap import settled_heap
    from svckit.logging import configure_logging
    from svckit.metrics import prepare_metrics_dir, serve_metrics
    from svckit.redis import redis_client

    configure_logging(f"{service}-relay", log_level)
    # One process: create the folder if missing (Kubernetes sets the variable for every
    # pod) and drop the files an earlier process with this pid left, before any metric
    # of this process writes its own.
    prepare_metrics_dir(sole_writer=True)
    serve_metrics(metrics_port)
    engine = make_engine(database_url, limits=limits)
    client = redis_client(redis_url, timeout_s=2.0)
    publisher = Publisher(client, emails_per_message=emails_per_message)
    relay = Relay(
        engine,
        table,
        publisher.publish,
        publish_many=publisher.publish_many,
        lease=client,
        name=service,
        markers=client,
        republish_after_s=republish_after_s,
        heartbeat_file=heartbeat_file,
    )
    with settled_heap():
        relay.run_forever()
    engine.dispose()
