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
from fastapi import Response
from fastapi.testclient import TestClient
from jwt.algorithms import OKPAlgorithm
from sqlmodel import Session

from svckit.problems import ProblemError
from wallet.idempotency import Operation, run_idempotent

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


def call(
    client: TestClient, user: User, endpoint: str, key: str, payload: dict[str, object], operation: Operation
) -> tuple[int, bytes]:
    """One request, as the route would run it, in its own session (its own connection)."""
    state = client.app.state  # type: ignore[attr-defined]
    with Session(state.engine) as session:
        try:
            response: Response = run_idempotent(
                session,
                cache=state.idempotency,
                user_id=user.id,
                endpoint=endpoint,
                key=key,
                payload=payload,
                operation=operation,
                retries=state.settings.db_retries,
            )
        except ProblemError as refusal:
            return refusal.status, refusal.code.encode()
        return response.status_code, bytes(response.body)


def run_all(jobs: list[Callable[[], tuple[int, bytes]]], workers: int = 16) -> list[tuple[int, bytes]]:
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda job: job(), jobs))
