"""Verify access tokens locally with the auth service's published keys (JWKS).

Pinned: algorithm EdDSA only (so `none` and HMAC-with-the-public-key are refused), the
RFC 9068 type `at+jwt` (so no other JWT of ours passes as an access token), our issuer and
audience, the claims every token must carry, a bounded lifetime and a canonical `sub`.

The key set is fetched over HTTP and cached. No verification ever waits behind another's
fetch: a token whose kid we know is checked with the keys we hold (a stale set is renewed
in the background), and an unknown kid triggers at most one fetch at a time and at most
one per `min_refresh_s`; while one runs, or too soon after the last, an unknown kid is
refused at once. So forged kids, even with the auth service slow, cost one fetch per
`min_refresh_s` and delay nobody else.
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
TOKEN_TYPE = "at+jwt"  # nosec B105 - a media type (RFC 9068 section 2.1), not a secret
_TOKEN_TYPES = {TOKEN_TYPE, f"application/{TOKEN_TYPE}"}
REQUIRED_CLAIMS = ["iss", "aud", "sub", "iat", "exp", "jti"]
# A user id as the auth service writes it: no sign, spaces, underscores, leading zeros or
# non-ASCII digits, so one user has exactly one `sub`.
_SUB = re.compile(r"[1-9][0-9]{0,18}")
DEFAULT_MAX_LIFETIME_S = 3600

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
        max_lifetime_s: int = DEFAULT_MAX_LIFETIME_S,
        first_load_wait_s: float = 10.0,
    ) -> None:
        self.source = source
        self.issuer = issuer
        self.audience = audience
        self.ttl_s = ttl_s
        self.min_refresh_s = min_refresh_s
        self.leeway_s = leeway_s
        self.max_lifetime_s = max_lifetime_s
        self.first_load_wait_s = first_load_wait_s
        # Replaced whole by a fetch, never mutated: readers see the old set or the new one.
        self._keys: dict[str, Any] = {}
        self._loaded = False
        self._fetched_at = float("-inf")  # last successful fetch
        self._attempted_at = float("-inf")  # last fetch, successful or not
        # Held by the one thread fetching, across the HTTP call. Verifications only try it
        # (non-blocking); the sole exception is before any key set was ever loaded, when
        # no token can be checked anyway and waiting for the first fetch is all there is.
        self._fetching = threading.Lock()
        # token -> (good until, claims): a client sends the same token on every request, and
        # an Ed25519 check costs more than the rest of a cheap request. Entries live at most
        # REMEMBER_S (like the key cache, a key pulled from the JWKS stops working within
        # minutes) and never past the token's own expiry.
        self._verified: dict[str, tuple[float, Claims]] = {}

    def _fetch_now(self) -> bool:
        """Fetch the key set unless a fetch is running or the last was under min_refresh_s ago.

        Never waits; returns whether this call ran a fetch (successful or not)."""
        if not self._fetching.acquire(blocking=False):
            return False
        try:
            now = time.monotonic()
            if now - self._attempted_at < self.min_refresh_s:
                return False
            self._attempted_at = now
            try:
                keys = jwt.PyJWKSet.from_dict(self.source()).keys
            except (OSError, httpx.HTTPError, ValueError, jwt.PyJWKSetError) as exc:
                # Keep serving with the keys we have; a token we cannot check is refused.
                log.warning("JWKS refresh failed: %s", type(exc).__name__)
                return True
            self._keys = {
                k.key_id: k.key for k in keys if k.key_id and k.algorithm_name == ALGORITHM and k.key_type == "OKP"
            }
            self._fetched_at = time.monotonic()
            self._loaded = True
            return True
        finally:
            self._fetching.release()

    def _renew_in_background(self) -> None:
        if self._fetching.locked() or time.monotonic() - self._attempted_at < self.min_refresh_s:
            return
        threading.Thread(target=self._fetch_now, name="jwks-refresh", daemon=True).start()

    def _key_for(self, kid: str) -> Any:
        key = self._keys.get(kid)
        if key is not None:
            if time.monotonic() - self._fetched_at >= self.ttl_s:
                self._renew_in_background()  # this token goes on with the key we hold
            return key
        # No key set yet (start-up) and another thread is fetching the first: wait for it.
        if not self._fetch_now() and not self._loaded and self._fetching.acquire(timeout=self.first_load_wait_s):
            self._fetching.release()
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
        typ = header.get("typ")
        if not isinstance(typ, str) or typ.lower() not in _TOKEN_TYPES:
            raise InvalidToken(f"type {typ!r} is not an access token")
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
        except jwt.PyJWTError as exc:
            raise InvalidToken(str(exc)) from exc
        return self._checked(claims)

    def _checked(self, claims: dict[str, Any]) -> Claims:
        """The rules PyJWT leaves to us: lifetime, issue time, and the exact form of sub and jti."""
        iat, exp, sub, jti = claims["iat"], claims["exp"], claims["sub"], claims["jti"]
        for name, value in (("iat", iat), ("exp", exp)):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidToken(f"{name} is not a NumericDate")
        if iat > time.time() + self.leeway_s:
            raise InvalidToken("issued in the future")
        if exp - iat > self.max_lifetime_s:
            raise InvalidToken(f"lifetime {exp - iat}s is over {self.max_lifetime_s}s")
        if not isinstance(sub, str) or not _SUB.fullmatch(sub):
            raise InvalidToken("sub is not a canonical user id")
        if not isinstance(jti, str) or not jti:
            raise InvalidToken("no jti")
        return Claims(user_id=int(sub), jti=jti, expires_at=int(exp), raw=claims)


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
