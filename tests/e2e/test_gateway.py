"""The gateway routes exactly the public API, limits bursts, and serves the docs."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from .client import new_user, unique_email

PUBLIC_PATHS = {
    "/signup",
    "/token",
    "/users/{user_id}",
    "/.well-known/jwks.json",
    "/wallet",
    "/wallet/statement",
    "/transaction/deposit",
    "/transaction/withdraw",
    "/transaction/transfer",
    "/transaction/history",
    "/transaction/{transaction_id}/ledger",
    "/transaction/{transaction_id}",
    "/transaction/{transaction_id}/refund",
    "/wallet/balance",
    "/holds",
    "/holds/{hold_id}",
    "/holds/{hold_id}/capture",
    "/holds/{hold_id}/void",
}


class TestRouting:
    @pytest.mark.parametrize(
        "path",
        [
            "/internal/users?ids=1",
            "/metrics",
            "/healthz",
            "/readyz",
            "/ping",
            "/nope",
            "/users/1/extra",
            "/__not-found",
        ],
    )
    def test_internal_and_unknown_paths_are_404_problems(self, api: httpx.Client, path: str) -> None:
        response = api.get(path, headers={"X-Service-Token": "guess"})
        assert response.status_code == 404
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["code"] == "not_found"

    def test_internal_lookup_is_unreachable_even_with_the_real_credential_path(self, api: httpx.Client) -> None:
        user = new_user(api)
        response = api.get(f"/internal/users?ids={user.id}")
        assert response.status_code == 404
        assert user.email not in response.text

    def test_public_calls_reach_their_service_with_a_request_id(self, api: httpx.Client) -> None:
        response = api.get("/.well-known/jwks.json", headers={"X-Request-ID": "e2e-trace-1"})
        assert response.status_code == 200
        assert response.json()["keys"][0]["alg"] == "EdDSA"
        assert response.headers["x-request-id"] == "e2e-trace-1"


class TestDocs:
    def test_openapi_lists_every_public_path_of_every_service(self, api: httpx.Client) -> None:
        paths = set(api.get("/openapi.json").json()["paths"])
        assert paths == PUBLIC_PATHS
        assert not any(p.startswith("/internal") for p in paths)

    @pytest.mark.parametrize(("page", "asset"), [("/docs", "swagger-ui-bundle.js"), ("/redoc", "redoc.standalone.js")])
    def test_docs_pages_use_local_assets(self, api: httpx.Client, page: str, asset: str) -> None:
        html = api.get(page)
        assert html.status_code == 200
        assert f"/docs-assets/{asset}" in html.text
        assert "cdn." not in html.text
        script = api.get(f"/docs-assets/{asset}")
        assert script.status_code == 200
        assert len(script.content) > 100_000


class TestRateLimits:
    def test_a_burst_on_token_gets_rate_limited_problems(self, api: httpx.Client) -> None:
        # Distinct unknown emails, so the per-account lockout never answers: only the
        # per-IP limit (20/s, burst 40; auth's, through the gateway) can produce a 429 here.
        def attempt(i: int) -> httpx.Response:
            data = {"username": unique_email(f"burst{i}"), "password": "wrong-password"}
            return api.post("/token", data=data)

        with ThreadPoolExecutor(32) as pool:
            responses = list(pool.map(attempt, range(150)))
        codes = [r.status_code for r in responses]
        assert set(codes) <= {401, 429}
        limited = [r for r in responses if r.status_code == 429]
        assert {r.headers["content-type"] for r in limited} == {"application/problem+json"}
        assert {r.json()["code"] for r in limited} == {"rate_limited"}
        assert all(int(r.headers["retry-after"]) >= 1 and r.headers["x-request-id"] for r in limited)
        assert codes.count(429) > 0
        assert codes.count(401) >= 20  # the burst itself goes through (minus what earlier tests used)
        time.sleep(2.5)  # let the bucket refill for the other tests
        assert api.post("/token", data={"username": unique_email(), "password": "x" * 8}).status_code == 401
