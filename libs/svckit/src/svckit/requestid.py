"""Request ids: accept the client's (if well formed) or make one; echo it; keep it in context.

One pure-ASGI middleware does all the per-request plumbing around the app (no
BaseHTTPMiddleware, which measured several times slower here; one wrapper of `send`
instead of one per concern): the request id, the request metrics (svckit.metrics), the
access log line, and the problem response, still carrying the request id, that an
unhandled exception turns into.
"""

from __future__ import annotations

import contextvars
import logging
import re
import sys
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from svckit.metrics import RequestMetrics, route_template
from svckit.problems import internal_error

HEADER = "X-Request-ID"
_HEADER_KEY = b"x-request-id"
_VALID = re.compile(rb"^[A-Za-z0-9._-]{1,128}$")

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

access_log = logging.getLogger("access")
error_log = logging.getLogger("svckit.errors")


def current_request_id() -> str | None:
    return request_id_var.get()


def new_request_id() -> str:
    return uuid.uuid4().hex


def valid_request_id(value: bytes | str | None) -> str | None:
    if value is None:
        return None
    raw = value.encode("latin-1", "replace") if isinstance(value, str) else value
    return raw.decode("ascii") if _VALID.match(raw) else None


class RequestMiddleware:
    """Request id, access log and the 500 fallback; request metrics too when given the
    service's name. Outermost, so the fallback's 500 is counted and logged like any other."""

    def __init__(self, app: ASGIApp, service: str | None = None) -> None:
        self.app = app
        self.metrics = RequestMetrics(service) if service is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = None
        for key, value in scope["headers"]:
            if key == _HEADER_KEY:
                rid = valid_request_id(value)
                break
        rid = rid or new_request_id()
        token = request_id_var.set(rid)
        id_header = (_HEADER_KEY, rid.encode())
        status = 500
        started = False
        t0 = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != _HEADER_KEY]
                headers.append(id_header)
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:  # noqa: BLE001 - the last line of defence: log it, answer 500
            error_log.exception("unhandled error")
            if not started:
                await internal_error()(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - t0
            method = scope.get("method", "")
            if self.metrics is not None:
                self.metrics.record(method, route_template(scope), status, seconds)
            if access_log.isEnabledFor(logging.INFO):
                extra: dict[str, Any] = {
                    "method": method,
                    "path": scope.get("path"),
                    "status": status,
                    "duration_ms": round(seconds * 1000, 2),
                }
                # What access_log.info("request", extra=extra) does, without its walk up
                # the stack for the caller's file and line: they are these.
                frame = sys._getframe()
                code = frame.f_code
                access_log.handle(
                    access_log.makeRecord(
                        access_log.name,
                        logging.INFO,
                        code.co_filename,
                        frame.f_lineno,
                        "request",
                        (),
                        None,
                        code.co_name,
                        extra,
                    )
                )
            request_id_var.reset(token)
