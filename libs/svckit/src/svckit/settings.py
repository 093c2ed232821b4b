"""Settings base shared by every service: read from the environment, defaults run locally."""

from __future__ import annotations

import hmac

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_SERVICE_TOKEN = "local-dev-service-token"  # nosec B105 - the published dev default, refused outside dev
MIN_SERVICE_TOKEN_LENGTH = 32
# Emails the outbox relay puts in one notifier message by default: the setting's default
# and svckit.outbox's (Publisher, serve), so a relay built without the setting batches alike.
OUTBOX_EMAILS_PER_MESSAGE = 10


class InsecureServiceToken(RuntimeError):
    """The configured service credential is empty, short or a published placeholder."""


class BaseServiceSettings(BaseSettings):
    """Common knobs. Each service subclasses it with its own `env_prefix`.

    Every value is read with the service's prefix (`AUTH_REDIS_URL`, `WALLET_REDIS_URL`):
    the launcher and compose set them, so each service can point elsewhere if ops want.
    """

    # hide_input_in_errors: a refused setting never prints the values read (secrets among them).
    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False, hide_input_in_errors=True)

    log_level: str = "INFO"
    database_url: str = "sqlite:///var/data/service.db"  # what the service connects with
    # Alembic connects as the role that owns the tables (empty: database_url, one file and no
    # roles on SQLite). The role of database_url is then granted only what the service needs.
    migration_database_url: str = ""
    # The role the migrations grant the service's privileges to (empty: database_url's user,
    # when migration_database_url is set).
    database_app_role: str = ""
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
    # The credential of internal calls. Outside dev it must be at least 32 characters and no
    # placeholder; *_ALLOW_DEV_SERVICE_TOKEN=true (a service run by hand) accepts any
    # non-empty one, the published default included. `make run` generates a random one.
    service_token: SecretStr = Field(default=SecretStr(DEV_SERVICE_TOKEN))
    allow_dev_service_token: bool = False
    jwt_issuer: str = "wallet-platform-auth"
    jwt_audience: str = "wallet-platform"
    # Verifiers refuse an access token whose lifetime (exp - iat) is longer than this, so a
    # stolen signing key or a misconfigured issuer cannot mint long-lived tokens.
    jwt_max_lifetime_s: int = Field(default=3600, ge=60)
    auth_url: str = "http://127.0.0.1:8101"
    http_timeout_s: float = 3.0
    http_retries: int = 2
    max_body_bytes: int = Field(default=65536, gt=0)  # larger request bodies answer 413
    metrics_port: int = 0  # Prometheus metrics on this port (0: off); never routed by the gateway
    relay_metrics_port: int = 0  # the same, for this service's outbox relay process
    # The relay touches this file after each round; `<service>-relay alive` checks its age
    # (empty: /tmp/<service>-relay.alive; svckit.heartbeat).
    relay_heartbeat_file: str = ""
    # An outbox message not confirmed delivered this long after publishing is published again.
    outbox_republish_after_s: float = 60.0
    # Emails the relay puts in one notifier message (svckit.outbox.Publisher); 1: one each.
    outbox_emails_per_message: int = Field(default=OUTBOX_EMAILS_PER_MESSAGE, ge=1, le=100)
    # `<service>-purge` (svckit.retention): rows per transaction, the pause between two, and
    # how long an outbox row stays after the notifier confirmed its email sent.
    retention_batch_size: int = Field(default=1_000, ge=1, le=10_000)
    retention_pause_ms: int = Field(default=20, ge=0)
    retention_outbox_age_s: int = Field(default=7 * 86_400, ge=0)

    def require_service_token(self) -> None:
        """Refuse to start with a guessable service credential (called by every service's start-up).

        Not a validator: migrations and relays read these settings too and need no token."""
        token = self.service_token.get_secret_value()
        if not token:
            raise InsecureServiceToken("SERVICE_TOKEN is empty")
        if self.allow_dev_service_token:
            return
        placeholder = token == DEV_SERVICE_TOKEN or "change-me" in token.lower() or "changeme" in token.lower()
        if placeholder or len(token) < MIN_SERVICE_TOKEN_LENGTH:
            raise InsecureServiceToken(
                f"SERVICE_TOKEN must be a random secret of at least {MIN_SERVICE_TOKEN_LENGTH} characters, "
                "not the default or a placeholder (ALLOW_DEV_SERVICE_TOKEN=true accepts it for local runs)"
            )

    def accepts_service_token(self, presented: str | None) -> bool:
        """Whether a presented service credential is ours: constant-time, never for empty ones."""
        expected = self.service_token.get_secret_value()
        if not presented or not expected:
            return False
        return hmac.compare_digest(presented.encode("utf-8"), expected.encode("utf-8"))
