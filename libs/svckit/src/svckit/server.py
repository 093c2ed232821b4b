"""The HTTP protocol the services run under uvicorn: `uvicorn --http svckit.server:HttpProtocol`.

uvicorn's httptools protocol, with one change: what it writes to a connection in one turn
of the event loop goes out in one write. uvicorn writes a response's status line and
headers when the app sends `http.response.start`, and its body with `http.response.body`,
each at once: two system calls, and two segments for the gateway to read, for every small
JSON answer. Here they are joined and written at the end of the turn (or at once when the
connection closes), so a response the app sends in one go is one write.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class _TurnBuffer:
    """A transport whose writes are joined until the end of the turn; all else delegated."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        self._size = 0

    def write(self, data: bytes) -> None:
        if self._size + len(data) > HIGH_WATER_LIMIT:
            # A large turn goes through at once, so the transport's flow control
            # (pause_writing, uvicorn's drain) still holds the app back.
            self._flush()
            if not self._transport.is_closing():
                self._transport.write(data)
            return
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(data)
        self._size += len(data)

    def _flush(self) -> None:
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        self._size = 0
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self._flush()  # what was written before the close is sent before the FIN
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class HttpProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_TurnBuffer(transport, self.loop))  # type: ignore[arg-type]

    def eof_received(self) -> None:
        # The transport closes itself after this: what this turn wrote goes first.
        self.transport._flush()  # type: ignore[attr-defined]
