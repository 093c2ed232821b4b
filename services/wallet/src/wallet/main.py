"""Wallet service app factory: `uvicorn wallet.main:create_app --factory`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from sqlmodel import Session

from svckit.app import add_health_routes, base_app
from svckit.db import SessionLimits, make_engine
from svckit.http import service_client
from svckit.jwt import JWKSVerifier, http_jwks_source
from svckit.metrics import serve_metrics
from svckit.problems import problem_response
from svckit.redis import redis_client
from wallet import service
from wallet.config import Settings, get_settings
from wallet.errors import WalletBusy
from wallet.idempotency import IdempotencyCache, timed_out
from wallet.routes import require_idempotency_key_in_docs, router


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    settings.require_service_token()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = app.state
        state.settings = settings
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.worker_threads
        state.engine = make_engine(
            settings.database_url,
            pool_size=settings.db_pool_size,
            max_overflow=settings.db_max_overflow,
            limits=SessionLimits.from_settings(settings),
        )
        state.redis = redis_client(settings.redis_url)
        state.auth_client = service_client(
            settings.auth_url,
            service_token=settings.service_token.get_secret_value(),
            timeout_s=settings.http_timeout_s,
            retries=settings.http_retries,
        )
        # Tokens are checked locally against the auth service's JWKS (fetched, cached).
        state.verifier = JWKSVerifier(
            http_jwks_source("/.well-known/jwks.json", state.auth_client),
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            max_lifetime_s=settings.jwt_max_lifetime_s,
        )
        state.idempotency = IdempotencyCache(
            state.redis, ttl_s=settings.idempotency_ttl_s, lock_ttl_ms=settings.idempotency_lock_ttl_ms
        )
        with Session(state.engine) as session:
            state.system_wallets = service.ensure_system_wallets(
                session, settings.currency_set, shards=settings.system_wallet_shards
            )
        serve_metrics(settings.metrics_port)
        yield
        state.auth_client.close()
        state.redis.close()
        state.engine.dispose()

    app = base_app("wallet", log_level=settings.log_level, max_body_bytes=settings.max_body_bytes, lifespan=lifespan)
    app.include_router(router)
    app.add_exception_handler(OperationalError, _database_busy)
    require_idempotency_key_in_docs(app)
    # Money moves without Redis (idempotency falls back to the database's unique key, see
    # wallet.idempotency): Redis down is degraded, not unready. Only the database is required.
    add_health_routes(app, optional={"redis"})
    return app


async def _database_busy(_: Request, exc: Exception) -> JSONResponse:
    """Outside the movements (which map it themselves), a lock or statement timeout, as when
    closing a locked wallet, is the same retryable 503: its transaction rolled back."""
    if not (isinstance(exc, OperationalError) and timed_out(exc)):
        raise exc
    busy = WalletBusy()
    return problem_response(busy.status, busy.code, busy.title, busy.detail, headers=busy.headers)
