"""Per-account login lockout in Redis: N failures in a row lock the account for a while.

Keyed by the (normalised) email, whatever IP the attempts come from, and applied to unknown
emails too, so a lockout says nothing about whether an account exists. If Redis is down
the check fails open (logins still work, the gateway's per-IP limit still applies) and
the error is logged: locking every user out because a cache is down is the worse failure.

An attempt reserves its slot atomically *before* the password is checked: a slot is free
only while the failures so far plus the checks in flight stay under the threshold. So N
wrong passwords sent at once get at most `threshold` bcrypt checks; the rest are refused
unchecked (429, retry in a second: the checks in flight decide whether the account locks).
Each check then settles its slot: a failure adds to the count and the one that reaches
the threshold sets the lock; a success resets the count. "In a row" is in the order the
checks finish, so a right password among the reserved attempts still works. A slot whose
check never settles (its process died) is dropped after `stale_s`.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from dataclasses import dataclass

import redis

log = logging.getLogger("auth.lockout")

# KEYS: failures, slots in flight, lock. ARGV: threshold, slot id, stale_s.
# Returns the lock's seconds left when locked, -1 when every slot is taken, 0 when reserved.
_RESERVE = """
local ttl = redis.call('TTL', KEYS[3])
if ttl ~= -2 then return math.max(ttl, 1) end
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', t - tonumber(ARGV[3]))
local failures = tonumber(redis.call('GET', KEYS[1]) or '0')
if failures + redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[1]) then return -1 end
redis.call('ZADD', KEYS[2], t, ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return 0
"""

# KEYS: failures, slots, lock. ARGV: threshold, slot id, lock seconds, failure window.
# Returns the lock's length when this failure locks the account, else 0.
_FAILED = """
redis.call('ZREM', KEYS[2], ARGV[2])
local n = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[4])
if n >= tonumber(ARGV[1]) then
  redis.call('SET', KEYS[3], '1', 'EX', ARGV[3], 'NX')
  redis.call('DEL', KEYS[1])
  return tonumber(ARGV[3])
end
return 0
"""

# KEYS: failures, slots, lock. ARGV: slot id. Returns the lock's seconds left if the account
# was locked meanwhile (the login is refused), else 0 after resetting the count.
_SUCCEEDED = """
redis.call('ZREM', KEYS[2], ARGV[1])
local ttl = redis.call('TTL', KEYS[3])
if ttl ~= -2 then return math.max(ttl, 1) end
redis.call('DEL', KEYS[1])
return 0
"""

BUSY_RETRY_S = 1  # every slot taken by checks in flight: they settle within a second


@dataclass(frozen=True)
class Attempt:
    """One login attempt's reservation. `retry_after` > 0: refused, check nothing."""

    keys: tuple[str, str, str]
    slot: str
    retry_after: int


class Lockout:
    def __init__(self, client: redis.Redis, *, threshold: int, seconds: int, stale_s: int = 30) -> None:
        self.redis = client
        self.threshold = threshold
        self.seconds = seconds
        self.stale_s = stale_s
        self._reserve = client.register_script(_RESERVE)
        self._failed = client.register_script(_FAILED)
        self._succeeded = client.register_script(_SUCCEEDED)

    @staticmethod
    def _keys(email: str) -> tuple[str, str, str]:
        digest = hashlib.sha256(email.encode("utf-8")).hexdigest()[:32]  # no PII in Redis keys
        # One hash tag: the three keys of an account share a Redis Cluster slot (one script).
        base = f"auth:login:{{{digest}}}"
        return f"{base}:fail", f"{base}:slots", f"{base}:lock"

    def reserve(self, email: str) -> Attempt:
        """Take a slot for one password check, or learn for how long to come back."""
        keys = self._keys(email)
        slot = uuid.uuid4().hex
        try:
            result = int(self._reserve(keys=keys, args=[self.threshold, slot, self.stale_s], client=self.redis))
        except redis.RedisError:
            log.error("lockout check skipped: Redis unavailable")
            return Attempt(keys, slot, 0)
        return Attempt(keys, slot, BUSY_RETRY_S if result < 0 else result)

    def failed(self, attempt: Attempt) -> int:
        """Count a failure; returns the lock's length when this failure locks the account."""
        args = [self.threshold, attempt.slot, self.seconds, self.seconds * 4]
        try:
            return int(self._failed(keys=attempt.keys, args=args, client=self.redis))
        except redis.RedisError:
            log.error("lockout count skipped: Redis unavailable")
            return 0

    def succeeded(self, attempt: Attempt) -> int:
        """Reset the count; returns the lock's seconds left if the account locked meanwhile."""
        try:
            return int(self._succeeded(keys=attempt.keys, args=[attempt.slot], client=self.redis))
        except redis.RedisError:
            log.error("lockout reset skipped: Redis unavailable")
            return 0

    def release(self, attempt: Attempt) -> None:
        """Give the slot back unsettled (the check itself failed, e.g. the database)."""
        try:
            self.redis.zrem(attempt.keys[1], attempt.slot)
        except redis.RedisError:
            log.error("lockout release skipped: Redis unavailable")
