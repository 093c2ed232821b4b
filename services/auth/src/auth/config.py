from __future__ import annotations

from functools import lru_cache

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from svckit.settings import BaseServiceSettings


class Settings(BaseServiceSettings):
    model_config = SettingsConfigDict(env_prefix="AUTH_", extra="ignore")

    database_url: str = "sqlite:///var/data/auth.db"
    keys_dir: str = "var/keys"
    access_token_ttl_s: int = 900
    bcrypt_rounds: int = 12
    # Ten failures in a row lock an account's logins for 15 minutes: at most 40 an hour,
    # inside OWASP ASVS 2.2.1's "no more than 100 failed attempts per hour".
    lockout_threshold: int = 10
    lockout_seconds: int = 900
    # POST /token per client IP (auth.ratelimit): `average` a second, `burst` at once. The
    # client is the gateway's peer, or `client_ip_depth` X-Forwarded-For entries left of it.
    token_rate_average: int = Field(default=20, ge=1)
    token_rate_burst: int = Field(default=40, ge=1)
    client_ip_depth: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _tokens_outlive_no_verifier(self) -> Settings:
        # Every verifier refuses a lifetime over jwt_max_lifetime_s: issuing longer tokens
        # would log everybody out at once, so refuse to start instead.
        if self.access_token_ttl_s > self.jwt_max_lifetime_s:
            raise ValueError("AUTH_ACCESS_TOKEN_TTL_S must not exceed AUTH_JWT_MAX_LIFETIME_S")
        return self


@lru_cache
def get_settings() -> Settings:
    return Settings()
