"""Black-box helpers for the end-to-end tests: only HTTP, only the public API."""

from __future__ import annotations

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
    return api.post("/token", data={"username": email, "password": password})


def new_user(api: httpx.Client, **kwargs: Any) -> User:
    profile = signup(api, **kwargs)
    response = login(api, profile["email"])
    assert response.status_code == 200, response.text
    return User(id=profile["id"], email=profile["email"], token=response.json()["access_token"])
