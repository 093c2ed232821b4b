from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

PASSWORD = "securepass123"
SERVICE_TOKEN = "auth-tests-service-token-0123456789abcdef"  # as long as the production rule asks


def signup(client: TestClient, *, email: str = "jane@example.com", password: str = PASSWORD, **extra: Any) -> Any:
    body = {"first_name": "Jane", "last_name": "Doe", "email": email, "password": password, **extra}
    response = client.post("/signup", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def login(client: TestClient, *, email: str = "jane@example.com", password: str = PASSWORD) -> Any:
    return client.post("/token", data={"username": email, "password": password})


def token_for(client: TestClient, *, email: str = "jane@example.com", password: str = PASSWORD) -> str:
    response = login(client, email=email, password=password)
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
