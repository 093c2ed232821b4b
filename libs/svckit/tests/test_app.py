"""Request ids, problem details and the crash path, on a tiny app built with svckit."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel

from svckit.app import add_health_routes, base_app
from svckit.money import Amount
from svckit.problems import ProblemError


class Broke(ProblemError):
    status = 409
    code = "it_broke"
    title = "It broke"


class Body(BaseModel):
    amount: Amount


def make_app() -> FastAPI:
    app = base_app("test", log_level="INFO")

    @app.post("/pay")
    def pay(body: Body) -> dict[str, int]:
        return {"amount": body.amount}

    @app.get("/refuse")
    def refuse() -> None:
        raise Broke("no way")

    @app.get("/crash")
    def crash() -> None:
        raise RuntimeError("SELECT secret FROM passwords")

    return app


@pytest.fixture
def client() -> TestClient:
    return TestClient(make_app(), raise_server_exceptions=False)


class TestRequestId:
    def test_a_new_id_on_every_response(self, client: TestClient) -> None:
        a, b = client.get("/refuse"), client.get("/refuse")
        assert a.headers["x-request-id"] != b.headers["x-request-id"]
        assert len(a.headers["x-request-id"]) == 32

    @pytest.mark.parametrize("rid", ["abc", "A-b_c.1", "x" * 128])
    def test_a_well_formed_client_id_is_kept(self, client: TestClient, rid: str) -> None:
        assert client.get("/refuse", headers={"X-Request-ID": rid}).headers["x-request-id"] == rid

    @pytest.mark.parametrize("rid", ["x" * 129, "a b", "a/b", "<script>", "é"])
    def test_a_malformed_client_id_is_replaced(self, client: TestClient, rid: str) -> None:
        got = client.get("/refuse", headers={"X-Request-ID": rid.encode("utf-8")}).headers["x-request-id"]
        assert got != rid
        assert len(got) == 32

    def test_the_id_is_in_the_access_log(self, client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
        with caplog.at_level(logging.INFO, logger="access"):
            client.get("/refuse", headers={"X-Request-ID": "trace-me"})
        [record] = [r for r in caplog.records if r.name == "access"]
        assert record.request_id == "trace-me"  # type: ignore[attr-defined]
        assert record.status == 409  # type: ignore[attr-defined]


class TestProblems:
    def test_business_errors_are_problem_details(self, client: TestClient) -> None:
        response = client.get("/refuse")
        assert response.status_code == 409
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json() == {
            "type": "https://docs.wallet.example/problems/it_broke",
            "title": "It broke",
            "status": 409,
            "detail": "no way",
            "code": "it_broke",
        }

    def test_unknown_route_and_wrong_method_are_problems(self, client: TestClient) -> None:
        assert client.get("/nope").json()["code"] == "not_found"
        assert client.get("/pay").json()["code"] == "method_not_allowed"

    @pytest.mark.parametrize("amount", [0, -1, 1.5, 2.0, "200", True, 10**12 + 1, None])
    def test_amounts_are_strict_integers_in_range(self, client: TestClient, amount: object) -> None:
        response = client.post("/pay", json={"amount": amount})
        assert response.status_code == 422
        assert response.json()["errors"][0]["field"] == "amount"

    @pytest.mark.parametrize("amount", [1, 10**12])
    def test_amount_bounds_are_inclusive(self, client: TestClient, amount: int) -> None:
        assert client.post("/pay", json={"amount": amount}).json() == {"amount": amount}

    def test_a_crash_is_a_bare_500_with_a_request_id(
        self, client: TestClient, caplog: pytest.LogCaptureFixture
    ) -> None:
        with caplog.at_level(logging.ERROR):
            response = client.get("/crash", headers={"X-Request-ID": "crash-1"})
        assert response.status_code == 500
        assert response.headers["x-request-id"] == "crash-1"
        assert response.json()["code"] == "internal_error"
        assert "SELECT" not in response.text
        assert any(r.request_id == "crash-1" for r in caplog.records if r.levelno >= logging.ERROR)  # type: ignore[attr-defined]


class TestFrameworkErrors:
    def test_405_lists_every_method_of_the_path(self) -> None:
        app = base_app("test", log_level="INFO")

        @app.get("/thing")
        def read() -> dict[str, str]:
            return {}

        @app.delete("/thing")
        def remove() -> dict[str, str]:
            return {}

        response = TestClient(app).put("/thing")
        assert response.status_code == 405
        assert response.headers["allow"] == "DELETE, GET"
        assert response.json()["code"] == "method_not_allowed"

    def test_a_body_that_is_not_text_is_a_422(self, client: TestClient) -> None:
        response = client.post("/pay", content=b"\xff\xfe{", headers={"content-type": "application/json"})
        assert response.status_code == 422
        assert response.json()["errors"] == [{"field": "body", "message": "malformed body"}]

    def test_errors_are_documented_as_problem_json(self) -> None:
        doc = make_app().openapi()
        responses = doc["paths"]["/pay"]["post"]["responses"]
        assert list(responses["422"]["content"]) == ["application/problem+json"]
        assert responses["422"]["content"]["application/problem+json"]["schema"] == {
            "$ref": "#/components/schemas/Problem"
        }
        assert "HTTPValidationError" not in doc["components"]["schemas"]


class TestReadiness:
    @staticmethod
    def ready(checks: dict[str, bool], optional: set[str]) -> tuple[int, dict[str, object]]:
        def check(up: bool) -> Callable[[], None]:
            def run() -> None:
                if not up:
                    raise ConnectionError("down")

            return run

        app = base_app("test", log_level="INFO")
        add_health_routes(app, {name: check(up) for name, up in checks.items()}, optional=optional)
        response = TestClient(app).get("/readyz")
        return response.status_code, response.json()

    def test_all_up_is_ok(self) -> None:
        assert self.ready({"database": True, "redis": True}, {"redis"}) == (
            200,
            {"status": "ok", "checks": {"database": "ok", "redis": "ok"}, "degraded": []},
        )

    def test_an_optional_dependency_down_is_degraded_but_ready(self) -> None:
        assert self.ready({"database": True, "redis": False}, {"redis"}) == (
            200,
            {"status": "degraded", "checks": {"database": "ok", "redis": "ConnectionError"}, "degraded": ["redis"]},
        )

    def test_a_required_dependency_down_is_unavailable(self) -> None:
        status, body = self.ready({"database": False, "redis": False}, {"redis"})
        assert (status, body["status"], body["degraded"]) == (503, "unavailable", ["redis"])
        assert self.ready({"database": True, "redis": False}, set())[0] == 503  # Redis required by default

    def test_an_optional_check_must_exist(self) -> None:
        with pytest.raises(ValueError, match="redsi"):
            add_health_routes(base_app("test", log_level="INFO"), optional={"redsi"})
