"""Prometheus metrics: request counts and latency by route and status (pure ASGI), served
on each process's own port, never through the gateway.

With several uvicorn workers in one container, set PROMETHEUS_MULTIPROC_DIR: every worker
then writes its samples there and whichever worker owns the port serves all of them.
"""

from __future__ import annotations

import logging
import os
import time

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client import multiprocess as prom_multiprocess
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("svckit.metrics")

REQUESTS = Counter("http_requests_total", "HTTP requests", ["service", "method", "route", "status"])
LATENCY = Histogram(
    "http_request_duration_seconds",
    "HTTP request latency",
    ["service", "method", "route"],
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, service: str) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        t0 = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")  # the template, never raw ids
            method = scope.get("method", "")
            REQUESTS.labels(self.service, method, route, str(status)).inc()
            LATENCY.labels(self.service, method, route).observe(time.perf_counter() - t0)


_SCRAPE_TIME: list[Collector] = []


def register_collector(collector: Collector) -> None:
    """A collector that reads its values when scraped (a queue's length, say). It is served
    in multiprocess mode too, where the served registry holds only the workers' files."""
    REGISTRY.register(collector)
    _SCRAPE_TIME.append(collector)


def served_registry() -> CollectorRegistry | None:
    """What the metrics port serves: this process's registry (None), or with
    PROMETHEUS_MULTIPROC_DIR every worker's samples plus the scrape-time collectors."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return None
    registry = CollectorRegistry()
    prom_multiprocess.MultiProcessCollector(registry)
    for collector in _SCRAPE_TIME:
        registry.register(collector)
    return registry


def serve_metrics(port: int) -> None:
    """Expose this process's metrics on 0.0.0.0:port (0 disables). Safe to call once per process."""
    if not port:
        return
    registry = served_registry()
    # Containers listen on every interface (the scraper is elsewhere); `make run` sets
    # METRICS_BIND=127.0.0.1.
    addr = os.environ.get("METRICS_BIND", "0.0.0.0")  # noqa: S104  # nosec B104
    try:
        if registry is None:
            start_http_server(port, addr=addr)
        else:
            start_http_server(port, addr=addr, registry=registry)
    except OSError:
        # Another worker of this container owns the port (and serves everyone's samples).
        log.info("metrics port %d already served by a sibling process", port)
