"""Black-box helpers for the end-to-end tests: only HTTP, only the public API."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx

PASSWORD = "securepass123"


@dataclass
class User:
    id: int
    email: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def unique_email(prefix: str = "user") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}@example.com"


def signup(api: httpx.Client, *, first_name: str = "Jane", last_name: str = "Doe", email: str | None = None) -> Any:
    body = {"first_name": first_name, "last_name": last_name, "email": email or unique_email(), "password": PASSWORD}
    response = api.post("/signup", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def login(api: httpx.Client, email: str, password: str = PASSWORD) -> httpx.Response:
    """POST /token, waiting out the per-IP login limit (429 `rate_limited`, which checked
    nothing) as a careful client would; every other answer, a lockout's 429 included, is final."""
    deadline = time.monotonic() + 30
    while True:
        response = api.post("/token", data={"username": email, "password": password})
        limited = response.status_code == 429 and response.json().get("code") == "rate_limited"
        if not limited or time.monotonic() > deadline:
            return response
        time.sleep(float(response.headers.get("retry-after", "1")))


def new_user(api: httpx.Client, **kwargs: Any) -> User:
    profile = signup(api, **kwargs)
    response = login(api, profile["email"])
    assert response.status_code == 200, response.text
    return User(id=profile["id"], email=profile["email"], token=response.json()["access_token"])


def open_wallet(api: httpx.Client, user: User, *, balance: int = 0, currency: str = "USD") -> Any:
    response = api.post("/wallet", json={"balance": balance, "currency": currency}, headers=user.headers)
    assert response.status_code == 201, response.text
    return response.json()


class ServerError(AssertionError):
    """The service answered 5xx: never retried here, so the test that met it fails."""


def move(api: httpx.Client, user: User, kind: str, *, key: str | None = None, **body: Any) -> httpx.Response:
    """One money movement, retried with the same key (as a careful client would) on 429,
    409 idempotency_in_progress or a dropped connection, until the answer is definitive.
    A 5xx is not retried: it raises ServerError with the answer's body."""
    body.setdefault("currency", "USD")
    headers = {**user.headers, "Idempotency-Key": key or uuid.uuid4().hex}
    deadline = time.monotonic() + 60
    while True:
        try:
            response = api.patch(f"/transaction/{kind}", json=body, headers=headers)
        except httpx.TransportError:
            response = None
        if response is not None and response.status_code >= 500:
            request_id = response.headers.get("x-request-id", "")
            raise ServerError(
                f"{kind} answered {response.status_code} (request id {request_id!r}): {response.text[:1000]}"
            )
        retry = response is None or response.status_code == 429
        if response is not None and response.status_code == 409:
            retry = response.json().get("code") == "idempotency_in_progress"
        if not retry or time.monotonic() > deadline:
            assert response is not None, "no answer before the deadline"
            return response
        time.sleep(0.05)


def balance(api: httpx.Client, user: User) -> int:
    response = api.get("/wallet", headers=user.headers)
    assert response.status_code == 200, response.text
    return int(response.json()["balance"])
