"""svckit.server.HttpProtocol: uvicorn's protocol with a response's writes of one turn joined.

A real uvicorn server on a real socket for what a client sees (keep-alive, a streamed body,
a closing connection, a malformed request); the joining itself on a recording transport."""

from __future__ import annotations

import asyncio
import http.client
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from svckit.server import HttpProtocol, _TurnBuffer
from svckit.testing import free_port


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        for part in (b"one ", b"two ", b"three"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
            await asyncio.sleep(0.01)  # each part in a turn of its own
        await send({"type": "http.response.body", "body": b""})
        return
    body = b'{"path":"' + scope["path"].encode() + b'"}'
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, http=HttpProtocol, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield port
    server.should_exit = True
    thread.join(10)


def test_answers_whole_and_keeps_the_connection_alive(port: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    for path in ("/a", "/b", "/c"):
        conn.request("GET", path)
        response = conn.getresponse()
        assert response.status == 200
        assert response.read() == b'{"path":"' + path.encode() + b'"}'
        assert not response.will_close
    sock = conn.sock
    conn.request("GET", "/d")
    assert conn.getresponse().read() == b'{"path":"/d"}'
    assert conn.sock is sock  # the same connection all along
    conn.close()


def test_a_body_streamed_over_several_turns_arrives_whole(port: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", "/stream")
    response = conn.getresponse()
    assert response.getheader("transfer-encoding") == "chunked"
    assert response.read() == b"one two three"
    conn.close()


def test_connection_close_sends_the_whole_answer_before_closing(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /bye HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        received = b""
        while chunk := sock.recv(4096):  # b"" once the server has closed
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"connection: close" in head.lower()
    assert body == b'{"path":"/bye"}'


def test_a_malformed_request_gets_its_400_before_the_close(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        received = b""
        while chunk := sock.recv(4096):
            received += chunk
    assert received.startswith(b"HTTP/1.1 400 ")


class Recording:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "written after close"
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


def test_writes_of_one_turn_go_out_as_one_and_close_sends_what_is_pending() -> None:
    async def scenario() -> None:
        transport = Recording()
        buffer = _TurnBuffer(transport, asyncio.get_running_loop())  # type: ignore[arg-type]
        buffer.write(b"HTTP/1.1 200 OK\r\n\r\n")
        buffer.write(b"body")
        assert transport.writes == []  # not before the turn ends
        await asyncio.sleep(0)
        assert transport.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody"]
        await asyncio.sleep(0)
        assert len(transport.writes) == 1  # nothing more to flush
        buffer.write(b"last")
        buffer.close()
        assert transport.writes[-1] == b"last"
        assert transport.closed
        await asyncio.sleep(0)  # the flush scheduled for "last" finds nothing
        assert len(transport.writes) == 2
        assert buffer.get_extra_info("peername") == "info:peername"  # the rest is delegated

    asyncio.run(scenario())
