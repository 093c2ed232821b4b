"""The token attacks every service must refuse (shared verification in svckit.jwt)."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jwt.algorithms import OKPAlgorithm

from svckit.jwt import InvalidToken, JWKSVerifier

ISS, AUD = "wallet-platform-auth", "wallet-platform"


class Signer:
    def __init__(self, kid: str) -> None:
        self.kid = kid
        self.key = Ed25519PrivateKey.generate()

    def jwk(self) -> dict[str, Any]:
        jwk: dict[str, Any] = OKPAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        return {**jwk, "kid": self.kid, "alg": "EdDSA", "use": "sig"}

    def public_pem(self) -> bytes:
        return self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def token(self, headers: dict[str, Any] | None = None, **overrides: Any) -> str:
        now = int(time.time())
        claims = {"iss": ISS, "aud": AUD, "sub": "42", "iat": now, "nbf": now, "exp": now + 900, "jti": "j1"}
        claims.update(overrides)
        claims = {k: v for k, v in claims.items() if v is not None}
        return jwt.encode(claims, self.key, algorithm="EdDSA", headers={"kid": self.kid, **(headers or {})})


class FakeJWKS:
    """Counts fetches, like the auth service's endpoint would see them."""

    def __init__(self, *signers: Signer) -> None:
        self.signers = list(signers)
        self.fetches = 0

    def __call__(self) -> dict[str, Any]:
        self.fetches += 1
        return {"keys": [s.jwk() for s in self.signers]}


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


@pytest.fixture
def signer() -> Signer:
    return Signer("k1")


@pytest.fixture
def jwks(signer: Signer) -> FakeJWKS:
    return FakeJWKS(signer)


@pytest.fixture
def verifier(jwks: FakeJWKS) -> JWKSVerifier:
    return JWKSVerifier(jwks, issuer=ISS, audience=AUD, min_refresh_s=0, leeway_s=0)


class TestAcceptsGoodTokens:
    def test_valid_token_gives_the_user(self, verifier: JWKSVerifier, signer: Signer) -> None:
        claims = verifier.verify(signer.token())
        assert claims.user_id == 42
        assert claims.jti == "j1"

    def test_keys_are_cached_between_verifications(
        self, verifier: JWKSVerifier, signer: Signer, jwks: FakeJWKS
    ) -> None:
        for _ in range(5):
            verifier.verify(signer.token())
        assert jwks.fetches == 1

    def test_an_unknown_kid_refreshes_the_key_set(self, verifier: JWKSVerifier, signer: Signer, jwks: FakeJWKS) -> None:
        verifier.verify(signer.token())
        rotated = Signer("k2")
        jwks.signers.append(rotated)  # the auth service rotated its key
        assert verifier.verify(rotated.token()).user_id == 42
        assert jwks.fetches == 2


class TestRemembersVerifiedTokens:
    """A client sends the same token on every request; it is checked once a minute, not each time."""

    def test_a_verified_token_is_remembered(self, verifier: JWKSVerifier, signer: Signer) -> None:
        token = signer.token()
        assert verifier.remembered(token) is None
        verifier.verify(token)
        claims = verifier.remembered(token)
        assert claims is not None
        assert claims.user_id == 42

    def test_a_refused_token_is_not_remembered(self, verifier: JWKSVerifier, signer: Signer) -> None:
        token = signer.token(iss="someone-else")
        with pytest.raises(InvalidToken):
            verifier.verify(token)
        assert verifier.remembered(token) is None

    def test_a_remembered_token_stops_working_when_it_expires(
        self, verifier: JWKSVerifier, signer: Signer, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        now = time.time()
        token = signer.token(exp=int(now) + 2)
        verifier.verify(token)
        monkeypatch.setattr(time, "time", lambda: now + 3)
        assert verifier.remembered(token) is None  # so verify() checks it again, and refuses it

    def test_memory_lasts_a_minute_at_most(
        self, verifier: JWKSVerifier, signer: Signer, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        now = time.time()
        token = signer.token()
        verifier.verify(token)
        monkeypatch.setattr(time, "time", lambda: now + JWKSVerifier.REMEMBER_S + 1)
        assert verifier.remembered(token) is None  # checked again (keys may have been pulled)


class TestRefusesAttacks:
    def test_alg_none(self, verifier: JWKSVerifier) -> None:
        token = jwt.encode({"iss": ISS, "aud": AUD, "sub": "42"}, None, algorithm="none", headers={"kid": "k1"})
        with pytest.raises(InvalidToken):
            verifier.verify(token)

    def test_hmac_signed_with_the_public_key(self, verifier: JWKSVerifier, signer: Signer) -> None:
        now = int(time.time())
        claims = {"iss": ISS, "aud": AUD, "sub": "42", "iat": now, "exp": now + 900, "jti": "x"}
        header = b64({"alg": "HS256", "typ": "JWT", "kid": "k1"})
        import hashlib
        import hmac

        signing_input = f"{header}.{b64(claims)}".encode()
        for secret in (signer.public_pem(), json.dumps(signer.jwk()).encode(), signer.jwk()["x"].encode()):
            sig = base64.urlsafe_b64encode(hmac.new(secret, signing_input, hashlib.sha256).digest()).rstrip(b"=")
            with pytest.raises(InvalidToken):
                verifier.verify(f"{signing_input.decode()}.{sig.decode()}")

    def test_signed_by_a_foreign_key_with_our_kid(self, verifier: JWKSVerifier) -> None:
        with pytest.raises(InvalidToken):
            verifier.verify(Signer("k1").token())

    def test_unknown_kid(self, verifier: JWKSVerifier) -> None:
        with pytest.raises(InvalidToken):
            verifier.verify(Signer("elsewhere").token())

    def test_kid_pointing_elsewhere_is_never_fetched(self, verifier: JWKSVerifier, signer: Signer) -> None:
        # A `jku`/`x5u` header or a URL in `kid` must not make us fetch keys from it.
        for headers in ({"jku": "http://127.0.0.1:1/jwks.json"}, {"kid": "http://127.0.0.1:1/key"}):
            token = Signer(str(headers.get("kid", "k1"))).token(headers=headers)
            with pytest.raises(InvalidToken):
                verifier.verify(token)

    @pytest.mark.parametrize(
        "overrides",
        [
            {"exp": int(time.time()) - 10},
            {"nbf": int(time.time()) + 600},
            {"iss": "someone-else"},
            {"aud": "another-platform"},
            {"sub": "not-a-number"},
            {"jti": None},
            {"exp": None},
            {"sub": None},
        ],
    )
    def test_bad_claims(self, verifier: JWKSVerifier, signer: Signer, overrides: dict[str, Any]) -> None:
        with pytest.raises(InvalidToken):
            verifier.verify(signer.token(**overrides))

    def test_tampered_payload(self, verifier: JWKSVerifier, signer: Signer) -> None:
        header, _, sig = signer.token().split(".")
        now = int(time.time())
        forged = b64({"iss": ISS, "aud": AUD, "sub": "1", "iat": now, "exp": now + 900, "jti": "j"})
        with pytest.raises(InvalidToken):
            verifier.verify(f"{header}.{forged}.{sig}")

    @pytest.mark.parametrize("cut", [1, 10, 40])
    def test_truncated(self, verifier: JWKSVerifier, signer: Signer, cut: int) -> None:
        with pytest.raises(InvalidToken):
            verifier.verify(signer.token()[:-cut])

    @pytest.mark.parametrize("garbage", ["", "abc", "a.b", "a.b.c", "....", "eyJhbGciOiJFZERTQSJ9.e30."])
    def test_garbage(self, verifier: JWKSVerifier, garbage: str) -> None:
        with pytest.raises(InvalidToken):
            verifier.verify(garbage)


class TestRefreshIsRateLimited:
    def test_forged_kids_cannot_make_us_hammer_the_auth_service(self, signer: Signer, jwks: FakeJWKS) -> None:
        verifier = JWKSVerifier(jwks, issuer=ISS, audience=AUD, min_refresh_s=60)
        verifier.verify(signer.token())
        for i in range(20):
            with pytest.raises(InvalidToken):
                verifier.verify(Signer(f"forged-{i}").token())
        assert jwks.fetches == 1

    def test_an_unreachable_jwks_refuses_tokens_without_crashing(self, signer: Signer) -> None:
        def down() -> dict[str, Any]:
            raise OSError("connection refused")

        verifier = JWKSVerifier(down, issuer=ISS, audience=AUD)
        with pytest.raises(InvalidToken):
            verifier.verify(signer.token())
