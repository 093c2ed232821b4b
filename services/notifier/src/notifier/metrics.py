"""The notifier's metrics: Brevo calls by outcome, emails delivered, dead-letter queue size."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import redis
from prometheus_client import REGISTRY, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from svckit.messages import QUEUE

BREVO_CALLS = Counter("notifier_brevo_calls_total", "Calls to Brevo's API by outcome", ["outcome"])
DELIVERED = Counter("notifier_emails_delivered_total", "Emails handed to Brevo or the outbox folder", ["kind"])
DUPLICATES = Counter("notifier_duplicates_dropped_total", "Redelivered emails that were already sent")


class DeadLetterCollector(Collector):
    """Reads the dead-letter queue's size from Redis at scrape time."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily("notifier_dead_letters", "Messages in the dead-letter queue", labels=["queue"])
        with contextlib.suppress(redis.RedisError):  # no sample rather than a wrong one
            gauge.add_metric([QUEUE], float(self.client.zcard(f"dramatiq:{QUEUE}.XQ")))  # type: ignore[arg-type]
        yield gauge


def register_dead_letters(client: redis.Redis) -> None:
    REGISTRY.register(DeadLetterCollector(client))
