"""Edges of svckit.server.HttpProtocol, svckit.redis.AutoPipeline and svckit.heap.settled_heap
(found by a cold review): backpressure, a half-closing client, one caller's bad argument,
heaps settled by several apps, pipelined requests and 100-continue."""

from __future__ import annotations

import asyncio
import gc
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from svckit.heap import GC_YOUNG_THRESHOLD, settled_heap
from svckit.redis import AutoPipeline, async_redis_client
from svckit.server import HttpProtocol
from svckit.testing import free_port, redis_server

CHUNK = 1 << 20
CHUNKS = 64
sent: dict[str, int] = {}


async def big(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A streamed body whose parts are all ready (an async generator over memory): no part waits."""
    if scope["type"] != "http":
        return
    key = scope["path"]
    sent[key] = 0
    await send({"type": "http.response.start", "status": 200, "headers": []})
    part = b"x" * CHUNK
    for _ in range(CHUNKS):
        await send({"type": "http.response.body", "body": part, "more_body": True})
        sent[key] += 1
    await send({"type": "http.response.body", "body": b""})


def serve(protocol: type) -> tuple[uvicorn.Server, threading.Thread, int]:
    port = free_port()
    config = uvicorn.Config(big, host="127.0.0.1", port=port, http=protocol, log_level="critical", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return server, thread, port


def parts_sent_to_a_reader_that_reads_nothing(protocol: type, path: str) -> int:
    server, thread, port = serve(protocol)
    try:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            time.sleep(1.0)  # the client reads nothing: the server must stop and wait
            return sent.get(path, -1)
    finally:
        server.should_exit = True
        thread.join(10)


def test_backpressure_stock_uvicorn_waits_for_the_reader() -> None:
    # uvicorn's own protocol: after a few MiB the transport pauses writing and send() waits.
    assert parts_sent_to_a_reader_that_reads_nothing(HttpToolsProtocol, "/stock") < 16


def test_backpressure_a_large_turn_writes_through_so_the_app_waits_for_the_reader() -> None:
    # Past 64 KiB a turn's writes reach the transport at once: it pauses the app, as uvicorn's own.
    assert parts_sent_to_a_reader_that_reads_nothing(HttpProtocol, "/turn") < 16


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


def test_one_callers_bad_argument_is_its_own_error_not_its_turns(redis_url: str) -> None:
    # Arguments are encoded as each caller queues them: a DataError is that caller's alone.
    async def scenario() -> list[Any]:
        client = async_redis_client(redis_url)
        commands = AutoPipeline(client)
        try:
            return await asyncio.gather(
                commands.execute("SET", "rev2:a", "1"),
                commands.execute("SET", "rev2:b", None),  # alone: DataError for this caller only
                commands.execute("GET", "rev2:a"),
                return_exceptions=True,
            )
        finally:
            await client.aclose()

    answers = asyncio.run(scenario())
    assert isinstance(answers[1], redis.DataError)
    assert answers[0] is True, answers
    assert answers[2] == b"1", answers


def test_heaps_settled_by_two_apps_stay_settled_until_the_last_one_ends() -> None:
    # Two apps' lifespans in one process, ended in the order they began: the first settles, the
    # last hands back, and the collector's threshold is restored.
    before = gc.get_threshold()
    first, second = settled_heap(), settled_heap()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert gc.get_freeze_count() > 0  # the second app still runs: its heap stays settled
    second.__exit__(None, None, None)
    try:
        assert gc.get_threshold() == before
    finally:
        gc.set_threshold(*before)
    assert before[0] != GC_YOUNG_THRESHOLD


async def small(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = scope["path"].encode()
    if scope["method"] == "POST":
        message = await receive()  # after a 100 Continue when asked for
        body += b":" + message["body"]
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(len(body)).encode())]}
    )
    await send({"type": "http.response.body", "body": body})


def serve_small() -> tuple[uvicorn.Server, threading.Thread, int]:
    port = free_port()
    config = uvicorn.Config(small, host="127.0.0.1", port=port, http=HttpProtocol, log_level="critical", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    return server, thread, port


def read_all(sock: socket.socket) -> bytes:
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except TimeoutError:
        pass
    return received


def test_a_client_that_half_closes_after_its_request_gets_the_answer() -> None:
    # A client that shuts down its writing side after the request still gets an answer made
    # at once: the EOF flushes the turn's writes before the transport closes itself.
    server, thread, port = serve_small()
    try:
        for _ in range(10):
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                sock.sendall(b"GET /half HTTP/1.1\r\nHost: x\r\n\r\n")
                sock.shutdown(socket.SHUT_WR)
                assert read_all(sock).endswith(b"\r\n\r\n/half")
    finally:
        server.should_exit = True
        thread.join(10)


def test_pipelined_requests_and_100_continue_answered_in_order() -> None:
    server, thread, port = serve_small()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"".join(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(5)))
            received = read_all(sock)
        assert [part[-2:] for part in received.split(b"HTTP/1.1 200 OK")[1:]] == [b"/%d" % i for i in range(5)]
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
            assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
            sock.sendall(b"hi")
            assert read_all(sock).endswith(b"/p:hi")
    finally:
        server.should_exit = True
        thread.join(10)
