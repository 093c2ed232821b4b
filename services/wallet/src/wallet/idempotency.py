"""Idempotency keys: parsing, request fingerprints, and the Redis fast path.

Redis holds a lock per (user, endpoint, key), taken with a random token and released only
by its holder (compare-and-delete in Lua), plus the stored response for replays. It is an
optimisation: the database's unique constraint on (user, endpoint, key) is the last word,
so a flushed or dead Redis, or a lock that expires mid-request, can never move money
twice. Every Redis failure degrades to "ask the database".
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

import redis
from fastapi import Response

from wallet.errors import IdempotencyKeyInvalid, IdempotencyKeyMissing, IdempotencyKeyReused

log = logging.getLogger("wallet.idempotency")

_VISIBLE_ASCII = re.compile(r"^[\x21-\x7e]{1,255}$")
REPLAYED_HEADER = "Idempotent-Replayed"

# Returns the stored response if there is one; else takes the lock (NX) and returns
# "locked"; else "busy". One round trip on the hot path.
_BEGIN = """
local stored = redis.call('GET', KEYS[1])
if stored then return {'stored', stored} end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {'locked', ''} end
return {'busy', ''}
"""
# Store the response and release our lock (only if it is still ours).
_FINISH = """
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
return 1
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def parse_key(idempotency_key: str | None, x_idempotency_key: str | None) -> str:
    if idempotency_key is None and x_idempotency_key is None:
        raise IdempotencyKeyMissing()
    if idempotency_key is not None and x_idempotency_key is not None and idempotency_key != x_idempotency_key:
        raise IdempotencyKeyInvalid("Idempotency-Key and X-Idempotency-Key differ.")
    key = idempotency_key if idempotency_key is not None else x_idempotency_key
    if key is None or not _VISIBLE_ASCII.match(key):
        raise IdempotencyKeyInvalid()
    return key


def fingerprint(payload: dict[str, Any]) -> str:
    """Same meaning, same fingerprint: the validated body, canonically encoded."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class Outcome:
    """A response as first sent, kept byte for byte for replays."""

    status_code: int
    body: str
    fingerprint: str

    def response(self, *, replayed: bool) -> Response:
        media = "application/json" if self.status_code < 400 else "application/problem+json"
        headers = {REPLAYED_HEADER: "true"} if replayed else None
        return Response(content=self.body, status_code=self.status_code, media_type=media, headers=headers)

    def replay_for(self, request_fingerprint: str) -> Response:
        if request_fingerprint != self.fingerprint:
            raise IdempotencyKeyReused()
        return self.response(replayed=True)

    def dumps(self) -> str:
        return json.dumps({"s": self.status_code, "b": self.body, "f": self.fingerprint})

    @classmethod
    def loads(cls, raw: str | bytes) -> Outcome:
        data = json.loads(raw)
        return cls(status_code=int(data["s"]), body=str(data["b"]), fingerprint=str(data["f"]))


LOCKED = "locked"
BUSY = "busy"
UNAVAILABLE = "unavailable"


class IdempotencyCache:
    # After a Redis failure, go straight to the database for a while instead of paying a
    # connection timeout on every request (a minimal circuit breaker).
    PAUSE_AFTER_FAILURE_S = 2.0

    def __init__(self, client: redis.Redis, *, ttl_s: int, lock_ttl_ms: int) -> None:
        self.redis = client
        self._paused_until = 0.0
        self.ttl_s = ttl_s
        self.lock_ttl_ms = lock_ttl_ms
        self._begin = client.register_script(_BEGIN)
        self._finish = client.register_script(_FINISH)
        self._release = client.register_script(_RELEASE)

    @staticmethod
    def _keys(scope: str) -> list[str]:
        return [f"idem:resp:{scope}", f"idem:lock:{scope}"]

    def begin(self, scope: str) -> tuple[str, Outcome | None, str]:
        """(state, stored outcome, lock token): state is stored, locked, busy or unavailable."""
        if time.monotonic() < self._paused_until:
            return UNAVAILABLE, None, ""
        token = secrets.token_hex(16)
        try:
            state, stored = self._begin(keys=self._keys(scope), args=[token, self.lock_ttl_ms])
        except redis.RedisError as exc:
            log.warning("idempotency cache unavailable, using the database only: %s", type(exc).__name__)
            self._paused_until = time.monotonic() + self.PAUSE_AFTER_FAILURE_S
            return UNAVAILABLE, None, ""
        state = state.decode() if isinstance(state, bytes) else state
        if state == "stored":
            return state, Outcome.loads(stored), ""
        return state, None, token

    def finish(self, scope: str, token: str, outcome: Outcome) -> None:
        try:
            self._finish(keys=self._keys(scope), args=[token, outcome.dumps(), self.ttl_s])
        except redis.RedisError as exc:
            log.warning("could not cache idempotent outcome: %s", type(exc).__name__)

    def release(self, scope: str, token: str) -> None:
        try:
            self._release(keys=self._keys(scope)[1:], args=[token])
        except redis.RedisError as exc:
            log.warning("could not release idempotency lock: %s", type(exc).__name__)
