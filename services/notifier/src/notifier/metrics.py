"""The notifier's metrics: Brevo calls by outcome, emails delivered, dead-letter queue size.

Counters are per process; with PROMETHEUS_MULTIPROC_DIR they add up across the worker
processes and their restarts, and the dead-letter gauge is served with them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import redis
from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from svckit.messages import QUEUE
from svckit.metrics import ensure_metrics_dir, register_collector

# With PROMETHEUS_MULTIPROC_DIR, the unlabelled metrics below write their file as they are
# constructed. The image's CMD empties and creates the folder before the workers start;
# this covers a worker started any other way (and `notifier-dlq`), never removing anything.
ensure_metrics_dir()

BREVO_CALLS = Counter("notifier_brevo_calls_total", "Calls to Brevo's API by outcome", ["outcome"])
DELIVERED = Counter("notifier_emails_delivered_total", "Emails handed to Brevo or the outbox folder", ["kind"])
DUPLICATES = Counter("notifier_duplicates_dropped_total", "Redelivered emails that were already sent")
# Of DELIVERED, the emails Brevo already had (its idempotencyKey refused the repeat): a send
# the sent markers did not prevent. DELIVERED minus this is what Brevo accepted anew.
ALREADY_AT_BREVO = Counter(
    "notifier_emails_already_at_brevo_total", "Delivered emails Brevo already had (a repeat it refused)", ["kind"]
)
# From a movement's commit (the receipt's occurred_at) to its delivery: the receipts lag the
# runbook alerts on. Wide buckets: under load and after outages it runs to minutes.
RECEIPT_LAG = Histogram(
    "notifier_receipt_lag_seconds",
    "Seconds from a movement's commit to its receipt being delivered",
    buckets=(0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0),
)


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
    register_collector(DeadLetterCollector(client))
