"""The Dramatiq broker (Redis) of the notifier, with the request id carried into each job."""

from __future__ import annotations

from typing import Any

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import Middleware

from notifier.config import Settings, get_settings
from svckit.redis import redis_client
from svckit.requestid import request_id_var


class RequestIdMiddleware(Middleware):
    """Logs of a job carry the id of the HTTP request that caused it (message option)."""

    def before_process_message(self, broker: Any, message: dramatiq.Message) -> None:  # type: ignore[type-arg]
        request_id_var.set(message.options.get("request_id") or message.message_id)

    def after_process_message(self, broker: Any, message: Any, *, result: Any = None, exception: Any = None) -> None:
        request_id_var.set(None)

    after_skip_message = after_process_message


def setup_broker(settings: Settings | None = None) -> RedisBroker:
    settings = settings or get_settings()
    broker = RedisBroker(
        client=redis_client(settings.redis_url, timeout_s=5.0),
        heartbeat_timeout=settings.heartbeat_timeout_ms,
        dead_message_ttl=settings.dead_message_ttl_ms,
        maintenance_chance=settings.maintenance_chance,
    )
    broker.add_middleware(RequestIdMiddleware())
    dramatiq.set_broker(broker)
    return broker
