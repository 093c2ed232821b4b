"""The one per-request middleware: metrics by route template, the access line's fields,
the crash and the 413 counted with their request ids; and the JSON lines' shape."""

from __future__ import annotations

import json
import logging

import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from pythonjsonlogger.json import JsonFormatter

from svckit.app import base_app
from svckit.logging import _JsonLines

SERVICE = "plumbing-test"


def count(route: str, status: str, method: str = "GET") -> float:
    labels = {"service": SERVICE, "method": method, "route": route, "status": status}
    return REGISTRY.get_sample_value("http_requests_total", labels) or 0.0


def observed(route: str, method: str = "GET") -> float:
    labels = {"service": SERVICE, "method": method, "route": route}
    return REGISTRY.get_sample_value("http_request_duration_seconds_count", labels) or 0.0


@pytest.fixture
def client() -> TestClient:
    app: FastAPI = base_app(SERVICE, log_level="INFO", max_body_bytes=10)

    @app.get("/things/{thing_id}")
    def thing(thing_id: int) -> dict[str, int]:
        return {"id": thing_id}

    @app.post("/things")
    def create(body: dict[str, str]) -> dict[str, str]:
        return body

    @app.get("/crash")
    def crash() -> None:
        raise RuntimeError("boom")

    return TestClient(app, raise_server_exceptions=False)


def test_requests_are_counted_by_route_template(client: TestClient) -> None:
    before, seen = count("/things/{thing_id}", "200"), observed("/things/{thing_id}")
    for n in (1, 2, 3):
        assert client.get(f"/things/{n}").status_code == 200
    assert count("/things/{thing_id}", "200") == before + 3
    assert observed("/things/{thing_id}") == seen + 3
    assert REGISTRY.get_sample_value("http_requests_total", {"route": "/things/1"}) is None


def test_unmatched_crash_and_too_large_are_counted(client: TestClient) -> None:
    unmatched, crashed, large = count("unmatched", "404"), count("/crash", "500"), count("unmatched", "413", "POST")
    assert client.get("/nope").status_code == 404
    response = client.get("/crash", headers={"X-Request-ID": "crash-2"})
    assert (response.status_code, response.headers["x-request-id"]) == (500, "crash-2")
    response = client.post("/things", json={"name": "x" * 20}, headers={"X-Request-ID": "big-1"})
    assert (response.status_code, response.headers["x-request-id"]) == (413, "big-1")
    assert response.json()["code"] == "payload_too_large"
    assert count("unmatched", "404") == unmatched + 1
    assert count("/crash", "500") == crashed + 1
    assert count("unmatched", "413", "POST") == large + 1  # refused before routing


def test_the_access_line_has_its_fields(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="access"):
        client.get("/things/7?x=1", headers={"X-Request-ID": "line-1"})
    [record] = [r for r in caplog.records if r.name == "access"]
    assert record.getMessage() == "request"
    assert (record.method, record.path, record.status) == ("GET", "/things/7", 200)  # type: ignore[attr-defined]
    assert record.request_id == "line-1"  # type: ignore[attr-defined]
    assert isinstance(record.duration_ms, float)  # type: ignore[attr-defined]
    assert record.filename == "requestid.py"
    assert record.funcName == "__call__"


def test_a_response_with_its_own_request_id_header_carries_ours_once() -> None:
    app = base_app(SERVICE, log_level="INFO")

    @app.get("/echo")
    def echo() -> JSONResponse:
        return JSONResponse({}, headers={"X-Request-ID": "spoofed"})

    response = TestClient(app).get("/echo", headers={"X-Request-ID": "mine"})
    assert response.headers.get_list("x-request-id") == ["mine"]


def records() -> list[logging.LogRecord]:
    log = logging.getLogger("shape")
    out = [
        log.makeRecord("access", logging.INFO, "f.py", 1, "request", (), None, "fn", {"status": 200, "path": "/é"}),
        log.makeRecord("a.b", logging.WARNING, "f.py", 2, "hello %s %d", ("world", 3), None, "fn"),
        log.makeRecord("x", logging.INFO, "f.py", 3, "odd", (), None, "fn", {"obj": object(), "t": (1, 2)}),
        log.makeRecord("x", logging.INFO, "f.py", 4, {"a": 1}, (), None, "fn"),
        log.makeRecord("x", logging.INFO, "f.py", 5, "stack", (), None, "fn", sinfo="Stack:\n  here"),
    ]
    try:
        raise ZeroDivisionError("no")
    except ZeroDivisionError:
        import sys

        out.append(log.makeRecord("e", logging.ERROR, "f.py", 6, "failed", (), sys.exc_info(), "fn"))
    for record in out:
        record.request_id = "rid"
    return out


def test_json_lines_are_python_json_loggers_field_for_field() -> None:
    reference = JsonFormatter(
        "{levelname}{name}{message}",
        style="{",
        rename_fields={"levelname": "level", "name": "logger"},
        static_fields={"service": "svc"},
        timestamp="time",
    )
    ours = _JsonLines("svc")
    for record in records():
        expected = reference.format(record)
        record.exc_text = None  # formatted again from exc_info, as the first formatter would
        assert ours.format(record) == expected
        assert list(json.loads(expected))[:4] == ["level", "logger", "message", "service"]
