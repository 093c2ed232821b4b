"""The notifier's dead-letter queue in a real Redis, through Dramatiq's own RedisBroker:
`notifier-dlq` reads it, and a database replay (svckit.deadletters) removes its copies."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import dramatiq
import pytest
from dramatiq.brokers.redis import RedisBroker

from notifier import dlq
from svckit.deadletters import forget_queued_dead_letters
from svckit.messages import QUEUE, WelcomeEmail, dramatiq_payload
from svckit.redis import redis_client


@pytest.fixture
def broker(redis_url: str) -> Iterator[RedisBroker]:
    broker = RedisBroker(client=redis_client(redis_url, timeout_s=5.0))
    broker.declare_queue(QUEUE)
    yield broker
    broker.client.delete(f"dramatiq:{QUEUE}.XQ", f"dramatiq:{QUEUE}.XQ.msgs")
    broker.close()


def dead_letter(broker: RedisBroker) -> str:
    """Enqueue an email the way the relay does, and have a worker give up on it."""
    email_id = uuid.uuid4().hex
    payload = dramatiq_payload(WelcomeEmail(email_id=email_id, user_id=1), request_id=None)
    broker.enqueue(dramatiq.Message(**payload))
    consumer = broker.consume(QUEUE, prefetch=1, timeout=1000)
    for message in consumer:
        if message is not None and message.message_id == email_id:
            consumer.nack(message)
            break
    consumer.close()
    return email_id


def test_a_database_replay_removes_the_notifiers_copy_of_that_email_only(broker: RedisBroker) -> None:
    replayed, kept = dead_letter(broker), dead_letter(broker)
    assert {m.message_id for _, m, _ in dlq.dead_letters(broker.client)} == {replayed, kept}
    forget_queued_dead_letters(broker.client, {replayed})
    assert [m.message_id for _, m, _ in dlq.dead_letters(broker.client)] == [kept]
