"""Delivering an email: Brevo's transactional API, or a local folder when no key is set."""

from __future__ import annotations

import json
import logging
import os
import socket
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass, field
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


class _Answer:
    """One HTTP answer, filled in by httptools' parser callbacks."""

    __slots__ = ("body", "headers", "keep_alive", "parser", "status")

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.body: list[bytes] = []
        self.keep_alive = False
        self.status = 0
        self.parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        parser, self.parser = self.parser, None  # no reference cycle left behind
        if parser is not None:  # both only known here: the parser resets after
            self.status, self.keep_alive = parser.get_status_code(), parser.should_keep_alive()


class ClosedBeforeAnswer(ConnectionError):
    """The server closed the connection before any byte of an answer (an idle keep-alive
    connection it had dropped, typically)."""


class _Connections:
    """Keep-alive HTTP/1.1 connections to one origin, shared by a worker's threads.

    Plain sockets, a request written in one piece and answers read with httptools (the C
    parser uvicorn uses), not httpx or http.client: the notifier sends one small request
    per email, and http.client's header parsing (the email package) alone cost a sixth of
    the notifier's CPU per email, httpx three times that (bench/notifier_cost.py). A thread
    takes an idle connection (or opens one), and gives it back only after reading the whole
    answer; a connection that failed in any way is closed, never reused. Idle connections
    older than `idle_s` are dropped (the server may have closed them by then).
    """

    def __init__(self, base_url: str, *, timeout_s: float, connect_timeout_s: float, idle_s: float = 5.0) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        https = url.scheme == "https"
        self.host = url.hostname
        self.port = url.port or (443 if https else 80)
        self.authority = self.host if url.port is None else f"{self.host}:{self.port}"
        self.prefix = url.path.rstrip("/")
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.idle_s = idle_s
        self.tls = ssl.create_default_context() if https else None
        self.lock = threading.Lock()
        self.idle: list[tuple[float, socket.socket]] = []
        self.opened = 0  # connections opened by this pool (its keep-alive shows as few)

    def take(self) -> tuple[socket.socket, bool]:
        """An idle connection (True: reused) or a new, connected one (False)."""
        now = time.monotonic()
        with self.lock:
            while self.idle:
                since, sock = self.idle.pop()
                if now - since < self.idle_s:
                    return sock, True
                sock.close()
            self.opened += 1
        sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout_s)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_hostname=self.host)
            sock.settimeout(self.timeout_s)  # each read and write from now on
        except BaseException:
            sock.close()
            raise
        return sock, False

    def give_back(self, sock: socket.socket) -> None:
        with self.lock:
            self.idle.append((time.monotonic(), sock))

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        """POST and read the whole answer. A reused connection that turns out closed by the
        server (before any answer) is retried once on a new one: a POST that may have
        arrived anyway is safe here, because each email carries its idempotencyKey."""
        head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        request = (
            f"POST {self.prefix}{path} HTTP/1.1\r\nhost: {self.authority}\r\n{head}content-length: {len(body)}\r\n\r\n"
        ).encode("latin-1") + body
        for attempt in (1, 2):
            sock, reused = self.take()
            try:
                status, answer, keep_alive = _exchange(sock, request)
            except (ClosedBeforeAnswer, ConnectionResetError, BrokenPipeError):
                sock.close()
                if reused and attempt == 1:
                    continue
                raise
            except BaseException:
                sock.close()
                raise
            if keep_alive:
                self.give_back(sock)
            else:
                sock.close()
            return status, answer.headers, b"".join(answer.body)
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self.lock:
            idle, self.idle = self.idle, []
        for _, sock in idle:
            sock.close()


def _exchange(sock: socket.socket, request: bytes) -> tuple[int, _Answer, bool]:
    """Write the request, read one answer: its status, headers and body, and whether the
    connection may carry another."""
    sock.sendall(request)
    answer = _Answer()
    started = False
    while answer.parser is not None:
        data = sock.recv(65536)
        if not data:
            if started:  # an answer cut short (or one delimited by the close: not Brevo's)
                raise ConnectionError("the server closed the connection mid-answer")
            raise ClosedBeforeAnswer("the server closed the connection before answering")
        started = True
        answer.parser.feed_data(data)
    return answer.status, answer, answer.keep_alive


class BrevoTransport:
    """Brevo's `POST /v3/smtp/email`, over keep-alive connections shared by the threads of a
    worker process (one transport per process: notifier.actors.context)."""

    def __init__(self, *, base_url: str, api_key: str, sender_email: str, sender_name: str, timeout_s: float) -> None:
        self.connections = _Connections(base_url, timeout_s=timeout_s, connect_timeout_s=min(timeout_s, 3.0))
        self.headers = {"api-key": api_key, "accept": "application/json", "content-type": "application/json"}
        self.sender_email = sender_email
        self.sender_name = sender_name

    def send(self, email: Email) -> str:
        """Returns Brevo's messageId (or "duplicate" when Brevo already has this email)."""
        body = json.dumps(email.brevo_body(self.sender_email, self.sender_name), ensure_ascii=False).encode()
        try:
            status, headers, data = self.connections.post("/v3/smtp/email", body, self.headers)
        except TimeoutError as exc:  # socket.timeout: connecting, sending or waiting for the answer
            BREVO_CALLS.labels("timeout").inc()
            raise TransientError("Brevo timed out") from exc
        except (OSError, httptools.HttpParserError) as exc:  # refused, reset, TLS, a garbled answer
            BREVO_CALLS.labels("unreachable").inc()
            raise TransientError(f"Brevo unreachable: {type(exc).__name__}") from exc
        BREVO_CALLS.labels(str(status)).inc()
        answer = _json(data)
        if status in (201, 202):
            return str(answer.get("messageId") or answer.get("batchId") or "")
        code = str(answer.get("code", ""))
        if status == 400 and code == "duplicate_parameter":
            # The idempotencyKey was seen: an earlier attempt got through. That is success.
            log.info("Brevo already has email %s", email.email_id)
            return "duplicate"
        if status == 429:
            reset = headers.get("x-sib-ratelimit-reset")
            delay = int(float(reset) * 1000) if reset and reset.replace(".", "", 1).isdigit() else None
            raise TransientError("Brevo rate limit", retry_after_ms=delay)
        if status >= 500:
            raise TransientError(f"Brevo answered {status}")
        raise PermanentError(f"Brevo refused the email: {status} {code}")

    def close(self) -> None:
        self.connections.close()


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
