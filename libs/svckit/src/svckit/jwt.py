"""Verify access tokens locally with the auth service's published keys (JWKS).

Pinned: algorithm EdDSA only (so `none` and HMAC-with-the-public-key are refused), our
issuer and audience, and the claims every token must carry. The key set is fetched over
HTTP, cached, and refreshed when a token names a `kid` we do not know, at most once per
`min_refresh_s` so that forged kids cannot make us hammer the auth service.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import jwt

ALGORITHM = "EdDSA"
REQUIRED_CLAIMS = ["iss", "aud", "sub", "iat", "exp", "jti"]

log = logging.getLogger("svckit.jwt")


class InvalidToken(Exception):
    """The token cannot be trusted. The message is for logs, never for clients."""


@dataclass(frozen=True)
class Claims:
    user_id: int
    jti: str
    expires_at: int
    raw: dict[str, Any]


JWKSSource = Callable[[], dict[str, Any]]


def http_jwks_source(url: str, client: httpx.Client) -> JWKSSource:
    """Fetch the JWKS over HTTP (how every service but auth gets the keys)."""

    def fetch() -> dict[str, Any]:
        response = client.get(url)
        response.raise_for_status()
        data: dict[str, Any] = response.json()
        return data

    return fetch


class JWKSVerifier:
    def __init__(
        self,
        source: JWKSSource,
        *,
        issuer: str,
        audience: str,
        ttl_s: float = 300.0,
        min_refresh_s: float = 5.0,
        leeway_s: int = 5,
    ) -> None:
        self.source = source
        self.issuer = issuer
        self.audience = audience
        self.ttl_s = ttl_s
        self.min_refresh_s = min_refresh_s
        self.leeway_s = leeway_s
        self._keys: dict[str, Any] = {}
        self._fetched_at = float("-inf")
        self._lock = threading.Lock()
        # token -> (good until, claims): a client sends the same token on every request, and
        # an Ed25519 check costs more than the rest of a cheap request. Entries live at most
        # REMEMBER_S (like the key cache, a key pulled from the JWKS stops working within
        # minutes) and never past the token's own expiry.
        self._verified: dict[str, tuple[float, Claims]] = {}

    def _refresh(self, *, force: bool) -> None:
        with self._lock:
            age = time.monotonic() - self._fetched_at
            if age < self.min_refresh_s or (not force and age < self.ttl_s):
                return
            try:
                keys = jwt.PyJWKSet.from_dict(self.source()).keys
            except (OSError, httpx.HTTPError, ValueError, jwt.PyJWKSetError) as exc:
                # Keep serving with the keys we have; a token we cannot check is refused.
                log.warning("JWKS refresh failed: %s", type(exc).__name__)
                self._fetched_at = time.monotonic() - self.ttl_s + self.min_refresh_s
                return
            self._keys = {
                k.key_id: k.key for k in keys if k.key_id and k.algorithm_name == ALGORITHM and k.key_type == "OKP"
            }
            self._fetched_at = time.monotonic()

    def _key_for(self, kid: str) -> Any:
        self._refresh(force=False)
        key = self._keys.get(kid)
        if key is None:
            self._refresh(force=True)
            key = self._keys.get(kid)
        if key is None:
            raise InvalidToken(f"unknown kid {kid!r}")
        return key

    REMEMBER_S = 60.0
    REMEMBER_MAX = 10_000

    def remembered(self, token: str) -> Claims | None:
        """The claims of a token verified within the last minute and not expired since, or None."""
        hit = self._verified.get(token)
        if hit is None or hit[0] <= time.time():
            return None
        return hit[1]

    def verify(self, token: str) -> Claims:
        claims = self.remembered(token)
        if claims is None:
            claims = self._verify(token)
            if len(self._verified) >= self.REMEMBER_MAX:
                self._verified.clear()  # crude, but bounded; refills at one check per token
            self._verified[token] = (min(time.time() + self.REMEMBER_S, claims.expires_at), claims)
        return claims

    def _verify(self, token: str) -> Claims:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise InvalidToken(f"malformed token: {exc}") from exc
        if header.get("alg") != ALGORITHM:
            raise InvalidToken(f"algorithm {header.get('alg')!r} not allowed")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise InvalidToken("no kid")
        try:
            claims = jwt.decode(
                token,
                self._key_for(kid),
                algorithms=[ALGORITHM],
                issuer=self.issuer,
                audience=self.audience,
                leeway=self.leeway_s,
                options={"require": REQUIRED_CLAIMS},
            )
            user_id = int(claims["sub"])
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            raise InvalidToken(str(exc)) from exc
        return Claims(user_id=user_id, jti=str(claims["jti"]), expires_at=int(claims["exp"]), raw=claims)


# Exactly what the gateway lets through to the rate-limited calls (gateway/dynamic/routes.yml,
# `$bearer`): the scheme spelled `Bearer`, one space, a JWT of bounded size. The gateway keys
# its per-token limit on the raw header, so another spelling of one token must not be a token.
BEARER = re.compile(r"Bearer ([A-Za-z0-9_-]{1,1000}\.[A-Za-z0-9_-]{1,1000}\.[A-Za-z0-9_-]{1,1000})")


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header in its canonical form, or None."""
    match = BEARER.fullmatch(authorization) if authorization else None
    return match.group(1) if match else None


def remembered_bearer(verifier: JWKSVerifier, authorization: str | None) -> Claims | None:
    """The claims of a recently verified bearer token (no I/O, microseconds), else None."""
    token = bearer_token(authorization)
    return verifier.remembered(token) if token is not None else None


def verify_bearer(verifier: JWKSVerifier, authorization: str | None) -> Claims:
    """Claims of a valid bearer token, or the contract's 401 (with WWW-Authenticate).

    May fetch the JWKS over HTTP (an unknown kid): call it from a worker thread."""
    from svckit.problems import Unauthorized

    token = bearer_token(authorization)
    if token is None:
        raise Unauthorized()
    try:
        return verifier.verify(token)
    except InvalidToken as exc:
        log.info("token refused: %s", exc)
        raise Unauthorized() from exc
