"""The Brevo client against the stand-in: what is success, what is retried, what is not."""

from __future__ import annotations

import contextlib
import json
import select
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from notifier.brevo import BrevoTransport, Email, FolderTransport, PermanentError, TransientError

from .conftest import API_KEY


def email(email_id: str = "e1") -> Email:
    return Email(
        email_id=email_id,
        to_email="jane@example.com",
        to_name="Jane Doe",
        subject="Hi",
        html="<p>Hi</p>",
        text="Hi",
        tags=["welcome"],
    )


def transport(url: str, *, key: str = API_KEY, timeout_s: float = 5) -> BrevoTransport:
    return BrevoTransport(
        base_url=url, api_key=key, sender_email="no-reply@wallet.example", sender_name="Wallet", timeout_s=timeout_s
    )


class TestBrevoTransport:
    def test_sends_the_documented_body_with_the_id_as_idempotency_key(self, brevo_url: str, stub: httpx.Client) -> None:
        assert transport(brevo_url).send(email("abc")).endswith("@stub.brevo>")
        [body] = stub.get("/_stub/emails").json()["emails"]
        assert body["headers"] == {"idempotencyKey": "abc"}
        assert body["sender"] == {"name": "Wallet", "email": "no-reply@wallet.example"}
        assert body["to"] == [{"email": "jane@example.com", "name": "Jane Doe"}]
        assert (body["subject"], body["htmlContent"], body["textContent"]) == ("Hi", "<p>Hi</p>", "Hi")

    def test_a_repeated_key_is_success_without_a_second_email(self, brevo_url: str, stub: httpx.Client) -> None:
        client = transport(brevo_url)
        client.send(email("same"))
        assert client.send(email("same")) == "duplicate"
        assert len(stub.get("/_stub/emails").json()["emails"]) == 1

    @pytest.mark.parametrize("mode", ["500", "429"])
    def test_5xx_and_429_are_transient(self, brevo_url: str, stub: httpx.Client, mode: str) -> None:
        stub.post("/_stub/fail", json={"mode": mode, "count": 1, "reset": 7})
        with pytest.raises(TransientError) as info:
            transport(brevo_url).send(email())
        assert info.value.retry_after_ms == (7000 if mode == "429" else None)  # Brevo's reset header
        assert transport(brevo_url).send(email())  # and the next call goes through

    def test_a_timeout_is_transient(self, brevo_url: str, stub: httpx.Client) -> None:
        stub.post("/_stub/fail", json={"mode": "slow", "count": 1, "delay_s": 2})
        with pytest.raises(TransientError, match="timed out"):
            transport(brevo_url, timeout_s=0.5).send(email())

    def test_other_4xx_are_permanent(self, brevo_url: str, stub: httpx.Client) -> None:
        stub.post("/_stub/fail", json={"mode": "400", "count": 1})
        with pytest.raises(PermanentError):
            transport(brevo_url).send(email())
        with pytest.raises(PermanentError, match="401"):
            transport(brevo_url, key="wrong-key").send(email())

    def test_unreachable_is_transient(self) -> None:
        with pytest.raises(TransientError):
            transport("http://127.0.0.1:9").send(email())


class TestFolderTransport:
    def test_one_file_per_email_named_by_its_id(self, tmp_path: Path) -> None:
        folder = FolderTransport(str(tmp_path), sender_email="no-reply@wallet.example", sender_name="Wallet")
        folder.send(email("id-1"))
        folder.send(email("id-1"))  # a redelivery rewrites the same file
        folder.send(email("id-2"))
        assert sorted(p.name for p in tmp_path.iterdir()) == ["id-1.json", "id-2.json"]
        body = json.loads((tmp_path / "id-1.json").read_text())
        assert body["headers"]["idempotencyKey"] == "id-1"


class Hangup(bytes):
    """Scripted bytes after which the server closes the connection."""


class ScriptedServer:
    """A raw TCP server answering each request on a connection with the next scripted
    bytes (None: close the connection without answering; Hangup: close after them), to show how the transport reads
    answers Brevo's stand-in never gives: chunked, cut short, garbled, or a dropped
    keep-alive connection."""

    def __init__(self, answers: list[bytes | None]) -> None:  # Hangup is bytes
        self.answers = list(answers)
        self.connections = 0
        self.requests = 0
        self.open: list[socket.socket] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            self.open.append(conn)
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def unsolicited(self, data: bytes) -> None:
        """Bytes on the newest connection, asked for by no request (closed after a Hangup)."""
        conn = self.open[-1]
        conn.sendall(data)
        if isinstance(data, Hangup):
            conn.shutdown(socket.SHUT_RDWR)

    def _talk(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            buffer = b""
            while self.answers:
                while b"\r\n\r\n" not in buffer:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffer += data
                head, _, rest = buffer.partition(b"\r\n\r\n")
                length = int(next(v for k, v in _headers(head) if k == "content-length"))
                while len(rest) < length:
                    rest += conn.recv(65536)
                buffer = rest[length:]
                self.requests += 1
                answer = self.answers.pop(0)
                if answer is None:
                    return
                conn.sendall(answer)
                if isinstance(answer, Hangup):
                    return

    def close(self) -> None:
        self.sock.close()


def _headers(head: bytes) -> list[tuple[str, str]]:
    lines = head.decode("latin-1").split("\r\n")[1:]
    return [(k.strip().lower(), v.strip()) for k, _, v in (line.partition(":") for line in lines)]


ACCEPTED = b'HTTP/1.1 201 Created\r\ncontent-type: application/json\r\ncontent-length: 19\r\n\r\n{"messageId":"<m>"}'


class TestReadingAnswers:
    def test_a_chunked_answer_is_read_whole_and_the_connection_kept(self) -> None:
        chunked = (
            b'HTTP/1.1 201 Created\r\ntransfer-encoding: chunked\r\n\r\n5\r\n{"mes\r\ne\r\nsageId":"<c>"}\r\n0\r\n\r\n'
        )
        server = ScriptedServer([chunked, ACCEPTED])
        client = transport(server.url)
        assert client.send(email("a")) == "<c>"
        assert client.send(email("b")) == "<m>"
        assert (server.connections, server.requests, client.connections.opened) == (1, 2, 1)
        server.close()

    def test_connection_close_is_honoured(self) -> None:
        closing = ACCEPTED.replace(b"\r\ncontent-type", b"\r\nconnection: close\r\ncontent-type")
        server = ScriptedServer([closing, ACCEPTED])
        client = transport(server.url)
        assert client.send(email("a")) == "<m>"
        assert client.send(email("b")) == "<m>"
        assert server.connections == 2  # the first was not reused
        server.close()

    def test_a_kept_alive_connection_the_server_dropped_is_retried_once_on_a_new_one(self) -> None:
        server = ScriptedServer([ACCEPTED, None, ACCEPTED])
        client = transport(server.url)
        assert client.send(email("a")) == "<m>"
        assert client.send(email("b")) == "<m>"  # the dropped connection, then a new one
        assert (server.connections, server.requests) == (2, 3)
        server.close()

    def test_a_new_connection_closed_before_an_answer_is_transient(self) -> None:
        server = ScriptedServer([None])
        with pytest.raises(TransientError, match="unreachable"):
            transport(server.url).send(email("a"))
        assert server.requests == 1  # not retried: the connection was new
        server.close()

    @pytest.mark.parametrize(
        "answer",
        [Hangup(ACCEPTED[:-5]), b"this is not HTTP\r\n\r\n"],
        ids=["cut short", "garbled"],
    )
    def test_a_broken_answer_is_transient_and_its_connection_dropped(self, answer: bytes) -> None:
        server = ScriptedServer([answer, ACCEPTED])
        client = transport(server.url)
        with pytest.raises(TransientError, match="unreachable"):
            client.send(email("a"))
        assert client.connections.idle == []
        assert client.send(email("a")) == "<m>"
        assert server.connections == 2
        server.close()

    def test_an_idle_connection_the_server_said_goodbye_on_is_not_reused(self) -> None:
        """nginx and others answer an idle keep-alive connection with a 408 and close it:
        those bytes are not the next email's answer."""
        goodbye = Hangup(b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n")
        server = ScriptedServer([ACCEPTED, ACCEPTED])
        client = transport(server.url)
        assert client.send(email("a")) == "<m>"
        [(_, conn)] = client.connections.idle
        server.unsolicited(goodbye)
        deadline = time.monotonic() + 5
        while not select.select([conn.sock], [], [], 0)[0] and time.monotonic() < deadline:
            time.sleep(0.01)
        fresh, reused = client.connections.take()
        assert not reused  # dropped, not handed to the next email
        assert fresh is not conn
        client.connections.give_back(fresh)
        assert client.send(email("b")) == "<m>"
        assert (server.connections, server.requests) == (2, 2)
        server.close()

    def test_a_408_is_transient(self) -> None:
        server = ScriptedServer([b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n\r\n"])
        with pytest.raises(TransientError, match="408"):
            transport(server.url).send(email("a"))
        server.close()
