"""The token attacks every service must refuse (shared verification in svckit.jwt)."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jwt.algorithms import OKPAlgorithm

import svckit.jwt
from svckit.jwt import InvalidToken, JWKSVerifier, http_jwks_source

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
        headers = {"kid": self.kid, "typ": "at+jwt", **(headers or {})}
        return jwt.encode(claims, self.key, algorithm="EdDSA", headers=headers)


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


class TestAccessTokenRules:
    """RFC 9068 typ, a bounded lifetime, no future iat, and one canonical form of sub."""

    @pytest.mark.parametrize("typ", [None, "JWT", "jwt", "at+jwt+x", "id_token", "application/jwt"])
    def test_a_token_that_is_not_typed_as_an_access_token_is_refused(
        self, verifier: JWKSVerifier, signer: Signer, typ: str | None
    ) -> None:
        with pytest.raises(InvalidToken, match="type"):
            verifier.verify(signer.token(headers={"typ": typ}))

    @pytest.mark.parametrize("typ", ["at+jwt", "AT+JWT", "application/at+jwt"])
    def test_the_access_token_type_is_accepted_in_any_case(
        self, verifier: JWKSVerifier, signer: Signer, typ: str
    ) -> None:
        assert verifier.verify(signer.token(headers={"typ": typ})).user_id == 42

    def test_a_lifetime_over_the_maximum_is_refused(self, jwks: FakeJWKS, signer: Signer) -> None:
        verifier = JWKSVerifier(jwks, issuer=ISS, audience=AUD, min_refresh_s=0, max_lifetime_s=900)
        now = int(time.time())
        assert verifier.verify(signer.token(iat=now, exp=now + 900)).user_id == 42
        with pytest.raises(InvalidToken, match="lifetime"):
            verifier.verify(signer.token(iat=now, exp=now + 901))

    def test_the_default_maximum_is_an_hour(self, verifier: JWKSVerifier, signer: Signer) -> None:
        now = int(time.time())
        with pytest.raises(InvalidToken, match="lifetime"):
            verifier.verify(signer.token(iat=now - 10, exp=now + 10 * 365 * 86400))
        assert verifier.verify(signer.token(iat=now, exp=now + 3600)).user_id == 42

    def test_issued_in_the_future_beyond_the_leeway_is_refused(self, jwks: FakeJWKS, signer: Signer) -> None:
        verifier = JWKSVerifier(jwks, issuer=ISS, audience=AUD, min_refresh_s=0, leeway_s=5)
        now = int(time.time())
        assert verifier.verify(signer.token(iat=now + 2, nbf=None, exp=now + 600)).user_id == 42  # clock skew
        with pytest.raises(InvalidToken):
            verifier.verify(signer.token(iat=now + 120, nbf=None, exp=now + 900))

    @pytest.mark.parametrize("missing", ["iat", "exp", "sub", "jti"])
    def test_each_required_claim(self, verifier: JWKSVerifier, signer: Signer, missing: str) -> None:
        with pytest.raises(InvalidToken):
            verifier.verify(signer.token(**{missing: None}))

    @pytest.mark.parametrize(
        "sub",
        ["1_000", " 7 ", "7 ", "07", "0", "-1", "+1", "1e3", "0x1f", "\u0663", "7\n", "12345678901234567890", "", 42],
    )
    def test_sub_must_be_a_canonical_positive_decimal(self, verifier: JWKSVerifier, signer: Signer, sub: Any) -> None:
        with pytest.raises(InvalidToken):
            verifier.verify(signer.token(sub=sub))

    @pytest.mark.parametrize(("sub", "user_id"), [("1", 1), ("1000", 1000), ("9" * 19, 10**19 - 1)])
    def test_canonical_subs_are_accepted(self, verifier: JWKSVerifier, signer: Signer, sub: str, user_id: int) -> None:
        assert verifier.verify(signer.token(sub=sub)).user_id == user_id

    def test_an_empty_jti_is_refused(self, verifier: JWKSVerifier, signer: Signer) -> None:
        with pytest.raises(InvalidToken):
            verifier.verify(signer.token(jti=""))


class SlowJWKS:
    """A real HTTP JWKS endpoint whose answers can be held back (the auth service being slow)."""

    def __init__(self, *signers: Signer) -> None:
        self.signers = list(signers)
        self.fetches = 0
        self.in_flight = 0
        self.open = threading.Event()  # set: answer at once; clear: hold each request until set
        self.open.set()
        self.arrived = threading.Event()
        self._count = threading.Lock()
        jwks = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with jwks._count:
                    jwks.fetches += 1
                    jwks.in_flight += 1
                jwks.arrived.set()
                jwks.open.wait(30)
                body = json.dumps({"keys": [s.jwk() for s in jwks.signers]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                with jwks._count:
                    jwks.in_flight -= 1

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/.well-known/jwks.json"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def hold(self) -> None:
        self.arrived.clear()
        self.open.clear()

    def close(self) -> None:
        self.open.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def slow_jwks(signer: Signer) -> Iterator[SlowJWKS]:
    server = SlowJWKS(signer)
    yield server
    server.close()


@pytest.fixture
def http_client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as client:
        yield client


def in_thread(fn: Any, *args: Any) -> tuple[threading.Thread, threading.Event, list[Any]]:
    """Runs fn(*args) in a thread; `done` is set when it returned or raised, `out` holds what it gave."""
    done, out = threading.Event(), []

    def run() -> None:
        try:
            out.append(fn(*args))
        except Exception as exc:
            out.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, done, out


class Clock:
    """time as the verifier sees it, with monotonic time movable forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.offset

    def time(self) -> float:
        return time.time()


class TestRefreshNeverStallsOtherVerifications:
    """With the auth service slow, an unknown-kid fetch in flight delays no other verification."""

    def verifier(self, slow_jwks: SlowJWKS, client: httpx.Client, **options: Any) -> JWKSVerifier:
        return JWKSVerifier(http_jwks_source(slow_jwks.url, client), issuer=ISS, audience=AUD, **options)

    def test_a_known_kid_is_verified_while_an_unknown_kid_refresh_is_in_flight(
        self, slow_jwks: SlowJWKS, http_client: httpx.Client, signer: Signer
    ) -> None:
        verifier = self.verifier(slow_jwks, http_client, min_refresh_s=0)
        verifier.verify(signer.token(jti="warm"))  # the key set is loaded
        slow_jwks.hold()
        _, unknown_done, unknown_out = in_thread(verifier.verify, Signer("made-up").token())
        assert slow_jwks.arrived.wait(10)  # its fetch is at the server, unanswered
        _, known_done, known_out = in_thread(verifier.verify, signer.token(jti="fresh"))
        # The known kid finishes while the fetch is still held (a wait would never end until released).
        finished = known_done.wait(10)
        still_held = slow_jwks.in_flight == 1 and not unknown_done.is_set()
        slow_jwks.open.set()
        assert finished, "a known-kid verification waited on the JWKS fetch"
        assert still_held
        assert isinstance(known_out[0], type(verifier.verify(signer.token(jti="again"))))
        assert unknown_done.wait(10)
        assert isinstance(unknown_out[0], InvalidToken)
        assert slow_jwks.fetches == 2

    def test_a_stale_key_set_is_renewed_without_making_the_token_wait(
        self, slow_jwks: SlowJWKS, http_client: httpx.Client, signer: Signer
    ) -> None:
        verifier = self.verifier(slow_jwks, http_client, ttl_s=0, min_refresh_s=0)
        verifier.verify(signer.token(jti="warm"))
        slow_jwks.hold()
        _, done, out = in_thread(verifier.verify, signer.token(jti="stale"))
        finished = done.wait(10)
        renewing = slow_jwks.arrived.wait(10)  # the renewal runs, in the background
        slow_jwks.open.set()
        assert finished, "a known-kid verification waited on the TTL renewal"
        assert renewing
        assert out[0].user_id == 42

    def test_a_flood_of_unknown_kids_costs_one_fetch_and_is_refused_at_once(
        self, slow_jwks: SlowJWKS, http_client: httpx.Client, signer: Signer, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        clock = Clock()
        monkeypatch.setattr(svckit.jwt, "time", clock)  # the verifier's clock only
        verifier = self.verifier(slow_jwks, http_client, min_refresh_s=60)
        verifier.verify(signer.token(jti="warm"))
        clock.offset = 61  # a minute later: an unknown kid may fetch again
        slow_jwks.hold()
        first = in_thread(verifier.verify, Signer("forged-first").token())
        assert slow_jwks.arrived.wait(10)
        flood = [in_thread(verifier.verify, Signer(f"forged-{i}").token()) for i in range(30)]
        answered = all(done.wait(10) for _, done, _ in flood)
        held = slow_jwks.in_flight == 1 and slow_jwks.fetches == 2
        slow_jwks.open.set()
        assert answered, "unknown kids queued behind the fetch in flight"
        assert held
        assert all(isinstance(out[0], InvalidToken) for _, _, out in flood)
        assert first[1].wait(10)
        # After it, more forged kids within min_refresh_s fetch nothing either.
        for i in range(10):
            with pytest.raises(InvalidToken):
                verifier.verify(Signer(f"later-{i}").token())
        assert slow_jwks.fetches == 2

    def test_before_the_first_key_set_concurrent_tokens_wait_for_its_fetch(
        self, slow_jwks: SlowJWKS, http_client: httpx.Client, signer: Signer
    ) -> None:
        verifier = self.verifier(slow_jwks, http_client)
        slow_jwks.hold()
        first = in_thread(verifier.verify, signer.token(jti="a"))
        assert slow_jwks.arrived.wait(10)
        second = in_thread(verifier.verify, signer.token(jti="b"))
        slow_jwks.open.set()
        assert first[1].wait(10)
        assert second[1].wait(10)
        assert [first[2][0].jti, second[2][0].jti] == ["a", "b"]  # start-up refuses nobody
        assert slow_jwks.fetches == 1
