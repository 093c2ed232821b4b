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
    database_url: str = "sqlite:///var/data/service.db"  # what the service connects with
    # Alembic connects as the role that owns the tables (empty: database_url, one file and no
    # roles on SQLite). The role of database_url is then granted only what the service needs.
    migration_database_url: str = ""
    # The role the migrations grant the service's privileges to (empty: database_url's user,
    # when migration_database_url is set).
    database_app_role: str = ""
    db_pool_size: int = 10
    db_max_overflow: int = 10
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
