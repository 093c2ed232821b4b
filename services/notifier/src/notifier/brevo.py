"""Delivering an email: Brevo's transactional API, or a local folder when no key is set."""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import select
import socket
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass, field
from json.encoder import encode_basestring  # the string encoder of json.dumps(..., ensure_ascii=False)
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import httptools

from notifier.metrics import BREVO_CALLS

log = logging.getLogger("notifier.brevo")


@dataclass(frozen=True)
class Email:
    email_id: str  # Brevo's idempotencyKey: the same email is never sent twice
    to_email: str
    to_name: str
    subject: str
    html: str
    text: str
    tags: list[str] = field(default_factory=list)

    def brevo_body(self, sender_email: str, sender_name: str) -> dict[str, Any]:
        return {
            "sender": {"name": sender_name, "email": sender_email},
            "to": [{"email": self.to_email, "name": self.to_name}],
            "subject": self.subject,
            "htmlContent": self.html,
            "textContent": self.text,
            "tags": self.tags,
            "headers": {"idempotencyKey": self.email_id},
        }


class TransientError(Exception):
    """Worth retrying: a timeout, a 5xx, or a 429 (with Brevo's reset delay if it gave one)."""

    def __init__(self, reason: str, *, retry_after_ms: int | None = None) -> None:
        super().__init__(reason)
        self.retry_after_ms = retry_after_ms


class PermanentError(Exception):
    """A 4xx other than 429: retrying cannot help; the message goes to the dead-letter queue."""


class Transport(Protocol):
    def send(self, email: Email) -> str: ...


class BadAnswer(http.client.HTTPException):
    """An answer that is not HTTP, is cut short, or is too large: its connection is dropped."""


class _Closed(http.client.RemoteDisconnected):
    """The server closed the connection before any byte of an answer."""


MAX_ANSWER_BYTES = 1 << 20  # Brevo answers a few hundred bytes: more is no answer to hold in memory


class _Connection:
    """One socket, and the parser of its answers (httptools: llhttp's C parser), kept from
    answer to answer while the connection is. The parser's callbacks fill in the answer
    being read."""

    __slots__ = ("body", "complete", "headed", "headers", "keep", "parser", "size", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock: socket.socket | None = sock
        self.complete = False
        self.parser = httptools.HttpResponseParser(self)  # looks the callbacks below up once

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.headed = True

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_begin(self) -> None:
        if self.complete:  # a second answer to one request: bytes no request asked for
            raise BadAnswer("more than one answer")

    def on_message_complete(self) -> None:
        if self.parser.get_status_code() < 200:  # 1xx: an interim answer; the real one follows
            self.headers, self.body, self.headed = [], [], False
            return
        self.complete = True
        self.keep = self.parser.should_keep_alive()  # HTTP/1.1 without Connection: close

    def exchange(self, request: bytes, timeout_s: float) -> tuple[int, list[tuple[bytes, bytes]], bytes, bool]:
        """Write the request and read its whole answer within `timeout_s` in all (a server
        that trickles its answer does not hold a send past it): (status, headers, body,
        reusable). TimeoutError past it."""
        sock = self.sock
        if sock is None:
            raise _Closed("connection closed")
        deadline = time.monotonic() + timeout_s
        self.headers, self.body, self.headed, self.complete, self.keep, self.size = [], [], False, False, False, 0
        sock.settimeout(timeout_s)
        sock.sendall(request)  # one write: the head and the body
        parser = self.parser
        while not self.complete:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no whole answer in time")
            sock.settimeout(left)
            data = sock.recv(65536)
            if not data:
                if not self.size:
                    raise _Closed("Remote end closed connection without response")
                if self.headed and not _framed(self.headers):  # a body that ends with the connection
                    return parser.get_status_code(), self.headers, b"".join(self.body), False
                raise BadAnswer(f"answer cut short after {self.size} bytes")
            self.size += len(data)
            if self.size > MAX_ANSWER_BYTES:
                raise BadAnswer("answer too large")
            try:
                parser.feed_data(data)
            except httptools.HttpParserUpgrade as exc:  # a 101: no answer to a POST of ours
                raise BadAnswer("an upgrade answered") from exc
            except httptools.HttpParserError as exc:
                if not self.complete:
                    raise BadAnswer(f"not an HTTP answer: {exc}") from exc
                self.keep = False  # the answer, then bytes no request asked for: not reused
        return parser.get_status_code(), self.headers, b"".join(self.body), self.keep

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()


class _Connections:
    """Keep-alive HTTP/1.1 connections to one origin, shared by a worker's threads.

    Not httpx, nor the standard library's client: per email httpx costs a third of the
    CPU (bench/notifier_cost.py), and http.client's answer reading (email.parser for the
    headers) most of what remained of the send (bench/notifier_cpu.py). The notifier sends
    one small request per email: its head is built once (`head`), written with the body in
    one write, and the answer read by httptools' C parser. A thread takes an idle
    connection (or opens one), and gives it back only after reading the whole answer; a
    connection that failed in any way is closed, never reused. Idle connections older than
    `idle_s` are dropped (the server may have closed them by then).
    """

    def __init__(self, base_url: str, *, timeout_s: float, connect_timeout_s: float, idle_s: float = 5.0) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.https = url.scheme == "https"
        self.host = url.hostname
        self.port = url.port or (443 if self.https else 80)
        self.prefix = url.path.rstrip("/")
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.idle_s = idle_s
        self.tls = ssl.create_default_context() if self.https else None
        self.lock = threading.Lock()
        self.idle: list[tuple[float, _Connection]] = []
        self.opened = 0  # connections opened by this pool (its keep-alive shows as few)
        self.heads: dict[tuple[str, tuple[tuple[str, str], ...]], bytes] = {}

    def head(self, path: str, headers: dict[str, str]) -> bytes:
        """A POST's head up to its Content-Length value, as http.client writes it (Host,
        Accept-Encoding: identity, then `headers`); built once per path and headers."""
        key = (path, tuple(headers.items()))
        head = self.heads.get(key)
        if head is None:
            host = f"[{self.host}]" if ":" in self.host else self.host
            if self.port != (443 if self.https else 80):
                host = f"{host}:{self.port}"
            lines = [f"POST {self.prefix}{path} HTTP/1.1", f"Host: {host}", "Accept-Encoding: identity"]
            for name, value in headers.items():
                if not _TOKEN.fullmatch(name) or _BAD_VALUE.search(value):
                    raise ValueError(f"invalid header {name!r}")
                lines.append(f"{name}: {value}")
            head = self.heads[key] = ("\r\n".join(lines) + "\r\nContent-Length: ").encode("latin-1")
        return head

    def take(self) -> tuple[_Connection, bool]:
        """An idle connection (True: reused) or a new, connected one (False)."""
        now = time.monotonic()
        with self.lock:
            while self.idle:
                since, conn = self.idle.pop()
                if now - since < self.idle_s and not _readable(conn):
                    return conn, True
                conn.close()
            self.opened += 1
        sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout_s)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_hostname=self.host)  # the handshake, within the timeout
        except BaseException:
            sock.close()
            raise
        return _Connection(sock), False

    def give_back(self, conn: _Connection) -> None:
        with self.lock:
            self.idle.append((time.monotonic(), conn))

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """POST and read the whole answer: its status, headers (as sent) and body. A reused
        connection that turns out closed by the server (before any answer) is retried once
        on a new one: a POST that may have arrived anyway is safe here, because each email
        carries its idempotencyKey."""
        request = b"%b%d\r\n\r\n%b" % (self.head(path, headers), len(body), body)
        for attempt in (1, 2):
            conn, reused = self.take()
            try:
                status, raw, data, keep = conn.exchange(request, self.timeout_s)
            except (ConnectionResetError, BrokenPipeError):  # _Closed among them
                conn.close()
                if reused and attempt == 1:
                    continue
                raise
            except BaseException:
                conn.close()
                raise
            if keep:
                self.give_back(conn)
            else:
                conn.close()
            return status, raw, data
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self.lock:
            idle, self.idle = self.idle, []
        for _, conn in idle:
            conn.close()


def _framed(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether an answer's end is told by its headers (else it ends with the connection)."""
    return any(
        (name := key.lower()) == b"content-length" or (name == b"transfer-encoding" and b"chunked" in value.lower())
        for key, value in headers
    )


def _header(headers: list[tuple[bytes, bytes]], wanted: bytes) -> str | None:
    """The last value of a header (`wanted` in lower case), as http.client's getheaders()
    in a dict would give it."""
    found = None
    for name, value in headers:
        if name.lower() == wanted:
            found = value.decode("latin-1")
    return found


# What http.client refuses in a header's name and value (a line break would start another).
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# Brevo's x-sib-ratelimit-reset: seconds, ASCII digits (str.isdigit takes "²", float "inf").
_SECONDS = re.compile(r"[0-9]{1,6}(?:\.[0-9]{1,6})?")


def _readable(conn: _Connection) -> bool:
    """An idle connection with something to read is done for: the server closed it, or
    said goodbye first (a 408 Request Timeout, as nginx and others do), and those bytes
    would be read as the next email's answer."""
    if conn.sock is None:
        return True
    poll = select.poll()  # not select(): it fails on a descriptor past 1023
    poll.register(conn.sock, select.POLLIN)
    return bool(poll.poll(0))


class BrevoTransport:
    """Brevo's `POST /v3/smtp/email`, over keep-alive connections shared by the threads of a
    worker process (one transport per process: notifier.actors.context)."""

    def __init__(self, *, base_url: str, api_key: str, sender_email: str, sender_name: str, timeout_s: float) -> None:
        self.connections = _Connections(base_url, timeout_s=timeout_s, connect_timeout_s=min(timeout_s, 3.0))
        self.headers = {"api-key": api_key, "accept": "application/json", "content-type": "application/json"}
        self.sender_email = sender_email
        self.sender_name = sender_name
        self.sender = json.dumps(
            {"name": sender_name, "email": sender_email}, ensure_ascii=False, separators=(",", ":")
        )

    def body(self, email: Email) -> bytes:
        """The JSON of `email.brevo_body`, as json.dumps writes it without spaces (separators),
        its constant part encoded once: each string is encoded as json.dumps encodes it."""
        q = encode_basestring
        return (
            f'{{"sender":{self.sender},"to":[{{"email":{q(email.to_email)},"name":{q(email.to_name)}}}],'
            f'"subject":{q(email.subject)},"htmlContent":{q(email.html)},"textContent":{q(email.text)},'
            f'"tags":[{",".join(map(q, email.tags))}],"headers":{{"idempotencyKey":{q(email.email_id)}}}}}'
        ).encode()

    def send(self, email: Email) -> str:
        """Returns Brevo's messageId (or "duplicate" when Brevo already has this email)."""
        body = self.body(email)
        try:
            status, headers, data = self.connections.post("/v3/smtp/email", body, self.headers)
        except TimeoutError as exc:  # socket.timeout: connecting, sending or waiting for the answer
            _count_call("timeout")
            raise TransientError("Brevo timed out") from exc
        except (OSError, http.client.HTTPException) as exc:  # refused, reset, TLS, a garbled answer
            _count_call("unreachable")
            raise TransientError(f"Brevo unreachable: {type(exc).__name__}") from exc
        _count_call(str(status))
        answer = _json(data)
        if status in (201, 202):
            return str(answer.get("messageId") or answer.get("batchId") or "")
        code = str(answer.get("code", ""))
        if status == 400 and code == "duplicate_parameter":
            # The idempotencyKey was seen: an earlier attempt got through. That is success.
            log.info("Brevo already has email %s", email.email_id)
            return "duplicate"
        if status == 429:
            reset = _header(headers, b"x-sib-ratelimit-reset")
            delay = int(float(reset) * 1000) if reset and _SECONDS.fullmatch(reset) else None
            raise TransientError("Brevo rate limit", retry_after_ms=delay)
        if status >= 500 or status == 408:  # 408: the server timed the request out; try again
            raise TransientError(f"Brevo answered {status}")
        raise PermanentError(f"Brevo refused the email: {status} {code}")

    def close(self) -> None:
        self.connections.close()


_CALLS: dict[str, Any] = {}  # BREVO_CALLS by outcome: labels() takes a lock and builds a key per call


def _count_call(outcome: str) -> None:
    child = _CALLS.get(outcome)
    if child is None:
        child = _CALLS[outcome] = BREVO_CALLS.labels(outcome)
    child.inc()


def _json(data: bytes) -> dict[str, Any]:
    try:
        answer = json.loads(data) if data else {}
    except ValueError:
        return {}
    return answer if isinstance(answer, dict) else {}


class FolderTransport:
    """The local default: one JSON file per email, named by its id, holding what Brevo would get."""

    def __init__(self, folder: str, *, sender_email: str, sender_name: str) -> None:
        self.folder = Path(folder)
        self.sender_email = sender_email
        self.sender_name = sender_name

    def send(self, email: Email) -> str:
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.folder / f"{email.email_id}.json"
        body = json.dumps(email.brevo_body(self.sender_email, self.sender_name), indent=2, ensure_ascii=False)
        # Write-then-rename: a reader never sees half a file, and a repeat just rewrites it.
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp-")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(body)
        os.replace(tmp, target)
        return str(target)
