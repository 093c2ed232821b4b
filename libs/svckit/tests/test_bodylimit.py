"""Request bodies over the cap answer a 413 problem, and are not read in full."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Annotated

import pytest
from fastapi import FastAPI, Form, Request
from fastapi.testclient import TestClient
from pydantic import BaseModel
from pydantic_settings import SettingsConfigDict
from starlette.types import Message, Scope

from svckit.app import base_app
from svckit.bodylimit import BodyLimitMiddleware
from svckit.settings import BaseServiceSettings

LIMIT = 100


class Note(BaseModel):
    text: str


def make_app(calls: list[str]) -> FastAPI:
    app = base_app("test", log_level="INFO", max_body_bytes=LIMIT)

    @app.post("/notes")
    def create(note: Note) -> dict[str, int]:
        calls.append("notes")
        return {"length": len(note.text)}

    @app.post("/login")
    def login(username: Annotated[str, Form()]) -> dict[str, int]:
        calls.append("login")
        return {"length": len(username)}

    @app.post("/raw")
    async def raw(request: Request) -> dict[str, int]:
        body = await request.body()
        calls.append("raw")
        return {"length": len(body)}

    return app


@pytest.fixture
def calls() -> list[str]:
    return []


@pytest.fixture
def client(calls: list[str]) -> TestClient:
    return TestClient(make_app(calls), raise_server_exceptions=False)


def note(size: int) -> bytes:
    """A JSON body of exactly `size` bytes."""
    body = json.dumps({"text": ""}).encode()
    return json.dumps({"text": "x" * (size - len(body))}).encode()


def chunks(body: bytes, size: int = 30) -> Iterator[bytes]:
    for i in range(0, len(body), size):
        yield body[i : i + size]


def assert_too_large(response: object) -> None:
    from httpx import Response

    assert isinstance(response, Response)
    assert response.status_code == 413
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["code"] == "payload_too_large"
    assert problem["status"] == 413
    assert str(LIMIT) in problem["detail"]
    assert len(response.headers["x-request-id"]) == 32  # answered inside the request-id frame


class TestDeclaredLength:
    @pytest.mark.parametrize("path", ["/notes", "/raw"])
    def test_over_the_cap_is_refused_and_nothing_runs(self, client: TestClient, calls: list[str], path: str) -> None:
        response = client.post(path, content=note(LIMIT + 1), headers={"content-type": "application/json"})
        assert_too_large(response)
        assert calls == []

    def test_a_form_over_the_cap_is_refused(self, client: TestClient, calls: list[str]) -> None:
        assert_too_large(client.post("/login", data={"username": "u" * LIMIT}))
        assert calls == []

    @pytest.mark.parametrize("path", ["/notes", "/raw"])
    def test_exactly_at_the_cap_passes(self, client: TestClient, calls: list[str], path: str) -> None:
        response = client.post(path, content=note(LIMIT), headers={"content-type": "application/json"})
        assert response.status_code == 200, response.text
        assert calls == [path.strip("/")]

    def test_the_body_is_not_read(self) -> None:
        """A declared length over the cap is refused before the first `receive`."""
        received: list[Message] = []
        sent: list[Message] = []

        async def app(scope: Scope, receive: object, send: object) -> None:
            raise AssertionError("the app must not run")

        async def receive() -> Message:
            received.append({})
            return {"type": "http.request", "body": b"x" * 10, "more_body": True}

        async def send(message: Message) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/", "headers": [(b"content-length", b"8388608")]}
        asyncio.run(BodyLimitMiddleware(app, max_bytes=LIMIT)(scope, receive, send))  # type: ignore[arg-type]
        assert received == []
        assert sent[0]["status"] == 413


class TestStreamedBody:
    @pytest.mark.parametrize("path", ["/notes", "/raw"])
    def test_a_chunked_body_over_the_cap_is_refused(self, client: TestClient, calls: list[str], path: str) -> None:
        response = client.post(path, content=chunks(note(LIMIT + 1)), headers={"content-type": "application/json"})
        assert "content-length" not in response.request.headers
        assert_too_large(response)
        assert calls == []

    def test_a_chunked_form_over_the_cap_is_refused(self, client: TestClient, calls: list[str]) -> None:
        body = b"username=" + b"u" * LIMIT
        headers = {"content-type": "application/x-www-form-urlencoded"}
        assert_too_large(client.post("/login", content=chunks(body), headers=headers))
        assert calls == []

    @pytest.mark.parametrize("path", ["/notes", "/raw"])
    def test_a_chunked_body_exactly_at_the_cap_passes(self, client: TestClient, calls: list[str], path: str) -> None:
        response = client.post(path, content=chunks(note(LIMIT)), headers={"content-type": "application/json"})
        assert response.status_code == 200, response.text
        assert calls == [path.strip("/")]

    def test_reading_stops_at_the_first_chunk_past_the_cap(self, calls: list[str]) -> None:
        """An endless body: the app gets 413 after reading just past the cap, not the stream."""
        received = 0
        sent: list[Message] = []

        async def receive() -> Message:
            nonlocal received
            received += 1
            return {"type": "http.request", "body": b"x" * 30, "more_body": True}

        async def send(message: Message) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/raw",
            "raw_path": b"/raw",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"content-type", b"application/octet-stream")],
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80),
        }
        asyncio.run(make_app(calls)(scope, receive, send))  # type: ignore[arg-type]
        assert received == 4  # 120 bytes > 100
        assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [413]
        assert json.loads(b"".join(m.get("body", b"") for m in sent))["code"] == "payload_too_large"


class TestSetting:
    def test_the_cap_is_a_setting_with_the_service_prefix(self, monkeypatch: pytest.MonkeyPatch) -> None:
        class Settings(BaseServiceSettings):
            model_config = SettingsConfigDict(env_prefix="DEMO_")

        assert Settings().max_body_bytes == 65536
        monkeypatch.setenv("DEMO_MAX_BODY_BYTES", "1024")
        assert Settings().max_body_bytes == 1024

    def test_a_cap_must_be_positive(self) -> None:
        with pytest.raises(ValueError, match="positive"):
            BodyLimitMiddleware(FastAPI(), max_bytes=0)
