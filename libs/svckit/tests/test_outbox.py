"""The outbox relay on a real SQLite database and a real Redis lease."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
import redis
from sqlalchemy import Engine, select

from svckit.db import make_engine
from svckit.deadletters import list_dead_letters, replay_dead_letters
from svckit.messages import DEAD_MARKER, SENT_MARKER, Receipt, WelcomeEmail, new_email_id
from svckit.outbox import Relay, outbox_row
from svckit.redis import redis_client
from svckit.testing import fresh_database, outbox_table, redis_server

OUTBOX = outbox_table()
metadata = OUTBOX.metadata


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
        assert outcomes(engine) == {sent: "sent", dead: "dead_lettered", lost: None}
        markers.set(SENT_MARKER.format(lost), 1)  # the second attempt got through
        time.sleep(0.3)
        assert relay.reconcile() == 0
        assert published[4:] == []
        assert outcomes(engine)[lost] == "sent"

    def test_a_dead_letter_is_on_record_at_the_first_check(self, engine: Engine, redis_url: str) -> None:
        [dead] = stage(engine, 1)
        relay = self.relay(engine, redis_url, [])
        relay.republish_after_s = 3600  # long before the row would be overdue
        relay.run_once()
        redis_client(redis_url).set(DEAD_MARKER.format(dead), 1)
        relay.reconcile()
        assert outcomes(engine) == {dead: "dead_lettered"}

    def test_sent_wins_over_dead_lettered(self, engine: Engine, redis_url: str) -> None:
        [email] = stage(engine, 1)
        relay = self.relay(engine, redis_url, [])
        relay.run_once()
        markers = redis_client(redis_url)
        markers.set(DEAD_MARKER.format(email), 1)  # one copy gave up, another got through
        markers.set(SENT_MARKER.format(email), 1)
        relay.reconcile()
        assert outcomes(engine) == {email: "sent"}

    def test_a_dead_letter_sent_later_from_the_notifiers_queue_becomes_sent(
        self, engine: Engine, redis_url: str
    ) -> None:
        dead, other = stage(engine, 2)
        relay = self.relay(engine, redis_url, [])
        relay.run_once()
        markers = redis_client(redis_url)
        markers.set(DEAD_MARKER.format(dead), 1)
        markers.set(DEAD_MARKER.format(other), 1)
        relay.reconcile()
        assert outcomes(engine) == {dead: "dead_lettered", other: "dead_lettered"}
        markers.set(SENT_MARKER.format(dead), 1)  # `notifier-dlq replay` delivered it
        relay.reconcile()
        assert outcomes(engine) == {dead: "sent", other: "dead_lettered"}

    def test_the_dead_letter_gauge_counts_dead_lettered_rows(self, engine: Engine, redis_url: str) -> None:
        from prometheus_client import REGISTRY

        ids = stage(engine, 3)
        relay = self.relay(engine, redis_url, [])
        relay.run_once()
        markers = redis_client(redis_url)
        for email_id in ids[:2]:
            markers.set(DEAD_MARKER.format(email_id), 1)
        relay.reconcile()
        relay.measure()
        assert REGISTRY.get_sample_value("outbox_dead_lettered", {"service": relay.name}) == 2


def outbox_row_payload(engine: Engine, email_id: str) -> str:
    with engine.connect() as conn:
        return conn.execute(select(OUTBOX.c.payload).where(OUTBOX.c.id == email_id)).scalar_one()


def outcomes(engine: Engine) -> dict[str, str | None]:
    with engine.connect() as conn:
        return {r.id: r.outcome for r in conn.execute(select(OUTBOX.c.id, OUTBOX.c.outcome))}


class Notifier:
    """What the relay sees of the notifier: its markers, and its dead-letter queue in Redis
    (the layout Dramatiq's RedisBroker gives it; see notifier.dlq)."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self.sent: list[str] = []

    def dead_letter(self, payload: str) -> None:
        message_id = json.loads(payload)["message_id"]
        redis_id = str(uuid4())
        self.redis.zadd("dramatiq:notifications.XQ", {redis_id: time.time() * 1000})
        self.redis.hset("dramatiq:notifications.XQ.msgs", redis_id, payload)
        self.redis.set(DEAD_MARKER.format(message_id), 1)

    def deliver(self, payload: str) -> None:
        """The notifier's dedupe rule: an email whose sent marker exists is dropped."""
        message_id = json.loads(payload)["message_id"]
        if not self.redis.exists(SENT_MARKER.format(message_id)):
            self.sent.append(message_id)
            self.redis.set(SENT_MARKER.format(message_id), 1)

    def queued_dead_letters(self) -> int:
        return int(self.redis.zcard("dramatiq:notifications.XQ"))  # type: ignore[arg-type]


class TestDeadLetters:
    """A dead letter is kept in the database: listed after Redis lost everything, and
    replayed from there, sent once."""

    @pytest.fixture
    def own_redis(self) -> Iterator[redis.Redis]:
        with redis_server() as url:  # its own server: the test flushes it
            client = redis_client(url)
            yield client
            client.close()

    def dead_letters(self, engine: Engine, client: redis.Redis, n: int) -> tuple[list[str], Relay, list[str]]:
        """`n` emails the notifier gave up on, recorded by the relay; returns (ids, relay, published)."""
        ids = stage(engine, n)
        published: list[str] = []
        relay = Relay(
            engine,
            OUTBOX,
            published.append,
            lease=client,
            name=f"d-{uuid4()}",
            markers=client,
            republish_after_s=0.2,
            check_every_s=0,
        )
        assert relay.run_once() == n
        notifier = Notifier(client)
        for payload in published:
            notifier.dead_letter(payload)
        relay.reconcile()
        return ids, relay, published

    def test_a_redis_flush_loses_no_dead_letter(self, engine: Engine, own_redis: redis.Redis) -> None:
        ids, relay, published = self.dead_letters(engine, own_redis, 2)
        own_redis.flushall()
        assert sorted(d.id for d in list_dead_letters(engine, OUTBOX)) == sorted(ids)
        time.sleep(0.3)
        assert relay.reconcile() == 0  # a dead letter is confirmed: not republished behind your back
        assert len(published) == 2
        assert {d.user_id for d in list_dead_letters(engine, OUTBOX)} == {0, 1}

    def test_replay_after_a_flush_publishes_once_and_is_delivered_once(
        self, engine: Engine, own_redis: redis.Redis
    ) -> None:
        (email, kept), relay, published = self.dead_letters(engine, own_redis, 2)
        own_redis.flushall()
        result = replay_dead_letters(engine, OUTBOX, own_redis, {email})
        assert (result.replayed, result.delivered, result.unknown) == ([email], [], [])
        assert [d.id for d in list_dead_letters(engine, OUTBOX)] == [kept]
        assert relay.run_once() == 1
        assert relay.run_once() == 0
        again = [p for p in published[2:] if json.loads(p)["message_id"] == email]
        assert len(again) == 1
        notifier = Notifier(own_redis)
        notifier.deliver(again[0])
        time.sleep(0.3)
        assert relay.reconcile() == 0
        assert outcomes(engine) == {email: "sent", kept: "dead_lettered"}
        # Replaying it once more finds no dead letter; nothing goes out, nothing is sent.
        assert replay_dead_letters(engine, OUTBOX, own_redis, {email}).unknown == [email]
        assert relay.run_once() == 0
        for payload in published[2:]:
            notifier.deliver(payload)
        assert notifier.sent == [email]

    def test_replay_clears_the_dead_marker_and_the_notifiers_copy(self, engine: Engine, own_redis: redis.Redis) -> None:
        (email,), relay, _ = self.dead_letters(engine, own_redis, 1)
        assert Notifier(own_redis).queued_dead_letters() == 1
        assert replay_dead_letters(engine, OUTBOX, own_redis).replayed == [email]
        assert not own_redis.exists(DEAD_MARKER.format(email))
        assert Notifier(own_redis).queued_dead_letters() == 0
        relay.run_once()
        relay.reconcile()  # the new attempt has no outcome yet: the old one is not read again
        assert outcomes(engine) == {email: None}

    def test_replay_of_an_email_delivered_meanwhile_sends_nothing(self, engine: Engine, own_redis: redis.Redis) -> None:
        (email,), relay, _ = self.dead_letters(engine, own_redis, 1)
        own_redis.set(SENT_MARKER.format(email), 1)  # `notifier-dlq replay` got it through
        result = replay_dead_letters(engine, OUTBOX, own_redis, None)
        assert (result.replayed, result.delivered) == ([], [email])
        assert relay.run_once() == 0
        assert outcomes(engine) == {email: "sent"}

    def test_the_command_lists_and_replays(
        self, engine: Engine, own_redis: redis.Redis, capsys: pytest.CaptureFixture[str]
    ) -> None:
        from types import SimpleNamespace

        from svckit.outbox import relay_main

        (email,), _, _ = self.dead_letters(engine, own_redis, 1)
        kwargs = own_redis.connection_pool.connection_kwargs
        settings = SimpleNamespace(
            database_url=engine.url.render_as_string(hide_password=False),
            redis_url=f"redis://{kwargs['host']}:{kwargs['port']}/0",
        )
        with pytest.raises(SystemExit) as listed:
            relay_main("test", settings, OUTBOX, ["dead-letters"])
        out = capsys.readouterr().out
        assert listed.value.code == 0
        assert out.splitlines()[0].startswith(f"{email}\tnotifier.send_welcome\tuser=0\t")
        assert out.splitlines()[-1] == "1 dead-lettered message(s)"
        with pytest.raises(SystemExit) as unknown:
            relay_main("test", settings, OUTBOX, ["dead-letters", "--replay", "nope"])
        assert unknown.value.code == 1
        with pytest.raises(SystemExit) as replayed:
            relay_main("test", settings, OUTBOX, ["dead-letters", "--all"])
        assert replayed.value.code == 0
        assert "replayed 1 message(s)" in capsys.readouterr().out
        assert outcomes(engine) == {email: None}


def test_a_message_without_a_recipient_keeps_the_old_shape_and_one_with_it_carries_it() -> None:
    from svckit.messages import Recipient, dramatiq_payload

    bare = dramatiq_payload(WelcomeEmail(email_id="a", user_id=1), request_id=None)
    assert bare["kwargs"]["message"] == {"email_id": "a", "user_id": 1, "actor": "notifier.send_welcome"}
    who = Recipient(email="j@example.com", first_name="J", last_name="D")
    carried = dramatiq_payload(WelcomeEmail(email_id="b", user_id=1, recipient=who), request_id=None)
    assert carried["kwargs"]["message"]["recipient"] == {"email": "j@example.com", "first_name": "J", "last_name": "D"}
    assert WelcomeEmail.model_validate(carried["kwargs"]["message"]).recipient == who


def consumed(redis_url: str, n: int) -> tuple[Any, list[Any]]:
    """The first `n` messages of the queue, as a worker's consumer reads them (not acked)."""
    from dramatiq.brokers.redis import RedisBroker

    from svckit.messages import QUEUE

    consumer = RedisBroker(client=redis_client(redis_url)).consume(QUEUE, prefetch=100, timeout=100)
    got: list[Any] = []
    for _ in range(200):
        proxy = next(consumer)
        if proxy is not None:
            got.append(proxy)
        if len(got) == n:
            break
    return consumer, got


class TestPipelinedPublishing:
    """The relay's batch goes to Redis in one pipeline, each message as RedisBroker.enqueue
    would have put it: a worker's consumer reads and acknowledges it the same way."""

    def test_a_batch_costs_two_round_trips_and_arrives_as_enqueued(
        self, engine: Engine, redis_url: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:

        from svckit.messages import QUEUE
        from svckit.outbox import Publisher

        client = redis_client(redis_url)
        client.flushdb()
        publisher = Publisher(client, emails_per_message=1)  # each email a message of its own
        relay = Relay(
            engine,
            OUTBOX,
            publisher.publish,
            publish_many=publisher.publish_many,
            lease=None,
            name=f"p-{uuid4()}",
        )
        warm = stage(engine, 1)
        assert relay.run_once() == 1  # the process's one-off lookups (Lua stack size, scripts loaded)
        ids = stage(engine, 50)
        sent = [0]
        original = redis.connection.AbstractConnection.send_packed_command

        def counted(self: object, command: object, check_health: bool = True) -> None:
            sent[0] += 1
            original(self, command, check_health)  # type: ignore[arg-type]

        monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counted)
        assert relay.run_once() == 50
        monkeypatch.undo()
        assert sent[0] <= 2  # the pipeline, and redis-py's SCRIPT EXISTS before it (not 50)

        consumer, got = consumed(redis_url, 51)
        assert [p.message_id for p in got] == warm + ids  # in order, each once
        first = got[0]
        assert first.actor_name == "notifier.send_welcome"
        assert first.kwargs["message"]["email_id"] == warm[0]
        assert len({p.options["redis_message_id"] for p in got}) == 51  # fresh ids, as enqueue gives
        for proxy in got:
            consumer.ack(proxy)
        assert client.hlen(f"dramatiq:{QUEUE}.msgs") == 0  # acknowledged: nothing left behind
        assert client.llen(f"dramatiq:{QUEUE}") == 0

    def test_emails_go_in_batches_of_the_set_size_each_email_once_with_its_own_message(
        self, engine: Engine, redis_url: str
    ) -> None:

        from svckit.messages import SEND_BATCH
        from svckit.outbox import Publisher

        client = redis_client(redis_url)
        client.flushdb()
        publisher = Publisher(client, emails_per_message=10)
        relay = Relay(engine, OUTBOX, publisher.publish, publish_many=publisher.publish_many, lease=None, name="g")
        ids = stage(engine, 21)
        other = dict(json.loads(outbox_row(WelcomeEmail(email_id="x", user_id=1))["payload"]), actor_name="other.actor")
        publisher.publish_many([json.dumps(other)])
        assert relay.run_once() == 21
        consumer, got = consumed(redis_url, 4)
        for proxy in got:
            consumer.ack(proxy)
        assert [p.actor_name for p in got] == ["other.actor", SEND_BATCH, SEND_BATCH, "notifier.send_welcome"]
        first, second = (p.kwargs["messages"] for p in got[1:3])
        assert [m["message_id"] for m in first + second] + [got[3].message_id] == ids  # each once, in order
        assert first[0] == json.loads(outbox_row_payload(engine, ids[0]))  # each as it would go alone
        assert got[1].message_id != got[2].message_id
        assert len({got[1].message_id, got[2].message_id} & set(ids)) == 0  # a batch has an id of its own

    def test_one_email_per_message_publishes_each_alone(self, redis_url: str) -> None:
        from svckit.outbox import Publisher

        client = redis_client(redis_url)
        client.flushdb()
        payloads = [outbox_row(WelcomeEmail(email_id=f"e{i}", user_id=1))["payload"] for i in range(3)]
        Publisher(client, emails_per_message=1).publish_many(payloads)
        assert client.hlen("dramatiq:notifications.msgs") == 3

    def test_the_relay_batches_as_the_setting_says_by_default(self) -> None:
        import inspect

        from svckit.outbox import Publisher, serve
        from svckit.settings import BaseServiceSettings

        setting = BaseServiceSettings.model_fields["outbox_emails_per_message"].default
        assert setting > 1
        for built in (Publisher, serve):
            assert inspect.signature(built).parameters["emails_per_message"].default == setting

    def test_republishing_goes_through_the_batch_too(self, engine: Engine, redis_url: str) -> None:
        batches: list[list[str]] = []
        client = redis_client(redis_url)
        relay = Relay(
            engine,
            OUTBOX,
            lambda p: pytest.fail("published one by one"),
            publish_many=lambda ps: batches.append([json.loads(p)["message_id"] for p in ps]),
            lease=None,
            name=f"q-{uuid4()}",
            markers=client,
            republish_after_s=0.0,
            check_every_s=0,
        )
        ids = stage(engine, 3)
        assert relay.run_once() == 3
        time.sleep(0.01)
        assert relay.reconcile() == 3
        assert batches == [ids, ids]


def test_the_relay_leaves_queue_maintenance_to_the_notifier(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Dramatiq's enqueue runs queue maintenance now and then, with the enqueuing broker's
    settings: from the relay that would drop dead letters after Dramatiq's 7 days, not the
    notifier's 30 (NOTIFIER_DEAD_MESSAGE_TTL_MS). The relay never runs it."""
    import random

    from svckit.messages import QUEUE, WelcomeEmail, new_email_id
    from svckit.outbox import Publisher, outbox_row

    client = redis_client(redis_url)
    client.flushdb()
    eight_days_ms = 8 * 86_400_000
    dead = f"dramatiq:{QUEUE}.XQ"
    client.zadd(dead, {"old-dead-letter": int(time.time() * 1000) - eight_days_ms})
    client.hset(f"{dead}.msgs", "old-dead-letter", "{}")
    monkeypatch.setattr(random, "randint", lambda a, b: a)  # every draw would pick maintenance
    publisher = Publisher(client)
    payload = outbox_row(WelcomeEmail(email_id=new_email_id(), user_id=1))["payload"]
    publisher.publish_many([payload, payload])
    publisher.publish(payload)
    assert client.zscore(dead, "old-dead-letter") is not None
    assert client.hexists(f"{dead}.msgs", "old-dead-letter")


def test_the_loop_goes_on_after_a_full_batch_and_waits_a_little_after_a_part(
    engine: Engine, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backlog is taken batch after batch at once; a partial batch waits gather_s for
    more rows to commit; an empty round waits idle_s."""
    stage(engine, 25)
    published: list[str] = []
    relay = Relay(
        engine, OUTBOX, published.append, lease=redis_client(redis_url), name="gather", batch=10, gather_s=0.03
    )
    rounds: list[tuple[int, float]] = []  # (published so far, the sleep after that round)

    def sleep(seconds: float) -> None:
        rounds.append((len(published), seconds))
        relay.running = len(rounds) < 2

    monkeypatch.setattr("svckit.outbox.time.sleep", sleep)
    relay.loop()
    # 10 and 20 went on at once; after the 5 left: gather_s; then nothing: idle_s.
    assert rounds == [(25, 0.03), (25, relay.idle_s)]
