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


class _Policy:
    """What both transports do around each call: stamp the request id, and decide whether a
    failed attempt is tried again (idempotent methods only)."""

    def __init__(self, retries: int, backoff_s: float) -> None:
        self.retries = retries
        self.backoff_s = backoff_s

    def attempts(self, request: httpx.Request) -> int:
        rid = current_request_id()
        if rid and REQUEST_ID_HEADER not in request.headers:
            request.headers[REQUEST_ID_HEADER] = rid
        return self.retries + 1 if request.method in _IDEMPOTENT else 1

    def retry(self, request: httpx.Request, outcome: httpx.Response | Exception, *, last: bool) -> bool:
        """Whether to try again after this outcome (a response, or a transport error)."""
        failed = isinstance(outcome, Exception) or outcome.status_code in _RETRY_STATUS
        if last or not failed:
            return False
        why = type(outcome).__name__ if isinstance(outcome, Exception) else outcome.status_code
        log.warning("retrying %s %s after %s", request.method, request.url, why)
        return True

    def backoff(self, attempt: int) -> float:
        return self.backoff_s * (2**attempt)


class _Transport(httpx.BaseTransport):
    def __init__(self, inner: httpx.BaseTransport, policy: _Policy) -> None:
        self.inner = inner
        self.policy = policy

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        attempts = self.policy.attempts(request)
        for attempt in range(attempts):
            try:
                response = self.inner.handle_request(request)
            except httpx.TransportError as exc:
                if not self.policy.retry(request, exc, last=attempt == attempts - 1):
                    raise
            else:
                if not self.policy.retry(request, response, last=attempt == attempts - 1):
                    return response
                response.close()
            time.sleep(self.policy.backoff(attempt))
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.inner.close()


class _AsyncTransport(httpx.AsyncBaseTransport):
    """_Transport for httpx.AsyncClient, under the same policy."""

    def __init__(self, inner: httpx.AsyncBaseTransport, policy: _Policy) -> None:
        self.inner = inner
        self.policy = policy

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        attempts = self.policy.attempts(request)
        for attempt in range(attempts):
            try:
                response = await self.inner.handle_async_request(request)
            except httpx.TransportError as exc:
                if not self.policy.retry(request, exc, last=attempt == attempts - 1):
                    raise
            else:
                if not self.policy.retry(request, response, last=attempt == attempts - 1):
                    return response
                await response.aclose()
            await asyncio.sleep(self.policy.backoff(attempt))
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        await self.inner.aclose()


def _client_settings(service_token: str | None, timeout_s: float) -> dict[str, Any]:
    return {
        "headers": {SERVICE_TOKEN_HEADER: service_token} if service_token else {},
        "timeout": httpx.Timeout(timeout_s, connect=min(timeout_s, 1.0)),
    }


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
    return httpx.AsyncClient(
        base_url=base_url,
        transport=_AsyncTransport(transport or httpx.AsyncHTTPTransport(), _Policy(retries, backoff_s)),
        **_client_settings(service_token, timeout_s),
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
    return httpx.Client(
        base_url=base_url,
        transport=_Transport(transport or httpx.HTTPTransport(), _Policy(retries, backoff_s)),
        **_client_settings(service_token, timeout_s),
        **kwargs,
    )
