"""Auth service app factory: `uvicorn auth.main:create_app --factory`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from auth.config import Settings, get_settings
from auth.keys import KeyRing, NoSigningKey
from auth.lockout import Lockout
from auth.ratelimit import IpRateLimit
from auth.routes import internal, router
from auth.security import PasswordHasher, TokenIssuer
from svckit.app import add_health_routes, base_app
from svckit.db import SessionLimits, make_engine
from svckit.jwt import JWKSVerifier
from svckit.metrics import serve_metrics
from svckit.redis import redis_client

log = logging.getLogger("auth")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    settings.require_service_token()  # auth checks the credential: never a guessable one

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Connections are made here, at start-up, never at import time.
        state = app.state
        state.settings = settings
        state.engine = make_engine(
            settings.database_url,
            pool_size=settings.db_pool_size,
            max_overflow=settings.db_max_overflow,
            limits=SessionLimits.from_settings(settings),
        )
        state.redis = redis_client(settings.redis_url, decode_responses=True)
        state.keys = KeyRing(settings.keys_dir, settings.access_token_ttl_s)
        try:
            state.keys.current()  # create the first key on first run (in a writable folder)
        except NoSigningKey as exc:  # uvicorn then stops: say why in one line first
            log.critical("cannot start: %s", exc)
            raise
        state.hasher = PasswordHasher(settings.bcrypt_rounds)
        state.issuer = TokenIssuer(
            state.keys, issuer=settings.jwt_issuer, audience=settings.jwt_audience, ttl_s=settings.access_token_ttl_s
        )
        # Auth verifies its own tokens with the same code as everyone, reading keys locally.
        state.verifier = JWKSVerifier(
            state.keys.jwks,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            ttl_s=5,
            min_refresh_s=0,
            max_lifetime_s=settings.jwt_max_lifetime_s,
        )
        state.lockout = Lockout(state.redis, threshold=settings.lockout_threshold, seconds=settings.lockout_seconds)
        state.token_rate = IpRateLimit(
            state.redis,
            name="token",
            average=settings.token_rate_average,
            burst=settings.token_rate_burst,
            depth=settings.client_ip_depth,
        )
        serve_metrics(settings.metrics_port)
        yield
        state.redis.close()
        state.engine.dispose()

    app = base_app("auth", log_level=settings.log_level, max_body_bytes=settings.max_body_bytes, lifespan=lifespan)
    app.include_router(router)
    app.include_router(internal)
    # Logins and signups work without Redis (the lockout fails open, see auth.lockout; the
    # gateway's per-IP limit still applies): Redis down is degraded, not unready. Taking
    # every auth replica out of the Service for it would stop logins and the wallet's JWKS.
    add_health_routes(app, optional={"redis"})
    return app
