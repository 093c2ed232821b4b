from __future__ import annotations

from functools import lru_cache

from pydantic import SecretStr
from pydantic_settings import SettingsConfigDict

from svckit.settings import BaseServiceSettings


class Settings(BaseServiceSettings):
    model_config = SettingsConfigDict(env_prefix="NOTIFIER_", extra="ignore")

    # Without an API key (the local default) emails are written to `outbox_dir` instead.
    brevo_api_key: SecretStr = SecretStr("")
    brevo_base_url: str = "https://api.brevo.com"
    brevo_timeout_s: float = 10.0
    sender_email: str = "no-reply@wallet.example"
    sender_name: str = "Wallet"
    outbox_dir: str = "var/outbox"
    # Retries: exponential backoff with jitter between these bounds, then the dead-letter queue.
    max_retries: int = 8
    min_backoff_ms: int = 1_000
    max_backoff_ms: int = 300_000
    # A worker that stops heart-beating for this long has its unacknowledged messages
    # redelivered to the others (a worker killed mid-send).
    heartbeat_timeout_ms: int = 60_000
    # Per million broker commands, how many also run queue maintenance (which is what
    # redelivers a dead worker's messages). Dramatiq's default (1,000) can take many
    # minutes on a quiet queue; maintenance is cheap.
    maintenance_chance: int = 50_000
    dead_message_ttl_ms: int = 30 * 24 * 3600 * 1000
    sent_marker_ttl_s: int = 30 * 24 * 3600


@lru_cache
def get_settings() -> Settings:
    return Settings()
