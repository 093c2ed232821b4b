"""Wallet service app factory: `uvicorn wallet.main:create_app --factory`.

Everything on the event loop: the database through svckit.aiodb (asyncpg on Postgres,
sqlite3 in process for the default SQLite file), Redis through redis.asyncio, the auth service
through httpx.AsyncClient. No movement waits for a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from svckit.aiodb import make_database, transaction
from svckit.app import add_health_routes, base_app
from svckit.db import SessionLimits
from svckit.http import async_service_client, service_client
from svckit.jwt import JWKSVerifier, http_jwks_source
from svckit.metrics import serve_metrics
from svckit.problems import problem_response
from svckit.redis import async_redis_client
from wallet import extension_routes, holds, service
from wallet.config import Settings, get_settings
from wallet.errors import WalletBusy
from wallet.idempotency import IdempotencyCache, timed_out
from wallet.movements import Movements
from wallet.routes import MONEY_PATHS, require_idempotency_key_in_docs, router
from wallet.uow import UnitOfWork

_PING = text("SELECT 1")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    settings.require_service_token()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = app.state
        state.settings = settings
        limits = SessionLimits.from_settings(settings)
        pool = {"pool_size": settings.db_pool_size, "max_overflow": settings.db_max_overflow, "limits": limits}
        state.db = await make_database(settings.database_url, **pool)
        replica = await make_database(settings.read_database_url, **pool) if settings.read_database_url else None
        state.redis = async_redis_client(settings.redis_url)
        state.auth_client = async_service_client(
            settings.auth_url,
            service_token=settings.service_token.get_secret_value(),
            timeout_s=settings.http_timeout_s,
            retries=settings.http_retries,
        )
        # Tokens are checked locally against the auth service's JWKS (fetched, cached; the
        # first check of a token, which may fetch them, runs in a worker thread: svckit.deps).
        jwks_client = service_client(
            settings.auth_url,
            service_token=settings.service_token.get_secret_value(),
            timeout_s=settings.http_timeout_s,
            retries=settings.http_retries,
        )
        state.verifier = JWKSVerifier(
            http_jwks_source("/.well-known/jwks.json", jwks_client),
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            max_lifetime_s=settings.jwt_max_lifetime_s,
        )
        idempotency = IdempotencyCache(
            state.redis, ttl_s=settings.idempotency_ttl_s, lock_ttl_ms=settings.idempotency_lock_ttl_ms
        )
        state.system_wallets = await service.ensure_system_wallets(
            state.db, settings.currency_set, shards=settings.system_wallet_shards
        )
        movements = Movements(
            state.db,
            max_batch=settings.batch_max_movements,
            in_flight=settings.batches_in_flight,
            # With the stalled ones: at most four times as many, leaving a pooled connection free.
            max_batches=min(4 * settings.batches_in_flight, settings.db_pool_size + settings.db_max_overflow - 1),
            max_wait_s=(limits.lock_timeout_ms / 1000) if limits.lock_timeout_ms else None,
        )
        state.uow = UnitOfWork(
            state.db,
            idempotency,
            state.system_wallets,
            retries=settings.db_retries,
            replica=replica,
            movements=movements,
        )
        serve_metrics(settings.metrics_port)
        sweeper = (
            asyncio.create_task(holds.sweep_forever(state.uow, interval_s=settings.hold_sweep_interval_s))
            if settings.hold_sweep_interval_s > 0
            else None
        )
        yield
        if sweeper is not None:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
        jwks_client.close()
        await state.auth_client.aclose()
        await state.redis.aclose()
        await state.db.dispose()
        if replica is not None:
            await replica.dispose()

    async def database() -> None:
        async with transaction(app.state.db, read_only=True) as conn:
            await conn.execute(_PING)

    async def redis_ping() -> None:
        await app.state.redis.ping()

    async def replica() -> None:
        async with transaction(app.state.uow.reads, read_only=True) as conn:
            await conn.execute(_PING)

    app = base_app("wallet", log_level=settings.log_level, max_body_bytes=settings.max_body_bytes, lifespan=lifespan)
    app.include_router(router)
    app.include_router(extension_routes.router)  # after: /transaction/history before /transaction/{id}
    app.add_exception_handler(OperationalError, _database_busy)
    require_idempotency_key_in_docs(app, MONEY_PATHS)
    require_idempotency_key_in_docs(app, extension_routes.MONEY_PATHS)
    # Money moves without Redis (idempotency falls back to the database's unique key, see
    # wallet.idempotency): Redis down is degraded, not unready. Only the database is required.
    # A replica down fails history and ledgers only: degraded, like Redis.
    checks = {"database": database, "redis": redis_ping}
    if settings.read_database_url:
        checks["replica"] = replica
    add_health_routes(app, checks, optional=set(checks) - {"database"})
    return app


async def _database_busy(_: Request, exc: Exception) -> JSONResponse:
    """Outside the movements (which map it themselves), a lock or statement timeout, as when
    closing a locked wallet, is the same retryable 503: its transaction rolled back."""
    if not (isinstance(exc, OperationalError) and timed_out(exc)):
        raise exc
    busy = WalletBusy()
    return problem_response(busy.status, busy.code, busy.title, busy.detail, headers=busy.headers)
