"""Settings base shared by every service: read from the environment, defaults run locally."""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class BaseServiceSettings(BaseSettings):
    """Common knobs. Each service subclasses it with its own `env_prefix`.

    Every value is read with the service's prefix (`AUTH_REDIS_URL`, `WALLET_REDIS_URL`):
    the launcher and compose set them, so each service can point elsewhere if ops want.
    """

    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False)

    log_level: str = "INFO"
    database_url: str = "sqlite:///var/data/service.db"
    db_pool_size: int = 10
    db_max_overflow: int = 10
    # Postgres session limits (svckit.db.SessionLimits; 0 turns one off). A booking holds its
    # row locks for a round trip and a commit, so a lock still taken after 2 s has a stuck
    # holder, not a busy one: answer (503, retry) instead of tying up a worker thread.
    db_lock_timeout_ms: int = Field(default=2_000, ge=0)
    # No request statement comes near this (reads walk indexes); it ends a runaway one well
    # inside the wallet's idempotency lock TTL (30 s).
    db_statement_timeout_ms: int = Field(default=10_000, ge=0)
    # Nothing waits inside a transaction (HTTP calls happen outside one), so a session idle
    # in one this long has lost its client: end it, and release its locks.
    db_idle_in_transaction_timeout_ms: int = Field(default=30_000, ge=0)
    db_connect_timeout_s: int = Field(default=5, ge=1)
    redis_url: str = Field(default="redis://127.0.0.1:8190/0")
    service_token: SecretStr = Field(default=SecretStr("local-dev-service-token"))
    jwt_issuer: str = "wallet-platform-auth"
    jwt_audience: str = "wallet-platform"
    auth_url: str = "http://127.0.0.1:8101"
    http_timeout_s: float = 3.0
    http_retries: int = 2
    metrics_port: int = 0  # Prometheus metrics on this port (0: off); never routed by the gateway
    relay_metrics_port: int = 0  # the same, for this service's outbox relay process
    # An outbox message not confirmed delivered this long after publishing is published again.
    outbox_republish_after_s: float = 60.0
