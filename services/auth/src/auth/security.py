"""Passwords (bcrypt) and access tokens (EdDSA JWTs)."""

from __future__ import annotations

import time
import uuid

import bcrypt
import jwt

from auth.keys import KeyRing
from svckit.jwt import TOKEN_TYPE


class PasswordHasher:
    def __init__(self, rounds: int) -> None:
        self.rounds = rounds
        # Verified against when the email is unknown, so both failures cost one bcrypt.
        self._dummy = bcrypt.hashpw(b"not-a-real-password", bcrypt.gensalt(rounds))

    def hash(self, password: str) -> str:
        return bcrypt.hashpw(password.encode("utf-8"), bcrypt.gensalt(self.rounds)).decode("ascii")

    def verify(self, password: str, hashed: str | None) -> bool:
        candidate = password.encode("utf-8")
        # Always exactly one bcrypt check, whatever the input, so timing tells nothing.
        # Over 72 bytes can never be a stored password (signup refuses it): no match.
        target = hashed.encode("ascii") if hashed else self._dummy
        ok = bcrypt.checkpw(candidate[:72], target)
        return ok and hashed is not None and len(candidate) <= 72


class TokenIssuer:
    def __init__(self, keys: KeyRing, *, issuer: str, audience: str, ttl_s: int) -> None:
        self.keys = keys
        self.issuer = issuer
        self.audience = audience
        self.ttl_s = ttl_s

    def issue(self, user_id: int) -> str:
        key = self.keys.current()
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": str(user_id),
            "iat": now,
            "nbf": now,
            "exp": now + self.ttl_s,
            "jti": uuid.uuid4().hex,
        }
        # typ at+jwt (RFC 9068): verifiers refuse any other JWT as an access token.
        return jwt.encode(claims, key.private, algorithm="EdDSA", headers={"kid": key.kid, "typ": TOKEN_TYPE})
