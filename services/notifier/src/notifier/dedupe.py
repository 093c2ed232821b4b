"""Duplicate suppression: a Redis "sent" marker per email id, and a short claim so two
workers never send the same email at once. Brevo's idempotencyKey is the backstop for the
window between Brevo accepting an email and the marker being written."""

from __future__ import annotations

import secrets

import redis

from svckit.messages import SENT_MARKER

_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


class SentMarkers:
    def __init__(self, client: redis.Redis, *, ttl_s: int, claim_ms: int) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self.claim_ms = claim_ms
        self._release = client.register_script(_RELEASE)

    def is_sent(self, email_id: str) -> bool:
        return bool(self.redis.exists(SENT_MARKER.format(email_id)))

    def claim(self, email_id: str) -> str | None:
        token = secrets.token_hex(8)
        return token if self.redis.set(f"notifier:sending:{email_id}", token, nx=True, px=self.claim_ms) else None

    def claimed_for_ms(self, email_id: str) -> int:
        """How long another worker's claim on this email still lasts (0 if none)."""
        return max(int(self.redis.pttl(f"notifier:sending:{email_id}")), 0)  # type: ignore[arg-type]

    def mark_sent(self, email_id: str, token: str) -> None:
        pipe = self.redis.pipeline()
        pipe.set(SENT_MARKER.format(email_id), 1, ex=self.ttl_s)
        pipe.execute()
        self.release(email_id, token)

    def release(self, email_id: str, token: str) -> None:
        self._release(keys=[f"notifier:sending:{email_id}"], args=[token])
