"""The one way services call each other: httpx with timeouts, bounded retries, credentials.

Every outgoing call carries the service credential and the current request id. Retries are
bounded and only for idempotent methods, on connection errors, timeouts and 502/503/504.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import httpx

from svckit.requestid import HEADER as REQUEST_ID_HEADER
from svckit.requestid import current_request_id

SERVICE_TOKEN_HEADER = "X-Service-Token"  # nosec B105
_RETRY_STATUS = {502, 503, 504}
_IDEMPOTENT = {"GET", "HEAD", "OPTIONS", "PUT", "DELETE"}

log = logging.getLogger("svckit.http")


class ServiceUnavailable(Exception):
    """A dependency did not answer usefully within the timeout and retry budget."""


class _Transport(httpx.BaseTransport):
    def __init__(self, inner: httpx.BaseTransport, retries: int, backoff_s: float) -> None:
        self.inner = inner
        self.retries = retries
        self.backoff_s = backoff_s

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        rid = current_request_id()
        if rid and REQUEST_ID_HEADER not in request.headers:
            request.headers[REQUEST_ID_HEADER] = rid
        attempts = self.retries + 1 if request.method in _IDEMPOTENT else 1
        for attempt in range(attempts):
            last = attempt == attempts - 1
            try:
                response = self.inner.handle_request(request)
            except httpx.TransportError as exc:
                if last:
                    raise
                log.warning("retrying %s %s after %s", request.method, request.url, type(exc).__name__)
            else:
                if response.status_code not in _RETRY_STATUS or last:
                    return response
                response.close()
                log.warning("retrying %s %s after %s", request.method, request.url, response.status_code)
            time.sleep(self.backoff_s * (2**attempt))
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.inner.close()


class _AsyncTransport(httpx.AsyncBaseTransport):
    """_Transport's policy for httpx.AsyncClient: the same headers, retries and backoff."""

    def __init__(self, inner: httpx.AsyncBaseTransport, retries: int, backoff_s: float) -> None:
        self.inner = inner
        self.retries = retries
        self.backoff_s = backoff_s

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        rid = current_request_id()
        if rid and REQUEST_ID_HEADER not in request.headers:
            request.headers[REQUEST_ID_HEADER] = rid
        attempts = self.retries + 1 if request.method in _IDEMPOTENT else 1
        for attempt in range(attempts):
            last = attempt == attempts - 1
            try:
                response = await self.inner.handle_async_request(request)
            except httpx.TransportError as exc:
                if last:
                    raise
                log.warning("retrying %s %s after %s", request.method, request.url, type(exc).__name__)
            else:
                if response.status_code not in _RETRY_STATUS or last:
                    return response
                await response.aclose()
                log.warning("retrying %s %s after %s", request.method, request.url, response.status_code)
            await asyncio.sleep(self.backoff_s * (2**attempt))
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        await self.inner.aclose()


def async_service_client(
    base_url: str,
    *,
    service_token: str | None = None,
    timeout_s: float = 3.0,
    retries: int = 2,
    backoff_s: float = 0.05,
    transport: httpx.AsyncBaseTransport | None = None,
    **kwargs: Any,
) -> httpx.AsyncClient:
    """service_client for code on the event loop (async routes)."""
    headers = {SERVICE_TOKEN_HEADER: service_token} if service_token else {}
    return httpx.AsyncClient(
        base_url=base_url,
        headers=headers,
        timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 1.0)),
        transport=_AsyncTransport(transport or httpx.AsyncHTTPTransport(), retries, backoff_s),
        **kwargs,
    )


def service_client(
    base_url: str,
    *,
    service_token: str | None = None,
    timeout_s: float = 3.0,
    retries: int = 2,
    backoff_s: float = 0.05,
    transport: httpx.BaseTransport | None = None,
    **kwargs: Any,
) -> httpx.Client:
    """A sync client for calls to another service (used from sync routes and workers)."""
    headers = {SERVICE_TOKEN_HEADER: service_token} if service_token else {}
    return httpx.Client(
        base_url=base_url,
        headers=headers,
        timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 1.0)),
        transport=_Transport(transport or httpx.HTTPTransport(), retries, backoff_s),
        **kwargs,
    )
