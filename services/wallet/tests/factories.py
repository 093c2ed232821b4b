from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.testclient import TestClient
from jwt.algorithms import OKPAlgorithm
from sqlalchemy import Engine

from svckit.db import make_engine
from svckit.problems import ProblemError
from wallet import service

_ids = itertools.count(1_000)


class Signer:
    """Stands in for the auth service's signing key (tokens the wallet must accept)."""

    def __init__(self) -> None:
        self.key = Ed25519PrivateKey.generate()

    def jwks(self) -> dict[str, Any]:
        jwk = OKPAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        return {"keys": [{**jwk, "kid": "test", "alg": "EdDSA", "use": "sig"}]}

    def token(self, user_id: int) -> str:
        now = int(time.time())
        claims = {
            "iss": "wallet-platform-auth",
            "aud": "wallet-platform",
            "sub": str(user_id),
            "iat": now,
            "exp": now + 900,
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(claims, self.key, algorithm="EdDSA", headers={"kid": "test", "typ": "at+jwt"})


class AuthFake:
    """The auth service's internal user lookup, as an httpx transport handler."""

    def __init__(self) -> None:
        self.users: dict[int, tuple[str, str]] = {}
        self.down = False
        self.calls = 0
        self.request_ids: list[str | None] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        self.request_ids.append(request.headers.get("X-Request-ID"))
        if self.down:
            return httpx.Response(503)
        assert request.headers["X-Service-Token"] == "test-service-token"
        ids = [int(i) for i in request.url.params.get_list("ids")]
        users = [
            {"id": i, "first_name": f, "last_name": last, "email": f"u{i}@example.com"}
            for i in ids
            if i in self.users
            for f, last in [self.users[i]]
        ]
        return httpx.Response(200, json={"users": users})


@dataclass
class User:
    id: int
    headers: dict[str, str]
    name: str


def new_user(signer: Signer, auth: AuthFake, *, first: str = "Jane", last: str = "Doe") -> User:
    user_id = next(_ids)
    auth.users[user_id] = (first, last)
    return User(id=user_id, headers={"Authorization": f"Bearer {signer.token(user_id)}"}, name=f"{first} {last}")


def open_wallet(client: TestClient, user: User, *, balance: int = 0, currency: str = "USD") -> Any:
    response = client.post("/wallet", json={"balance": balance, "currency": currency}, headers=user.headers)
    assert response.status_code == 201, response.text
    return response.json()


def key() -> str:
    return uuid.uuid4().hex


def move(client: TestClient, user: User, kind: str, *, idem: str | None = None, **body: Any) -> httpx.Response:
    body.setdefault("currency", "USD")
    headers = {**user.headers, "Idempotency-Key": idem or key()}
    return client.patch(f"/transaction/{kind}", json=body, headers=headers)


_MOVEMENTS = {"deposit": service.deposit, "withdraw": service.withdraw, "transfer": service.transfer}


def call(client: TestClient, user: User, endpoint: str, key: str, **body: Any) -> tuple[int, bytes]:
    """One movement through the service function the route calls, on the app's event loop
    (from any thread: each call is a task there, so many run at once)."""
    uow = client.app.state.uow  # type: ignore[attr-defined]
    body.setdefault("currency", "USD")
    if "to_account_id" in body:
        body["to_wallet_id"] = body.pop("to_account_id")

    async def run() -> tuple[int, bytes]:
        try:
            answer = await _MOVEMENTS[endpoint](uow, user_id=user.id, key=key, **body)
        except ProblemError as refusal:
            return refusal.status, refusal.code.encode()
        response = answer.response()
        return response.status_code, bytes(response.body)

    return client.portal.call(run)  # type: ignore[union-attr]


def post(client: TestClient, user: User, path: str, *, idem: str | None = None, **body: Any) -> httpx.Response:
    """A POST that moves or reserves money (holds, captures, voids, refunds), under a key."""
    return client.post(path, json=body, headers={**user.headers, "Idempotency-Key": idem or key()})


def place_hold(client: TestClient, user: User, *, amount: int, currency: str = "USD", **body: Any) -> Any:
    response = post(client, user, "/holds", amount=amount, currency=currency, **body)
    assert response.status_code == 201, response.text
    return response.json()


def call_use_case(client: TestClient, use_case: Callable[..., Any], **kwargs: Any) -> tuple[int, bytes]:
    """Any idempotent use case (holds, refunds) on the app's event loop, as `call` does."""
    uow = client.app.state.uow  # type: ignore[attr-defined]

    async def run() -> tuple[int, bytes]:
        try:
            answer = await use_case(uow, **kwargs)
        except ProblemError as refusal:
            return refusal.status, refusal.code.encode()
        response = answer.response()
        return response.status_code, bytes(response.body)

    return client.portal.call(run)  # type: ignore[union-attr]


_ENGINES: dict[str, Engine] = {}


def sync_engine(client: TestClient) -> Engine:
    """A plain (sync) engine on the app's database, for audits and checks beside the app."""
    url = client.app.state.settings.database_url  # type: ignore[attr-defined]
    if url not in _ENGINES:
        _ENGINES[url] = make_engine(url)
    return _ENGINES[url]


def run_all(jobs: list[Callable[[], tuple[int, bytes]]], workers: int = 16) -> list[tuple[int, bytes]]:
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda job: job(), jobs))
