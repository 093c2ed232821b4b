"""Per-account login lockout in Redis: N failures in a row lock the account for a while.

Keyed by the (normalised) email, whatever IP the attempts come from, and applied to unknown
emails too, so a lockout says nothing about whether an account exists. If Redis is down
the check fails open (logins still work, the gateway's per-IP limit still applies) and
the error is logged: locking every user out because a cache is down is the worse failure.
"""

from __future__ import annotations

import hashlib
import logging

import redis

log = logging.getLogger("auth.lockout")


class Lockout:
    def __init__(self, client: redis.Redis, *, threshold: int, seconds: int) -> None:
        self.redis = client
        self.threshold = threshold
        self.seconds = seconds

    @staticmethod
    def _keys(email: str) -> tuple[str, str]:
        digest = hashlib.sha256(email.encode("utf-8")).hexdigest()[:32]  # no PII in Redis keys
        return f"auth:login:fail:{digest}", f"auth:login:lock:{digest}"

    def locked_for(self, email: str) -> int:
        """Seconds left on the account's lock (0 when not locked)."""
        _, lock = self._keys(email)
        try:
            ttl = int(self.redis.ttl(lock))  # type: ignore[arg-type]
        except redis.RedisError:
            log.error("lockout check skipped: Redis unavailable")
            return 0
        return max(ttl, 0)

    def failed(self, email: str) -> int:
        """Count a failure; returns the lock's length when this failure locks the account."""
        fail, lock = self._keys(email)
        try:
            pipe = self.redis.pipeline()
            pipe.incr(fail)
            pipe.expire(fail, self.seconds * 4)
            count = int(pipe.execute()[0])
            if count >= self.threshold:
                pipe = self.redis.pipeline()
                pipe.set(lock, 1, ex=self.seconds)
                pipe.delete(fail)
                pipe.execute()
                return self.seconds
        except redis.RedisError:
            log.error("lockout count skipped: Redis unavailable")
        return 0

    def succeeded(self, email: str) -> None:
        fail, _ = self._keys(email)
        try:
            self.redis.delete(fail)
        except redis.RedisError:
            log.error("lockout reset skipped: Redis unavailable")
