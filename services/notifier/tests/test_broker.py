"""The notifier's broker against a real Redis: Dramatiq's dispatch script (every fetch,
ack, nack, enqueue) runs on the calling thread's own connection, and a connection Redis
closed, or a Redis that lost the script, costs no failed call."""

from __future__ import annotations

import gc
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import dramatiq
import pytest
import redis
from dramatiq.brokers.redis import RedisBroker

from notifier.broker import OnThreadConnection, setup_broker
from notifier.config import Settings
from svckit.messages import QUEUE
from svckit.testing import redis_server


@pytest.fixture
def broker() -> Iterator[RedisBroker]:
    before = dramatiq.get_broker()
    with redis_server() as url:  # its own: the default namespace and queue
        broker = setup_broker(Settings(redis_url=url))
        try:
            yield broker
        finally:
            broker.close()
            dramatiq.set_broker(before)


def message() -> dramatiq.Message[Any]:
    return dramatiq.Message(
        queue_name=QUEUE, actor_name="notifier.send_welcome", args=(), kwargs={"n": uuid.uuid4().hex}, options={}
    )


def received(broker: RedisBroker, count: int) -> list[dramatiq.Message[Any]]:
    """Fetch `count` messages as a worker's consumer does, and acknowledge each."""
    consumer = broker.consume(QUEUE, prefetch=count, timeout=100)
    got: list[dramatiq.Message[Any]] = []
    for _ in range(200):
        proxy = next(consumer)
        if proxy is not None:
            consumer.ack(proxy)
            got.append(proxy._message)
            if len(got) == count:
                break
    consumer.close()
    return got


def test_the_dispatch_script_runs_on_each_threads_own_connection(
    broker: RedisBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert isinstance(broker.scripts["dispatch"], OnThreadConnection)
    sent = [broker.enqueue(message()).message_id]  # loads the scripts (a pooled call each, once per Redis)
    pool = broker.client.connection_pool
    takes = [0]
    original = pool.get_connection

    def counted(*args: Any, **kwargs: Any) -> Any:
        takes[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(pool, "get_connection", counted)

    def enqueue_ten() -> None:
        for _ in range(10):
            sent.append(broker.enqueue(message()).message_id)

    threads = [threading.Thread(target=enqueue_ten) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert takes[0] == 3  # one per thread, not one per call
    got: list[dramatiq.Message[Any]] = []
    consuming = threading.Thread(target=lambda: got.extend(received(broker, 31)))  # as a worker's consumer thread
    consuming.start()
    consuming.join()
    assert sorted(m.message_id for m in got) == sorted(sent)
    assert takes[0] == 4  # and one for the consumer's thread: its fetches and 31 acks
    client = broker.client
    assert client.llen(f"dramatiq:{QUEUE}") == 0
    assert client.hlen(f"dramatiq:{QUEUE}.msgs") == 0  # acknowledged: gone
    assert client.scard(f"dramatiq:__acks__.{broker.broker_id}.{QUEUE}") == 0


def test_a_connection_redis_closed_or_a_lost_script_costs_no_failed_call(broker: RedisBroker) -> None:
    first = broker.enqueue(message())
    admin = redis.Redis(connection_pool=redis.ConnectionPool(**broker.client.connection_pool.connection_kwargs))
    assert int(admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")) >= 1  # a restart
    second = broker.enqueue(message())  # replaced before the call, as the pool does
    admin.script_flush()
    third = broker.enqueue(message())  # loaded, and called once more
    assert [m.message_id for m in received(broker, 3)] == [first.message_id, second.message_id, third.message_id]
    admin.close()


class Interrupted(BaseException):
    """What Dramatiq's time limit raises into a worker thread, wherever it is."""


def test_a_call_interrupted_before_its_answer_never_leaves_it_for_the_next(
    broker: RedisBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = broker.scripts["dispatch"]
    broker.enqueue(message())
    conn = script.scripts._connection()
    real = conn.read_response

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(conn, "read_response", real)
        raise Interrupted()

    monkeypatch.setattr(conn, "read_response", interrupted)
    with pytest.raises(Interrupted):
        broker.enqueue(message())  # written; its answer never read
    third = broker.enqueue(message())
    got = received(broker, 3)
    assert len(got) == 3
    assert got[-1].message_id == third.message_id


def test_a_worker_settles_its_heap_once_booted_and_hands_it_back_at_shutdown(broker: RedisBroker) -> None:
    assert gc.get_freeze_count() == 0
    worker = dramatiq.Worker(broker, worker_threads=1, worker_timeout=100)
    worker.start()
    try:
        assert gc.get_freeze_count() > 0  # what the process built before its boot
    finally:
        worker.stop()
    assert gc.get_freeze_count() == 0
