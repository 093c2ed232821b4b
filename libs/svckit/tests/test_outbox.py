"""The outbox relay on a real SQLite database and a real Redis lease."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from uuid import uuid4

import pytest
from sqlalchemy import Column, Engine, MetaData, String, Table, Text, select

from svckit.db import UTCDateTime, make_engine
from svckit.messages import DEAD_MARKER, SENT_MARKER, Receipt, WelcomeEmail, new_email_id
from svckit.outbox import Relay, outbox_row
from svckit.redis import redis_client
from svckit.testing import fresh_database, redis_server

metadata = MetaData()
OUTBOX = Table(
    "outbox",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("actor_name", String(60), nullable=False),
    Column("payload", Text, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("published_at", UTCDateTime(), nullable=True),
    Column("confirmed_at", UTCDateTime(), nullable=True),
)


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "postgres" and not os.environ.get("TEST_DATABASE_URL"):
        pytest.skip("TEST_DATABASE_URL is not set: no Postgres for the SKIP LOCKED relay")
    with (
        fresh_database("outbox", tmp_path)
        if request.param == "postgres"
        else nullcontext(f"sqlite:///{tmp_path}/outbox.db") as url
    ):
        engine = make_engine(url)
        metadata.create_all(engine)
        yield engine
        engine.dispose()


def stage(engine: Engine, n: int) -> list[str]:
    messages = [WelcomeEmail(email_id=new_email_id(), user_id=i) for i in range(n)]
    with engine.begin() as conn:
        conn.execute(OUTBOX.insert(), [outbox_row(m) for m in messages])
    return [m.email_id for m in messages]


def test_publishes_committed_rows_once_in_order(engine: Engine, redis_url: str) -> None:
    ids = stage(engine, 3)
    published: list[str] = []
    relay = Relay(engine, OUTBOX, published.append, lease=redis_client(redis_url), name="t1")
    assert relay.run_once() == 3
    assert relay.run_once() == 0
    assert [json.loads(p)["message_id"] for p in published] == ids
    with engine.connect() as conn:
        assert all(conn.execute(select(OUTBOX.c.published_at)).scalars())


def test_a_failed_publish_leaves_the_rows_for_the_next_round(engine: Engine, redis_url: str) -> None:
    stage(engine, 2)

    def broken(_: str) -> None:
        raise ConnectionError("Redis is down")

    with pytest.raises(ConnectionError):
        Relay(engine, OUTBOX, broken, lease=redis_client(redis_url), name="t2").run_once()
    published: list[str] = []
    assert Relay(engine, OUTBOX, published.append, lease=redis_client(redis_url), name="t2b").run_once() == 2


def test_concurrent_relays_publish_each_row_once(engine: Engine, redis_url: str) -> None:
    ids = stage(engine, 40)
    published: list[str] = []
    lock = threading.Lock()

    def slow_publish(payload: str) -> None:
        time.sleep(0.01)  # hold the claim while the other relay looks
        with lock:
            published.append(json.loads(payload)["message_id"])

    relays = [Relay(engine, OUTBOX, slow_publish, lease=redis_client(redis_url), name="t4", batch=10) for _ in range(2)]

    def drain(relay: Relay) -> None:
        for _ in range(20):
            relay.run_once()

    threads = [threading.Thread(target=drain, args=(r,)) for r in relays]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(published) == sorted(ids)


def test_on_sqlite_only_the_lease_holder_relays(engine: Engine, redis_url: str) -> None:
    if engine.dialect.name != "sqlite":
        pytest.skip("Postgres relays share the work with SKIP LOCKED instead of a lease")
    stage(engine, 1)
    first = Relay(engine, OUTBOX, lambda _: None, lease=redis_client(redis_url), name="t3")
    second = Relay(engine, OUTBOX, lambda _: None, lease=redis_client(redis_url), name="t3")
    assert first._has_lease()
    assert not second._has_lease()
    assert second.run_once() == 0
    assert first.run_once() == 1


def test_the_payload_is_a_dramatiq_message_with_the_request_id() -> None:
    from datetime import UTC, datetime

    from svckit.requestid import request_id_var

    token = request_id_var.set("req-42")
    try:
        row = outbox_row(
            Receipt(
                email_id="e1",
                user_id=1,
                transaction_id=2,
                kind="deposit",
                amount=5,
                currency="USD",
                balance_after=5,
                counterparty="External Source",
                occurred_at=datetime(2026, 1, 1, tzinfo=UTC),
            )
        )
    finally:
        request_id_var.reset(token)
    payload = json.loads(row["payload"])
    assert payload["actor_name"] == "notifier.send_receipt"
    assert payload["options"] == {"request_id": "req-42"}
    assert payload["message_id"] == row["id"] == "e1"


class TestReconcile:
    """Published rows stay unconfirmed until the notifier's marker shows up; the queue may lose
    them (a Redis flush), so unconfirmed rows go out again."""

    def relay(self, engine: Engine, redis_url: str, published: list[str]) -> Relay:
        client = redis_client(redis_url)
        return Relay(
            engine,
            OUTBOX,
            lambda p: published.append(json.loads(p)["message_id"]),
            lease=client,
            name=f"r-{uuid4()}",
            markers=client,
            republish_after_s=0.2,
            check_every_s=0,
        )

    def test_unconfirmed_rows_go_out_again_and_confirmed_ones_do_not(self, engine: Engine, redis_url: str) -> None:
        sent, lost, dead = stage(engine, 3)
        published: list[str] = []
        relay = self.relay(engine, redis_url, published)
        assert relay.run_once() == 3
        markers = redis_client(redis_url)
        markers.set(SENT_MARKER.format(sent), 1)
        markers.set(DEAD_MARKER.format(dead), 1)
        assert relay.reconcile() == 0  # too early: published less than 0.2 s ago
        time.sleep(0.3)
        assert relay.reconcile() == 1
        assert published[3:] == [lost]
        with engine.connect() as conn:
            confirmed = {r.id for r in conn.execute(select(OUTBOX.c.id).where(OUTBOX.c.confirmed_at.is_not(None)))}
        assert confirmed == {sent, dead}
        markers.set(SENT_MARKER.format(lost), 1)  # the second attempt got through
        time.sleep(0.3)
        assert relay.reconcile() == 0
        assert published[4:] == []
