"""The Brevo client against the stand-in: what is success, what is retried, what is not."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import resource
import select
import socket
import ssl
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

    def test_the_body_is_the_document_json_dumps_writes(self) -> None:
        client = BrevoTransport(
            base_url="http://127.0.0.1:9",
            api_key=API_KEY,
            sender_email='n"o@w.example',
            sender_name="Wállet\n",
            timeout_s=1,
        )
        tricky = Email(
            email_id="id\\1",
            to_email="j@example.com",
            to_name='Jane "J" Dœ\u202e',
            subject="Hi\t\x01",
            html="<p>Hi</p>\r\n",
            text="Hi \U0001f600 \\ /",
            tags=["receipt", 'tr"ansfer'],
        )
        for sent in (tricky, email("plain"), Email("e", "t@x", "T", "s", "h", "t")):
            body = client.body(sent)
            assert json.loads(body) == sent.brevo_body('n"o@w.example', "Wállet\n")
            assert (
                body
                == json.dumps(
                    sent.brevo_body('n"o@w.example', "Wállet\n"), ensure_ascii=False, separators=(",", ":")
                ).encode()
            )


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

    def __init__(self, answers: list[bytes | None], *, tls: ssl.SSLContext | None = None) -> None:  # Hangup is bytes
        self.tls = tls
        self.answers = list(answers)
        self.connections = 0
        self.requests = 0
        self.raw: list[bytes] = []  # each request as it arrived: head and body
        self.open: list[socket.socket] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"{'https://localhost' if tls else 'http://127.0.0.1'}:{self.sock.getsockname()[1]}"
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
        with contextlib.suppress(OSError):
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
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
                self.raw.append(head + b"\r\n\r\n" + rest[:length])
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


class TestTheWire:
    """The lean client (httptools' parser on a plain socket) against a real local socket
    server: what it writes, and the answers http.client also read."""

    def test_one_request_as_http_client_wrote_it(self) -> None:
        server = ScriptedServer([ACCEPTED])
        client = transport(server.url)
        assert client.send(email("a")) == "<m>"
        [raw] = server.raw
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        assert lines[0] == "POST /v3/smtp/email HTTP/1.1"
        port = server.url.rsplit(":", 1)[1]
        assert dict(_headers(head)) == {
            "host": f"127.0.0.1:{port}",
            "accept-encoding": "identity",
            "api-key": API_KEY,
            "accept": "application/json",
            "content-type": "application/json",
            "content-length": str(len(body)),
        }
        assert json.loads(body)["headers"] == {"idempotencyKey": "a"}
        server.close()

    def test_a_base_urls_path_prefixes_the_request(self) -> None:
        server = ScriptedServer([ACCEPTED])
        assert transport(server.url + "/brevo/").send(email("a")) == "<m>"
        assert server.raw[0].startswith(b"POST /brevo/v3/smtp/email HTTP/1.1\r\n")
        server.close()

    def test_a_body_that_ends_with_the_connection_is_read_and_the_connection_not_reused(self) -> None:
        unframed = Hangup(b'HTTP/1.1 201 Created\r\ncontent-type: application/json\r\n\r\n{"messageId":"<u>"}')
        server = ScriptedServer([unframed, ACCEPTED])
        client = transport(server.url)
        assert client.send(email("a")) == "<u>"
        assert client.connections.idle == []
        assert client.send(email("b")) == "<m>"
        assert server.connections == 2
        server.close()

    def test_an_interim_answer_is_skipped(self) -> None:
        server = ScriptedServer([b"HTTP/1.1 100 Continue\r\n\r\n" + ACCEPTED, ACCEPTED])
        client = transport(server.url)
        assert client.send(email("a")) == "<m>"
        assert client.send(email("b")) == "<m>"
        assert server.connections == 1
        server.close()

    def test_bytes_after_the_answer_drop_the_connection(self) -> None:
        """They would be read as the next email's answer."""
        server = ScriptedServer([ACCEPTED + ACCEPTED, ACCEPTED])
        client = transport(server.url)
        assert client.send(email("a")) == "<m>"
        assert client.connections.idle == []
        assert client.send(email("b")) == "<m>"
        assert server.connections == 2
        server.close()

    def test_an_answer_too_large_is_transient(self) -> None:
        huge = b"HTTP/1.1 201 Created\r\ncontent-length: 3000000\r\n\r\n" + b"x" * 3_000_000
        server = ScriptedServer([huge])
        client = transport(server.url)
        with pytest.raises(TransientError, match="unreachable"):
            client.send(email("a"))
        assert client.connections.idle == []
        server.close()

    def test_no_answer_in_time_is_transient_and_the_connection_dropped(self) -> None:
        silent = socket.create_server(("127.0.0.1", 0))  # the kernel accepts; nobody answers
        client = transport(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout_s=0.3)
        started = time.monotonic()
        with pytest.raises(TransientError, match="timed out"):
            client.send(email("a"))
        assert 0.3 <= time.monotonic() - started < 3
        assert client.connections.idle == []
        silent.close()

    def test_a_rate_limit_answer_carries_its_reset(self) -> None:
        limited = b"HTTP/1.1 429 Too Many Requests\r\nX-Sib-Ratelimit-Reset: 2.5\r\ncontent-length: 2\r\n\r\n{}"
        server = ScriptedServer([limited])
        with pytest.raises(TransientError) as info:
            transport(server.url).send(email("a"))
        assert info.value.retry_after_ms == 2500
        server.close()

    def test_a_header_that_would_start_another_line_is_refused(self) -> None:
        with pytest.raises(ValueError, match="invalid header"):
            transport("http://127.0.0.1:9", key="key\r\nx-evil: 1").send(email("a"))

    def test_https_is_spoken_over_tls_with_the_certificate_checked(self, tmp_path: Path) -> None:
        cert, key = _self_signed(tmp_path)
        served = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        served.load_cert_chain(cert, key)
        server = ScriptedServer([ACCEPTED, ACCEPTED], tls=served)
        client = transport(server.url)
        with pytest.raises(TransientError, match="unreachable: SSLCertVerificationError"):
            client.send(email("a"))  # the system's roots do not vouch for it
        client.connections.tls = ssl.create_default_context(cafile=str(cert))
        assert client.send(email("a")) == "<m>"
        assert client.send(email("b")) == "<m>"
        assert server.raw[0].startswith(b"POST /v3/smtp/email HTTP/1.1\r\n")
        assert server.requests == 2
        assert client.connections.opened == 2  # the refused one, then one kept alive
        server.close()


def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for localhost, signed by its own key."""
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


# --- found by a cold review, each answered as a classified failure or read right ----------


def test_a_trickled_answer_times_out_within_the_calls_timeout_in_all() -> None:
    """The timeout bounds the whole exchange, not each read: a server sending a byte every
    0.2 s is cut off at the timeout (the sent marker's claim outlives one call by a margin)."""
    body = b'{"messageId":"<t>"}'
    srv = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = srv.accept()
        with conn, contextlib.suppress(OSError):
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 201 Created\r\ncontent-length: %d\r\n\r\n" % len(body))
            for byte in body:
                time.sleep(0.2)
                conn.sendall(bytes([byte]))

    threading.Thread(target=serve, daemon=True).start()
    started = time.monotonic()
    with pytest.raises(TransientError, match="timed out"):
        transport(f"http://127.0.0.1:{srv.getsockname()[1]}", timeout_s=1).send(email("a"))
    assert time.monotonic() - started < 2  # the 19 bytes would take 3.8 s
    srv.close()


def test_an_upgrade_answer_is_a_transient_failure() -> None:
    server = ScriptedServer(
        [Hangup(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: h2c\r\nconnection: upgrade\r\n\r\n")]
    )
    with pytest.raises(TransientError, match="BadAnswer"):
        transport(server.url).send(email("a"))
    server.close()


@pytest.mark.parametrize("reset", [b"\xb2", b"9" * 400, b"-1", b"1e3", b"inf"])
def test_a_429_with_a_reset_that_is_not_seconds_is_a_rate_limit_without_a_delay(reset: bytes) -> None:
    answer = b"HTTP/1.1 429 Too Many Requests\r\nx-sib-ratelimit-reset: " + reset + b"\r\ncontent-length: 0\r\n\r\n"
    server = ScriptedServer([answer])
    with pytest.raises(TransientError, match="rate limit") as info:
        transport(server.url).send(email("a"))
    assert info.value.retry_after_ms is None
    server.close()


def test_a_connection_on_a_descriptor_past_1023_is_reused() -> None:
    """The idle connection's check polls: select() refuses descriptors past FD_SETSIZE."""
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 1200:
        pytest.skip("this process may not open 1,100 descriptors (ulimit -n)")
    gc.collect()  # sockets of earlier tests closed now, not between the opens below and the send
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        server = ScriptedServer([ACCEPTED, ACCEPTED])
        client = transport(server.url)
        assert client.send(email("a")) == "<m>"
        [(_, conn)] = client.connections.idle
        assert conn.sock is not None
        assert conn.sock.fileno() >= 1024
        assert client.send(email("b")) == "<m>"
        assert server.connections == 1
        server.close()
    finally:
        for fd in held:
            os.close(fd)


def test_a_body_of_another_transfer_encoding_ending_with_the_connection_is_read_whole() -> None:
    server = ScriptedServer([Hangup(b'HTTP/1.1 201 Created\r\ntransfer-encoding: identity\r\n\r\n{"messageId":"<i>"}')])
    assert transport(server.url).send(email("a")) == "<i>"
    server.close()
