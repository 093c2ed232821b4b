"""svckit.redis.AutoPipeline against a real Redis: one pipeline per turn of the event loop,
each caller its own answer or error, a dead connection failing every caller at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.asyncio

from svckit.redis import AutoPipeline, async_redis_client
from svckit.testing import free_port, redis_server


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


def counting(client: redis.asyncio.Redis) -> list[int]:
    """The number of commands of each pipeline the client sends."""
    sizes: list[int] = []
    make = client.pipeline

    def pipeline(*args: Any, **kwargs: Any) -> Any:
        pipe = make(*args, **kwargs)
        execute = pipe.execute

        async def counted(*a: Any, **k: Any) -> Any:
            sizes.append(len(pipe.command_stack))
            return await execute(*a, **k)

        pipe.execute = counted  # type: ignore[method-assign]
        return pipe

    client.pipeline = pipeline  # type: ignore[method-assign]
    return sizes


def test_commands_of_one_turn_share_a_pipeline_and_keep_their_own_answers(redis_url: str) -> None:
    async def scenario() -> None:
        client = async_redis_client(redis_url)
        sizes = counting(client)
        commands = AutoPipeline(client)
        await client.set("ap:text", "x")
        answers = await asyncio.gather(
            *(commands.execute("INCRBY", "ap:n", i) for i in range(1, 11)),
            commands.execute("INCR", "ap:text"),  # not a number: its own error
            commands.execute("EVALSHA", "0" * 40, 0),  # an unknown script: NoScriptError
            commands.execute("GET", "ap:text"),
            return_exceptions=True,
        )
        assert answers[:10] == [sum(range(1, i + 1)) for i in range(1, 11)]
        assert isinstance(answers[10], redis.ResponseError)
        assert isinstance(answers[11], redis.exceptions.NoScriptError)
        assert answers[12] == b"x"
        assert sizes == [13]
        # One after another, each alone.
        assert await commands.execute("GET", "ap:n") == b"55"
        assert await commands.execute("DEL", "ap:n", "ap:text") == 2
        assert sizes == [13, 1, 1]
        await client.aclose()

    asyncio.run(scenario())


def test_at_most_max_commands_per_pipeline_the_rest_in_the_next(redis_url: str) -> None:
    async def scenario() -> None:
        client = async_redis_client(redis_url)
        sizes = counting(client)
        commands = AutoPipeline(client, max_commands=4)
        answers = await asyncio.gather(*(commands.execute("INCR", "ap:cap") for _ in range(10)))
        assert sorted(answers) == list(range(1, 11))
        assert sizes == [4, 4, 2]
        await client.delete("ap:cap")
        await client.aclose()

    asyncio.run(scenario())


def test_commands_that_come_while_a_pipeline_is_on_its_way_go_together_in_the_next(redis_url: str) -> None:
    async def scenario() -> None:
        client = async_redis_client(redis_url, timeout_s=5)
        other = async_redis_client(redis_url)
        sizes = counting(client)
        commands = AutoPipeline(client, stalled_s=60)  # one send on its way at a time, never stalled here
        held = asyncio.ensure_future(commands.execute("BLPOP", "ap:gate", 0))  # answered once pushed to
        await asyncio.sleep(0.05)
        later = []
        for i in range(5):  # each in a turn of its own, while BLPOP waits
            later.append(asyncio.ensure_future(commands.execute("INCRBY", "ap:later", i)))
            await asyncio.sleep(0.01)
        assert sizes == [1]  # nothing else sent yet
        await other.lpush("ap:gate", "go")
        assert await held == (b"ap:gate", b"go")
        assert sorted(await asyncio.gather(*later)) == sorted(sum(range(i + 1)) for i in range(5))
        assert sizes == [1, 5]
        # Two may be on their way at once: then the second goes at once.
        two = AutoPipeline(client, max_in_flight=2, stalled_s=60)
        held = asyncio.ensure_future(two.execute("BLPOP", "ap:gate", 0))
        await asyncio.sleep(0.05)
        assert await asyncio.wait_for(two.execute("GET", "ap:later"), 2) == b"10"
        await other.lpush("ap:gate", "go")
        assert await held == (b"ap:gate", b"go")
        assert sizes == [1, 5, 1, 1]
        await client.delete("ap:later")
        await client.aclose()
        await other.aclose()

    asyncio.run(scenario())


def test_a_send_stalled_on_its_way_holds_the_next_ones_back_no_longer_than_stalled_s(redis_url: str) -> None:
    """A hung Redis (or a pipeline whose answer is slow) does not queue every later command
    behind it: past `stalled_s` the next send goes anyway, all of its commands together."""

    async def scenario() -> None:
        client = async_redis_client(redis_url, timeout_s=5)
        other = async_redis_client(redis_url)
        sizes = counting(client)
        commands = AutoPipeline(client, stalled_s=0.2, max_commands=2)
        held = asyncio.ensure_future(commands.execute("BLPOP", "ap:hung", 0))  # never answered until pushed to
        await asyncio.sleep(0.01)
        began = time.monotonic()
        answers = await asyncio.wait_for(asyncio.gather(*(commands.execute("INCR", "ap:after") for _ in range(5))), 2)
        waited = time.monotonic() - began
        assert sorted(answers) == [1, 2, 3, 4, 5]
        assert 0.15 <= waited < 1.5  # it waited for the first to count as stalled, not less, nor for its answer
        assert not held.done()  # the first is still on its way
        assert sizes == [1, 2, 2, 1]  # the five in one send: its pipelines at once, max_commands each
        await other.lpush("ap:hung", "go")
        assert await held == (b"ap:hung", b"go")
        await client.delete("ap:after")
        await client.aclose()
        await other.aclose()

    asyncio.run(scenario())


def test_on_a_new_event_loop_it_starts_afresh_whatever_the_closed_one_left_on_its_way(redis_url: str) -> None:
    """A loop closed with a send on its way and a command waiting behind it (its stall timer
    set) leaves nothing that holds the next loop's commands back."""
    client = async_redis_client(redis_url, timeout_s=5)
    commands = AutoPipeline(client, stalled_s=0.1)

    async def first() -> list[asyncio.Future[Any]]:
        left = [asyncio.ensure_future(commands.execute("BLPOP", "ap:left1", 0))]
        await asyncio.sleep(0.01)
        left.append(asyncio.ensure_future(commands.execute("GET", "ap:x")))  # waits behind it: the timer is set
        await asyncio.sleep(0)
        return left  # asyncio.run cancels both as it closes the loop

    async def second() -> bytes | None:
        held = asyncio.ensure_future(commands.execute("BLPOP", "ap:left2", 0))
        await asyncio.sleep(0.01)
        try:
            return await asyncio.wait_for(commands.execute("GET", "ap:x"), 1)  # after the stall, not never
        finally:
            held.cancel()

    asyncio.run(first())
    assert asyncio.run(second()) is None


def test_a_dead_server_fails_every_caller_of_the_pipeline() -> None:
    async def scenario() -> None:
        client = async_redis_client(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.2)
        commands = AutoPipeline(client)
        answers = await asyncio.gather(*(commands.execute("GET", f"k{i}") for i in range(5)), return_exceptions=True)
        assert all(isinstance(a, redis.ConnectionError) for a in answers), answers
        await client.aclose()

    asyncio.run(scenario())


def test_a_cancelled_caller_sends_nothing_and_the_others_get_their_answers(redis_url: str) -> None:
    async def scenario() -> None:
        client = async_redis_client(redis_url)
        sizes = counting(client)
        commands = AutoPipeline(client)
        gone = asyncio.ensure_future(commands.execute("INCR", "ap:gone"))
        kept = asyncio.ensure_future(commands.execute("INCR", "ap:kept"))
        await asyncio.sleep(0)  # both queued, the pipeline not yet sent
        gone.cancel()
        assert await kept == 1
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert await client.exists("ap:gone") == 0
        assert sizes == [1]
        await client.delete("ap:kept")
        await client.aclose()

    asyncio.run(scenario())


def test_max_commands_and_max_in_flight_must_be_positive(redis_url: str) -> None:
    with pytest.raises(ValueError, match="positive"):
        AutoPipeline(redis.asyncio.Redis.from_url(redis_url), max_commands=0)
    with pytest.raises(ValueError, match="positive"):
        AutoPipeline(redis.asyncio.Redis.from_url(redis_url), max_in_flight=0)
    with pytest.raises(ValueError, match="positive"):
        AutoPipeline(redis.asyncio.Redis.from_url(redis_url), stalled_s=0)
