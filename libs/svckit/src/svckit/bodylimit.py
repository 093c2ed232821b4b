"""Request bodies are capped: a larger one answers a 413 problem before it is read in full.

Pure ASGI, like the other middlewares. A declared `Content-Length` over the cap is refused
before a byte of the body is read; a body without one (chunked) is counted as it streams
in, and the first chunk past the cap ends the read. Whatever the app made of the cut-off
body (FastAPI turns a failed read into a 400) is replaced by the 413.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from svckit.problems import problem_response

DEFAULT_MAX_BODY_BYTES = 64 * 1024
_CONTENT_LENGTH = b"content-length"


class PayloadTooLarge(HTTPException):
    """Raised from `receive` once the body passes the cap, so the app stops reading."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, detail=too_large_detail(max_bytes))


def too_large_detail(max_bytes: int) -> str:
    return f"The request body is larger than {max_bytes} bytes."


def declared_length(scope: Scope) -> int | None:
    for key, value in scope["headers"]:
        if key == _CONTENT_LENGTH:
            return int(value) if value.isdigit() else None  # the server refuses a malformed one
    return None


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, *, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be positive")
        self.app = app
        self.max_bytes = max_bytes

    async def refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = problem_response(413, "payload_too_large", "Payload too large", too_large_detail(self.max_bytes))
        await response(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = declared_length(scope)
        if length is not None and length > self.max_bytes:
            await self.refuse(scope, receive, send)
            return
        received = 0
        exceeded = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            if exceeded:
                raise PayloadTooLarge(self.max_bytes)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    raise PayloadTooLarge(self.max_bytes)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded and not started:
                return  # the app's answer to a cut-off body; the 413 below replaces it
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except PayloadTooLarge:
            if started:  # a response was already streaming: nothing better to say
                return
        if exceeded and not started:
            await self.refuse(scope, receive, send)
