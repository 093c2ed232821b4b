from __future__ import annotations

from functools import lru_cache

from pydantic_settings import SettingsConfigDict

from svckit.settings import BaseServiceSettings


class Settings(BaseServiceSettings):
    model_config = SettingsConfigDict(env_prefix="WALLET_", extra="ignore")

    database_url: str = "sqlite:///var/data/wallet.db"


@lru_cache
def get_settings() -> Settings:
    return Settings()
