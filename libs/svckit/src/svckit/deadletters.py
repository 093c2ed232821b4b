"""Dead letters, durably: `<service>-relay dead-letters` reads them from the service's database.

    auth-relay dead-letters                   # list them
    auth-relay dead-letters --replay ID ...   # publish these again
    auth-relay dead-letters --all             # publish every one again

When the notifier gives up on an email (Brevo refused it, or every retry failed) it moves
the message to Dramatiq's dead-letter queue in Redis and sets its "dead" marker; the relay
then records `outcome = 'dead_lettered'` on the outbox row (Relay.reconcile). Redis can
lose its queue; the row stays. A replay makes the row unpublished again, so the relay
publishes it with a fresh retry budget and records the new outcome.

Once, never twice: the notifier's "sent" marker is kept; it exists only if the email was in
fact delivered (by `notifier-dlq replay`, or by another copy of the message), and then the
row is recorded as sent and not replayed. The "dead" marker is removed, so that reconcile
waits for the new attempt's outcome instead of reading the old one; so is the email's copy
in the notifier's dead-letter queue, which would otherwise still be listed (and counted by
`notifier_dead_letters`) after the database replay.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import redis
from sqlalchemy import Engine, Table, select, update

from svckit.db import READ_ONLY, utcnow
from svckit.messages import DEAD_MARKER, QUEUE, SENT_MARKER
from svckit.outbox import DEAD_LETTERED, SENT

CHUNK = 500  # rows per transaction on replay
# Dramatiq's dead-letter queue (RedisBroker, namespace "dramatiq"): a sorted set of Redis
# message ids and a hash of the encoded messages (see notifier.dlq).
_XQ = f"dramatiq:{QUEUE}.XQ"
_XQ_MESSAGES = f"{_XQ}.msgs"


@dataclass(frozen=True)
class DeadLetter:
    id: str
    actor_name: str
    user_id: int | None
    created_at: datetime
    dead_since: datetime


@dataclass
class Replayed:
    replayed: list[str] = field(default_factory=list)
    delivered: list[str] = field(default_factory=list)  # sent after all: recorded as sent, not replayed
    unknown: list[str] = field(default_factory=list)  # asked for, but not dead letters


def list_dead_letters(engine: Engine, table: Table) -> list[DeadLetter]:
    """Every dead-lettered outbox row, oldest dead first."""
    t = table
    with engine.execution_options(**READ_ONLY).connect() as conn:
        rows = conn.execute(
            select(t.c.id, t.c.actor_name, t.c.payload, t.c.created_at, t.c.confirmed_at)
            .where(t.c.outcome == DEAD_LETTERED)
            .order_by(t.c.confirmed_at, t.c.id)
        ).all()
    return [DeadLetter(r.id, r.actor_name, _user_id(r.payload), r.created_at, r.confirmed_at) for r in rows]


def replay_dead_letters(
    engine: Engine, table: Table, client: redis.Redis, ids: Collection[str] | None = None
) -> Replayed:
    """Make the chosen dead letters (all when `ids` is None) unpublished again."""
    t = table
    with engine.execution_options(**READ_ONLY).connect() as conn:
        query = select(t.c.id).where(t.c.outcome == DEAD_LETTERED).order_by(t.c.id)
        if ids is not None:
            query = query.where(t.c.id.in_(list(ids)))
        dead = list(conn.execute(query).scalars())
    result = Replayed(unknown=sorted(set(ids or ()) - set(dead)))
    if not dead:
        return result
    forget_queued_dead_letters(client, set(dead))
    for start in range(0, len(dead), CHUNK):
        _replay_chunk(engine, t, client, dead[start : start + CHUNK], result)
    return result


def _replay_chunk(engine: Engine, t: Table, client: redis.Redis, ids: list[str], result: Replayed) -> None:
    with engine.begin() as conn:
        query = select(t.c.id).where(t.c.id.in_(ids), t.c.outcome == DEAD_LETTERED).order_by(t.c.id)
        if conn.dialect.name == "postgresql":
            query = query.with_for_update()
        locked = list(conn.execute(query).scalars())
        if not locked:
            return
        pipe = client.pipeline()
        for email_id in locked:
            pipe.exists(SENT_MARKER.format(email_id))
        found = pipe.execute()
        delivered = [i for i, sent in zip(locked, found, strict=True) if sent]
        again = [i for i, sent in zip(locked, found, strict=True) if not sent]
        if again:
            # Before the commit: the relay may publish and reconcile the row at once.
            client.delete(*[DEAD_MARKER.format(i) for i in again])
            conn.execute(update(t).where(t.c.id.in_(again)).values(published_at=None, confirmed_at=None, outcome=None))
        if delivered:
            conn.execute(update(t).where(t.c.id.in_(delivered)).values(outcome=SENT, confirmed_at=utcnow()))
    result.replayed += again
    result.delivered += delivered


def forget_queued_dead_letters(client: redis.Redis, email_ids: set[str]) -> None:
    """Remove these emails' copies from the notifier's dead-letter queue (Redis)."""
    gone = []
    for redis_id, raw in client.hscan_iter(_XQ_MESSAGES):
        try:
            message_id = json.loads(raw)["message_id"]
        except (ValueError, KeyError, TypeError):
            continue
        if message_id in email_ids:
            gone.append(redis_id)
    if gone:
        pipe = client.pipeline()
        pipe.zrem(_XQ, *gone)
        pipe.hdel(_XQ_MESSAGES, *gone)
        pipe.execute()


def _user_id(payload: str) -> int | None:
    try:
        return int(json.loads(payload)["kwargs"]["message"]["user_id"])
    except (ValueError, KeyError, TypeError):
        return None


def main(settings: Any, table: Table, *, replay: list[str] | None, replay_all: bool) -> int:
    """`<service>-relay dead-letters [--replay ID ... | --all]`; returns the exit status."""
    from svckit.db import make_engine
    from svckit.redis import redis_client

    engine = make_engine(settings.database_url)
    try:
        if not replay and not replay_all:
            letters = list_dead_letters(engine, table)
            for d in letters:
                print(
                    f"{d.id}\t{d.actor_name}\tuser={d.user_id}\tcreated {d.created_at.isoformat(timespec='seconds')}"
                    f"\tdead since {d.dead_since.isoformat(timespec='seconds')}"
                )
            print(f"{len(letters)} dead-lettered message(s)")
            return 0
        client = redis_client(settings.redis_url, timeout_s=5.0)
        result = replay_dead_letters(engine, table, client, None if replay_all else set(replay or ()))
        print(f"replayed {len(result.replayed)} message(s)")
        if result.delivered:
            print(f"already delivered, recorded as sent: {' '.join(result.delivered)}")
        if result.unknown:
            print(f"not dead letters: {' '.join(result.unknown)}", file=sys.stderr)
        return 1 if result.unknown else 0
    finally:
        engine.dispose()
