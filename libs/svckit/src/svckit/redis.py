"""The one way services make a Redis client: short timeouts and no hidden retry loop.

redis-py retries failed commands with exponential backoff by default, which turns "Redis
is down" into seconds of latency on every request. Our callers treat Redis as a fast
path with a fallback, so a failure must surface at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger("svckit.redis")


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


class AutoPipeline:
    """Commands sent in the same turn of the event loop go to Redis together: one pipeline,
    one write, their answers read in order (what ioredis calls auto-pipelining).

    Under load many requests reach the same command at once (every movement of a committed
    batch stores its answer in the same turn), and each round trip of its own costs a write
    on the socket, a wake-up and a read, on the client and on Redis. Each caller still gets
    its own answer, or its own error (a `redis.ResponseError`, a `NoScriptError`), as if it
    had sent alone; a failure of the connection fails every command of that pipeline with
    it. Not a transaction: the commands are only sent together. At most `max_commands` go in
    one pipeline; the rest go at the same time, in the next ones.

    At most `max_in_flight` sends are on their way at once: the commands that come while
    they are wait for the first of them to be answered, then go together (what a client that
    multiplexes one connection gets by itself). Under load, when requests reach Redis one
    after another in different turns, they share pipelines instead of each paying its own.
    A send on its way for longer than `stalled_s` stops counting (a slow or hung Redis, or
    a saturated loop that has not read the answer yet): a command waits at most about one
    round trip more, and never more than `stalled_s` behind another's. Each pipeline takes a
    pooled connection while it is on its way. One event loop at a time: on another loop (a
    new `asyncio.run`) it starts afresh, forgetting what the closed one left on its way.
    """

    def __init__(
        self, client: redis.asyncio.Redis, *, max_commands: int = 128, max_in_flight: int = 1, stalled_s: float = 0.05
    ) -> None:
        if max_commands < 1 or max_in_flight < 1 or stalled_s <= 0:
            raise ValueError("max_commands, max_in_flight and stalled_s must be positive")
        self.client = client
        self._encode = client.get_encoder().encode  # the pool's settings; built once, not per call
        self.max_commands = max_commands
        self.max_in_flight = max_in_flight
        self.stalled_s = stalled_s
        self._queued: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._scheduled = False
        self._sending: dict[asyncio.Future[Any], float] = {}  # each send on its way, since when (referenced until done)
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def execute(self, *args: Any) -> Any:
        args = (args[0], *map(self._encode, args[1:]))  # a bad argument: its caller's DataError alone
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Any] = loop.create_future()
        self._queued.append((args, answer))
        self._schedule()
        return await answer

    def _schedule(self) -> None:
        """Send at the end of this turn if a send may go now; else look again when the
        oldest one on its way would count as stalled."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # what a closed loop left (its flush, timer, sends) never comes
            self._loop, self._scheduled, self._timer, self._sending = loop, False, None, {}
            self._queued = [(args, answer) for args, answer in self._queued if answer.get_loop() is loop]
        if self._scheduled or not self._queued:
            return
        now = time.monotonic()
        going = [since for since in self._sending.values() if now - since < self.stalled_s]
        if len(going) < self.max_in_flight:
            self._scheduled = True
            loop.call_soon(self._flush)
        elif self._timer is None:
            self._timer = loop.call_later(min(going) + self.stalled_s - now, self._look_again)

    def _look_again(self) -> None:
        self._timer = None
        self._schedule()

    def _flush(self) -> None:
        self._scheduled = False
        # A caller cancelled while it waited sends nothing.
        queued = [(args, answer) for args, answer in self._queued if not answer.done()]
        self._queued = []
        if queued:
            chunks = [queued[i : i + self.max_commands] for i in range(0, len(queued), self.max_commands)]
            task = asyncio.ensure_future(asyncio.gather(*map(self._send, chunks)))
            self._sending[task] = time.monotonic()
            task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Future[Any]) -> None:
        self._sending.pop(task, None)
        failure = None if task.cancelled() else task.exception()
        if failure is not None and not isinstance(failure, asyncio.CancelledError):
            log.error("Redis pipeline send failed unexpectedly: %r", failure)  # its callers have that error
        self._schedule()  # what came meanwhile goes in the next send

    async def _send(self, queued: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for args, _ in queued:
                    pipe.execute_command(*args)
                results = await pipe.execute(raise_on_error=False)
        except Exception as exc:  # noqa: BLE001 - each caller gets it, as if it had sent alone
            for _, answer in queued:
                if not answer.done():
                    answer.set_exception(exc)
            return
        except BaseException:  # cancelled with the loop's shutdown: the callers too
            for _, answer in queued:
                answer.cancel()
            raise
        try:
            for (_, answer), result in zip(queued, results, strict=True):
                if answer.done():  # its caller gave up (cancelled) while it was on the way
                    continue
                if isinstance(result, Exception):
                    answer.set_exception(result)
                else:
                    answer.set_result(result)
        finally:  # whatever went wrong here, no caller is left waiting
            for _, answer in queued:
                if not answer.done():
                    answer.set_exception(redis.RedisError("no answer in the pipeline's results"))
