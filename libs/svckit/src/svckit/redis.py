"""The one way services make a Redis client: short timeouts and no hidden retry loop.

redis-py retries failed commands with exponential backoff by default, which turns "Redis
is down" into seconds of latency on every request. Our callers treat Redis as a fast
path with a fallback, so a failure must surface at once.
"""

from __future__ import annotations

import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.retry import Retry


def _settings(timeout_s: float, decode_responses: bool) -> dict[str, object]:
    return {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "decode_responses": decode_responses,
        "health_check_interval": 30,
    }


def redis_client(url: str, *, timeout_s: float = 0.5, decode_responses: bool = False) -> redis.Redis:
    return redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0), **_settings(timeout_s, decode_responses))


def async_redis_client(url: str, *, timeout_s: float = 0.5, decode_responses: bool = False) -> redis.asyncio.Redis:
    """redis_client's twin for the event loop (redis.asyncio), with the same settings."""
    retry = redis.asyncio.retry.Retry(NoBackoff(), 0)
    return redis.asyncio.Redis.from_url(url, retry=retry, **_settings(timeout_s, decode_responses))
