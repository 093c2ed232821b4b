"""The Dramatiq broker (Redis) of the notifier, with the request id carried into each job."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import Middleware, Retries, TimeLimit

from notifier.config import Settings, get_settings
from notifier.metrics import register_dead_letters
from notifier.scripts import ThreadScripts
from svckit.heap import settled_heap
from svckit.messages import DEAD_MARKER, SEND_BATCH
from svckit.metrics import serve_metrics
from svckit.redis import redis_client
from svckit.requestid import request_id_var


class RequestIdMiddleware(Middleware):
    """Logs of a job carry the id of the HTTP request that caused it (message option)."""

    def before_process_message(self, broker: Any, message: dramatiq.Message) -> None:  # type: ignore[type-arg]
        request_id_var.set(message.options.get("request_id") or message.message_id)

    def after_process_message(self, broker: Any, message: Any, *, result: Any = None, exception: Any = None) -> None:
        request_id_var.set(None)

    after_skip_message = after_process_message


class DeadLetterMarker(Middleware):
    """Mark dead-lettered emails, so the outbox relays stop waiting for them to be sent."""

    def __init__(self, client: redis.Redis, ttl_ms: int) -> None:
        self.client = client
        self.ttl_ms = ttl_ms

    def after_nack(self, broker: Any, message: dramatiq.Message) -> None:  # type: ignore[type-arg]
        # A batch given up on is no email given up on: the relay publishes what it did not
        # send again (never confirmed), and each email dead-letters on its own if it must.
        if message.actor_name != SEND_BATCH:
            self.client.set(DEAD_MARKER.format(message.message_id), 1, px=self.ttl_ms)


class MetricsServer(Middleware):
    """Each worker process serves its metrics on NOTIFIER_METRICS_PORT (run one process per
    container and scale with replicas, or set PROMETHEUS_MULTIPROC_DIR)."""

    def __init__(self, port: int, client: redis.Redis) -> None:
        self.port = port
        self.client = client

    def after_worker_boot(self, broker: Any, worker: Any) -> None:
        register_dead_letters(self.client)
        serve_metrics(self.port)


class SettledHeap(Middleware):
    """A worker process's heap settled once it has booted (svckit.heap: what it imported
    leaves the garbage collector's view), handed back when it shuts down."""

    def __init__(self) -> None:
        self.heap = ExitStack()

    def after_worker_boot(self, broker: Any, worker: Any) -> None:
        self.heap.enter_context(settled_heap())

    def after_worker_shutdown(self, broker: Any, worker: Any) -> None:
        self.heap.close()


class OnThreadConnection:
    """Dramatiq's dispatch script (each of the broker's fetch, ack, nack, enqueue and
    requeue) run on the calling thread's own connection (notifier.scripts), as the sent
    markers' scripts are: a fetch and an acknowledgement per message, each otherwise a take
    and give back of a pooled connection and redis-py's command layers. A call Redis does
    not answer is raised at once, as before: Dramatiq's consumer reconnects."""

    def __init__(self, script: Any) -> None:
        self.script = script
        self.scripts = ThreadScripts(script.registered_client)

    def __call__(self, keys: Sequence[Any] = (), args: Sequence[Any] = (), client: Any = None) -> Any:
        if client is not None:  # a pipeline's: as redis-py does it
            return self.script(keys=keys, args=args, client=client)
        return self.scripts.run(self.script, keys, args)


def setup_broker(settings: Settings | None = None) -> RedisBroker:
    settings = settings or get_settings()
    broker = RedisBroker(
        # Of Dramatiq's default middleware only what the notifier uses: Retries (backoff,
        # retry_when, then the dead-letter queue) and TimeLimit (a stuck job is
        # interrupted). AgeLimit, Callbacks, Pipelines and ShutdownNotifications serve
        # options no actor here sets, and each cost hook calls on every message.
        middleware=[TimeLimit(), Retries()],
        client=redis_client(settings.redis_url, timeout_s=5.0),
        heartbeat_timeout=settings.heartbeat_timeout_ms,
        dead_message_ttl=settings.dead_message_ttl_ms,
        maintenance_chance=settings.maintenance_chance,
    )
    broker.scripts["dispatch"] = OnThreadConnection(broker.scripts["dispatch"])
    broker.add_middleware(RequestIdMiddleware())
    broker.add_middleware(SettledHeap())
    broker.add_middleware(MetricsServer(settings.metrics_port, broker.client))
    broker.add_middleware(DeadLetterMarker(broker.client, settings.dead_message_ttl_ms))
    dramatiq.set_broker(broker)
    return broker
