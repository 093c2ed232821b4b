"""The docs app's pages for the gateway's own answers (gateway/dynamic/routes.yml)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from svckit.docs import create_app


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch) -> TestClient:
    monkeypatch.setenv("DOCS_SOURCES", "")
    return TestClient(create_app())


@pytest.mark.parametrize(
    ("status", "code", "retry_after"),
    [
        (429, "rate_limited", "1"),
        (500, "gateway_error", None),
        (502, "upstream_unavailable", "1"),
        (503, "service_unavailable", "1"),
        (504, "upstream_unavailable", "1"),
    ],
)
@pytest.mark.parametrize("method", ["GET", "POST", "PATCH"])
def test_gateway_pages_are_problems_with_a_request_id(
    client: TestClient, method: str, status: int, code: str, retry_after: str | None
) -> None:
    response = client.request(method, f"/__gateway/{status}", headers={"X-Request-ID": "client-id-1"})
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["X-Request-ID"] == "client-id-1"
    assert response.headers.get("Retry-After") == retry_after
    body = response.json()
    assert (body["status"], body["code"]) == (status, code)
    assert body["type"].endswith("/" + code)
    assert body["title"]
    assert body["detail"]


def test_a_gateway_page_makes_a_request_id_when_the_client_sent_none(client: TestClient) -> None:
    response = client.get("/__gateway/502")
    assert response.headers["X-Request-ID"]


def test_an_unexpected_status_is_a_gateway_error(client: TestClient) -> None:
    response = client.get("/__gateway/418")
    assert response.status_code == 500
    assert response.json()["code"] == "gateway_error"
