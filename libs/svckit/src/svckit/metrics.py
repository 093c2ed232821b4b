"""Prometheus metrics: request counts and latency by route and status (pure ASGI), served
on each process's own port, never through the gateway.

With several uvicorn workers in one container, set PROMETHEUS_MULTIPROC_DIR: every worker
then writes its samples there and whichever worker owns the port serves all of them.

prometheus_client writes into that folder as soon as a metric has a value (an unlabelled
one at its construction, so at import) and fails when the folder is missing. Who makes it:
a multi-process program's parent, before its workers start (the Dockerfiles' CMD: emptied
and created, as uvicorn's workers share it); a single-process one (the relays) itself at
start, prepare_metrics_dir(sole_writer=True); every other program that writes metrics
creates it if missing, without removing anything (ensure_metrics_dir).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

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


class RequestMetrics:
    """Records one request in REQUESTS and LATENCY, by route template (never raw ids).

    The labelled children are looked up once per (method, route, status) and kept: a
    `.labels()` call costs more than the increment. They are as many as prometheus_client
    keeps anyway, one per label set seen."""

    def __init__(self, service: str) -> None:
        self.service = service
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def record(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        children = self._children.get(key)
        if children is None:
            children = (
                REQUESTS.labels(self.service, method, route, str(status)),
                LATENCY.labels(self.service, method, route),
            )
            self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)


def route_template(scope: Scope) -> str:
    """The path template of the route that answered ("unmatched" when none did)."""
    return getattr(scope.get("route"), "path", "unmatched")


class MetricsMiddleware:
    """Request metrics alone (base_app counts them in its RequestMiddleware instead)."""

    def __init__(self, app: ASGIApp, service: str) -> None:
        self.app = app
        self.metrics = RequestMetrics(service)

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
            self.metrics.record(scope.get("method", ""), route_template(scope), status, time.perf_counter() - t0)


def ensure_metrics_dir() -> Path | None:
    """Create PROMETHEUS_MULTIPROC_DIR if it is set and missing (never removing anything:
    sibling processes may be writing there). Returns the folder, None without one."""
    configured = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not configured:
        return None
    folder = Path(configured)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def prepare_metrics_dir(*, sole_writer: bool) -> Path | None:
    """ensure_metrics_dir, and for a program that runs as one process (a relay), remove the
    files an earlier process with this pid left: in a container the program is pid 1 after
    every restart, and prometheus_client would carry on from that file's values. Files of
    other pids stay (their counters still add up, and a folder may be shared: the chaos
    tests' stack runs every process on one). Call it before any metric has a value in this process: a file removed
    under an open metric loses what it records. uvicorn workers must not call this with
    sole_writer=True (their parent's CMD empties the folder once, before they start)."""
    folder = ensure_metrics_dir()
    if folder is not None and sole_writer:
        for stale in folder.glob(f"*_{os.getpid()}.db"):
            stale.unlink(missing_ok=True)
    return folder


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
    ensure_metrics_dir()  # its samples are written there even when nobody serves them here
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
