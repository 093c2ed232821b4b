"""The gateway's limits cannot be dodged: one money bucket per token whatever the spelling of
`Authorization`, and request bodies capped (at the gateway and in the services).

A stack of its own, with a small money rate (2/s, burst 5), and services that take bodies
up to 128 KiB, over the gateway's default 64 KiB, so each layer's cap can be seen at work.
"""

from __future__ import annotations

import random
import re
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis

from .client import PASSWORD, User, balance, new_user, open_wallet, unique_email
from .conftest import Stack, start_stack

RATE, BURST = 2, 5
SERVICE_MAX_BODY = 131072
GATEWAY_MAX_BODY = 65536
MIDDLEWARE = "money-per-token"
# What the gateway admits to the limit (its rule and svckit agree: libs/svckit/tests/test_bearer.py).
CANONICAL = re.compile(r"Bearer [A-Za-z0-9_-]{1,1000}\.[A-Za-z0-9_-]{1,1000}\.[A-Za-z0-9_-]{1,1000}")


@pytest.fixture(scope="module")
def limits_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = start_stack(
        tmp_path_factory.mktemp("limits") / "var",
        WALLET_REPLICAS="1",
        GATEWAY_MONEY_RATE_AVERAGE=str(RATE),
        GATEWAY_MONEY_RATE_BURST=str(BURST),
        AUTH_MAX_BODY_BYTES=str(SERVICE_MAX_BODY),
        WALLET_MAX_BODY_BYTES=str(SERVICE_MAX_BODY),
    )
    yield stack
    stack.stop()


@pytest.fixture
def api(limits_stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=limits_stack.url, timeout=30) as client:
        yield client


@pytest.fixture
def limiter(limits_stack: Stack) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(limits_stack.redis_url)
    yield client
    client.close()


class KeyWatch:
    """Every key of the money limiter seen in Redis while the block runs (they expire soon)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def scan(self) -> None:
        self.seen |= {k.decode("latin-1") for k in self.client.scan_iter(f"*{MIDDLEWARE}*", count=1000)}

    def _run(self) -> None:
        while not self._stop.is_set():
            self.scan()
            self._stop.wait(0.05)

    def __enter__(self) -> KeyWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.scan()

    def containing(self, text: str) -> set[str]:
        return {k for k in self.seen if text in k}


def deposit(api: httpx.Client, authorization: list[tuple[str, str]] | str | None, amount: int = 1) -> httpx.Response:
    headers: list[tuple[str, str]] = [("Idempotency-Key", uuid.uuid4().hex)]
    if isinstance(authorization, str):
        headers.append(("Authorization", authorization))
    elif authorization:
        headers.extend(authorization)
    return api.patch("/transaction/deposit", json={"amount": amount, "currency": "USD"}, headers=headers)


def assert_unauthorized(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["code"] == "unauthorized"


def funded_user(api: httpx.Client) -> User:
    user = new_user(api)
    open_wallet(api, user)
    return user


class TestMoneyLimitPerToken:
    def test_one_token_in_many_spellings_moves_what_one_bucket_allows(
        self, api: httpx.Client, limiter: redis.Redis
    ) -> None:
        user = funded_user(api)
        canonical = f"Bearer {user.token}"
        others = [f"bearer {user.token}", f"BEARER {user.token}", f"Bearer  {user.token}", f"BeArEr {user.token}"]
        jobs = [spelling for spelling in [canonical, *others] for _ in range(15)]
        random.shuffle(jobs)
        with KeyWatch(limiter) as keys, ThreadPoolExecutor(16) as pool:
            start = time.monotonic()
            answers = list(pool.map(lambda spelling: (spelling, deposit(api, spelling)), jobs))
            elapsed = time.monotonic() - start
        moved = balance(api, user)
        # A token bucket never allows more than its burst plus what refills meanwhile.
        assert 1 <= moved <= BURST + RATE * elapsed + 1, (moved, elapsed)
        for spelling, response in answers:
            if spelling != canonical:
                assert_unauthorized(response)
        codes = [r.status_code for s, r in answers if s == canonical]
        assert set(codes) <= {200, 429}, codes
        assert moved == codes.count(200)
        # One bounded key, for the canonical spelling; none for the others.
        assert keys.containing(user.token) == {k for k in keys.seen if k.endswith(f"@file:{canonical}")}
        assert len(keys.containing(user.token)) == 1

    def test_holds_captures_voids_and_refunds_share_the_money_bucket(self, api: httpx.Client) -> None:
        user = new_user(api)
        headers = {"Authorization": f"Bearer {user.token}"}
        open_wallet(api, user, balance=1000)  # POST /wallet: one token from the bucket too
        time.sleep(BURST / RATE)  # a full bucket again

        def hold() -> httpx.Response:
            body = {"amount": 1, "currency": "USD"}
            return api.post("/holds", json=body, headers={**headers, "Idempotency-Key": uuid.uuid4().hex})

        start = time.monotonic()
        codes = [hold().status_code for _ in range(3 * BURST)]
        elapsed = time.monotonic() - start
        assert set(codes) == {201, 429}, codes
        assert codes.count(201) <= BURST + RATE * elapsed + 1
        for path in ("/holds/1/capture", "/holds/1/void", "/transaction/1/refund"):
            # Each call right after a hold found the bucket empty: refused, unless a token
            # (one per 1/RATE s) came in between on a slow machine, when the service
            # answers it instead. A bucket of its own would let its first BURST through.
            answers = []
            for _ in range(BURST):
                while (code := hold().status_code) != 429:  # the bucket emptied again
                    codes.append(code)
                answer = api.post(path, json={}, headers={**headers, "Idempotency-Key": uuid.uuid4().hex})
                answers.append((answer.status_code, answer.json()["code"]))
                if answers[-1] == (429, "rate_limited"):
                    break
            assert answers[-1] == (429, "rate_limited"), (path, answers)
            assert all(status >= 400 for status, _ in answers), (path, answers)  # nothing moved
        reads = [api.get("/holds", headers=headers).status_code for _ in range(2 * BURST)]
        assert set(reads) == {200}  # reads are not limited
        assert len(api.get("/holds", headers=headers).json()["holds"]) == codes.count(201)

    @pytest.mark.parametrize("order", ["junk first", "junk last", "two tokens"])
    def test_a_second_authorization_header_gets_no_bucket_and_moves_nothing(
        self, api: httpx.Client, limiter: redis.Redis, order: str
    ) -> None:
        user, other = funded_user(api), funded_user(api)
        marker = f"junk-{uuid.uuid4().hex}"
        good = ("Authorization", f"Bearer {user.token}")
        values = {
            "junk first": [("Authorization", marker), good],
            "junk last": [good, ("Authorization", marker)],
            "two tokens": [("Authorization", f"Bearer {other.token}"), good],
        }[order]
        with KeyWatch(limiter) as keys:
            for _ in range(3):
                assert_unauthorized(deposit(api, values))
        assert keys.containing(marker) == set()
        assert (balance(api, user), balance(api, other)) == (0, 0)

    @pytest.mark.parametrize(
        "value",
        [
            None,
            "",
            "Bearer",
            "Basic dXNlcjpwYXNz",
            "Bearer not-a-jwt-MARK",
            "Bearer MARK.b.c.d",
            "Bearer MARK..c",
            "Bearer " + "a" * 1001 + ".MARK.c",
            "Bearer MARK" + "x" * 6000,
        ],
        ids=["none", "empty", "scheme only", "basic", "not a jwt", "four parts", "empty part", "long part", "long"],
    )
    def test_a_malformed_value_is_401_with_no_bucket(
        self, api: httpx.Client, limiter: redis.Redis, value: str | None
    ) -> None:
        marker = uuid.uuid4().hex
        value = value.replace("MARK", marker) if value else value
        with KeyWatch(limiter) as keys:
            assert_unauthorized(deposit(api, value))
            for method in ("POST", "DELETE"):
                headers = {"Authorization": value} if value is not None else {}
                assert_unauthorized(api.request(method, "/wallet", json={"currency": "USD"}, headers=headers))
        assert keys.containing(marker) == set()

    def test_every_key_the_limiter_holds_is_one_canonical_bearer_token(
        self, api: httpx.Client, limiter: redis.Redis
    ) -> None:
        user = funded_user(api)
        with KeyWatch(limiter) as keys:
            deposit(api, f"Bearer {user.token}")
            deposit(api, f"bearer {user.token}")
        assert keys.seen
        for key in keys.seen:
            _, _, value = key.partition(f"{MIDDLEWARE}@file:")
            assert CANONICAL.fullmatch(value), key
            assert len(key) < 3100

    def test_the_services_refuse_the_spellings_the_gateway_does_not_limit(self, api: httpx.Client) -> None:
        # GET /wallet is not rate-limited: the gateway passes every spelling to the wallet.
        user = funded_user(api)
        assert api.get("/wallet", headers={"Authorization": f"Bearer {user.token}"}).status_code == 200
        for spelling in (f"bearer {user.token}", f"Bearer  {user.token}", f"BEARER {user.token}"):
            assert_unauthorized(api.get("/wallet", headers={"Authorization": spelling}))
        assert_unauthorized(api.get("/wallet", headers=[("Authorization", f"Bearer {user.token}")] * 2))

    @pytest.mark.parametrize("path", ["/__unauthorized", "/__payload-too-large"])
    def test_the_docs_apps_refusal_pages_are_not_routed(self, api: httpx.Client, path: str) -> None:
        for method in ("GET", "PATCH"):
            response = api.request(method, path)
            assert response.status_code == 404
            assert response.json()["code"] == "not_found"


def assert_too_large(response: httpx.Response) -> None:
    assert response.status_code == 413, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert (problem["status"], problem["code"]) == (413, "payload_too_large")


def signup_body(email: str, padding: int) -> dict[str, str]:
    return {"first_name": "Big", "last_name": "Body", "email": email, "password": PASSWORD, "pad": "x" * padding}


class TestBodyLimit:
    def test_an_8_mib_signup_is_refused_and_creates_nothing(self, api: httpx.Client) -> None:
        email = unique_email("big")
        assert_too_large(api.post("/signup", json=signup_body(email, 8 << 20)))
        assert api.post("/token", data={"username": email, "password": PASSWORD}).status_code == 401
        assert api.post("/signup", json=signup_body(email, 0)).status_code == 201  # the email was free

    def test_a_chunked_8_mib_signup_is_refused(self, api: httpx.Client) -> None:
        email = unique_email("chunked")

        def body() -> Iterator[bytes]:
            yield f'{{"first_name": "C", "last_name": "D", "email": "{email}", "password": "{PASSWORD}", "pad": "'.encode()
            for _ in range(128):
                yield b"x" * 65536
            yield b'"}'

        response = api.post("/signup", content=body(), headers={"Content-Type": "application/json"})
        assert "content-length" not in response.request.headers
        assert_too_large(response)
        assert api.post("/token", data={"username": email, "password": PASSWORD}).status_code == 401

    def test_the_gateway_refuses_what_the_services_would_take(self, api: httpx.Client) -> None:
        """Over the gateway's cap, under the services' (SERVICE_MAX_BODY): only the gateway refuses."""
        email = unique_email("mid")
        assert_too_large(api.post("/signup", json=signup_body(email, GATEWAY_MAX_BODY)))
        assert api.post("/signup", json=signup_body(email, 0)).status_code == 201  # nothing was created

    def test_a_money_call_one_byte_over_the_gateway_cap_is_refused(self, api: httpx.Client) -> None:
        user = funded_user(api)
        headers = {**user.headers, "Idempotency-Key": uuid.uuid4().hex, "Content-Type": "application/json"}
        body = b'{"amount": 1, "currency": "USD", "pad": "'
        body += b"x" * (GATEWAY_MAX_BODY + 1 - len(body) - 2) + b'"}'
        assert len(body) == GATEWAY_MAX_BODY + 1
        assert_too_large(api.patch("/transaction/deposit", content=body, headers=headers))
        assert balance(api, user) == 0
        ok = api.patch("/transaction/deposit", json={"amount": 1, "currency": "USD"}, headers=headers)
        assert ok.status_code == 200, ok.text  # the refused call did not claim the key
        assert balance(api, user) == 1

    def test_the_services_cap_bodies_themselves(self, api: httpx.Client, limits_stack: Stack) -> None:
        """Straight to the services, past the gateway: *_MAX_BODY_BYTES, not the default, applies."""
        assert limits_stack.ports is not None
        user = funded_user(api)
        auth = f"http://127.0.0.1:{limits_stack.ports['auth']}"
        wallet = f"http://127.0.0.1:{limits_stack.ports['wallet1']}"
        email = unique_email("svc")
        over = httpx.post(f"{auth}/signup", json=signup_body(email, SERVICE_MAX_BODY), timeout=30)
        assert_too_large(over)
        assert str(SERVICE_MAX_BODY) in over.json()["detail"]
        headers = {**user.headers, "Idempotency-Key": uuid.uuid4().hex}
        body = {"amount": 1, "currency": "USD", "pad": "x" * SERVICE_MAX_BODY}
        over = httpx.patch(f"{wallet}/transaction/deposit", json=body, headers=headers, timeout=30)
        assert_too_large(over)
        assert str(SERVICE_MAX_BODY) in over.json()["detail"]
        assert balance(api, user) == 0
        # Over the default cap but under the configured one: served.
        under = httpx.post(f"{auth}/signup", json=signup_body(email, GATEWAY_MAX_BODY), timeout=30)
        assert under.status_code == 201, under.text
