"""The frame every service's FastAPI app is built in: errors, request ids, logs, health."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from typing import Any

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy import text

from svckit.bodylimit import DEFAULT_MAX_BODY_BYTES, BodyLimitMiddleware
from svckit.db import READ_ONLY
from svckit.heap import settled_heap
from svckit.logging import configure_logging
from svckit.problems import document_problems, install_problem_handlers
from svckit.requestid import RequestMiddleware

HealthCheck = Callable[[], None] | Callable[[], Awaitable[None]]  # async ones run on the event loop


def base_app(
    service: str,
    *,
    log_level: str,
    version: str = "0.1.0",
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    **kwargs: Any,
) -> FastAPI:
    """A FastAPI app with our plumbing. Docs are served once, for all services, by the gateway.

    Request bodies over `max_body_bytes` answer a 413 problem before they are read in full."""
    configure_logging(service, log_level)
    kwargs["lifespan"] = _settling(kwargs.get("lifespan"))
    app = FastAPI(title=f"{service} service", version=version, docs_url=None, redoc_url=None, **kwargs)
    install_problem_handlers(app)
    document_problems(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)  # its 413 is counted, with an id
    # Outermost: request id, metrics and the access log, its 500 fallback counted too.
    app.add_middleware(RequestMiddleware, service=service)
    return app


def _settling(lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]] | None) -> Callable[..., Any]:
    """The service's lifespan, its heap settled before the first request (settled_heap)."""

    @asynccontextmanager
    async def settled(app: FastAPI) -> AsyncIterator[None]:
        async with lifespan(app) if lifespan is not None else nullcontext():
            with settled_heap():
                yield

    return settled


def add_health_routes(
    app: FastAPI, checks: dict[str, HealthCheck] | None = None, *, optional: Collection[str] = ()
) -> None:
    """`/healthz` (the process answers) and `/readyz` (its dependencies answer). Internal only.

    By default readiness checks `app.state.engine` (the database) and `app.state.redis`.
    A failing check named in `optional` (a dependency the service works without) leaves
    the service ready: 200 with `"status": "degraded"` and the check in `degraded`. Any
    other failing check answers 503 `"status": "unavailable"`.
    """

    def database() -> None:
        with app.state.engine.connect() as conn:
            conn.execution_options(**READ_ONLY).execute(text("SELECT 1"))

    def redis_ping() -> None:
        app.state.redis.ping()

    checks = checks if checks is not None else {"database": database, "redis": redis_ping}
    unknown = set(optional) - set(checks)
    if unknown:
        raise ValueError(f"optional health checks that do not exist: {sorted(unknown)}")

    # On the event loop: a worker-thread pool full of slow requests must not fail liveness.
    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        results: dict[str, str] = {}
        for name, check in checks.items():
            try:
                if inspect.iscoroutinefunction(check):
                    await check()
                else:
                    await run_in_threadpool(check)
                results[name] = "ok"
            except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
                results[name] = type(exc).__name__
        failed = [name for name, result in results.items() if result != "ok"]
        degraded = [name for name in failed if name in optional]
        ready = len(degraded) == len(failed)
        status = "unavailable" if not ready else "degraded" if degraded else "ok"
        body = {"status": status, "checks": results, "degraded": degraded}
        return JSONResponse(body, 200 if ready else 503)
