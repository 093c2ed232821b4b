"""The gateway's own answers keep the contract: problem documents with a stable code, and an
X-Request-ID that the gateway's access log records too, so its log joins the services'.

A stack of its own (small limits, a 2 s backend timeout), since these tests stop its
processes: the auth service, the wallet (SIGSTOP: it accepts connections, never answers),
and, last, the limiter's Redis.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import Stack, start_stack

RATE, BURST = 1, 2
BACKEND_TIMEOUT_S = 2
CANONICAL_BEARER = {"Authorization": "Bearer aaaa.bbbb.cccc"}  # admitted to the limit; the wallet says 401


@pytest.fixture(scope="module")
def problems_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = start_stack(
        tmp_path_factory.mktemp("gateway-problems") / "var",
        WALLET_REPLICAS="1",
        GATEWAY_AUTH_RATE_AVERAGE=str(RATE),
        GATEWAY_AUTH_RATE_BURST=str(BURST),
        GATEWAY_MONEY_RATE_AVERAGE=str(RATE),
        GATEWAY_MONEY_RATE_BURST=str(BURST),
        GATEWAY_BACKEND_TIMEOUT_S=str(BACKEND_TIMEOUT_S),
    )
    yield stack
    stack.stop()


@pytest.fixture
def api(problems_stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=problems_stack.url, timeout=30) as client:
        yield client


def pids(stack: Stack, comm: str, match: str, *, check_env: bool = True) -> list[int]:
    """The stack's live processes named `comm` whose command line contains `match`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if (proc / "comm").read_text().strip() != comm:
                continue
            if check_env and f"STACK_ID={stack.stack_id}".encode() not in (proc / "environ").read_bytes():
                continue
            if match.encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def log_lines(path: Path) -> list[dict[str, object]]:
    lines = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue
    return lines


def wait_for_line(path: Path, key: str, value: str, timeout: float = 10) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        found = [line for line in log_lines(path) if line.get(key) == value]
        if found:
            return found[-1]
        assert time.monotonic() < deadline, f"no line with {key}={value} in {path}"
        time.sleep(0.2)


def assert_problem(response: httpx.Response, status: int, code: str, *, retry_after: bool) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status
    assert body["code"] == code
    assert body["type"].endswith("/" + code)
    assert body["title"]
    assert body["detail"]
    if retry_after:
        assert int(response.headers["Retry-After"]) >= 1
    else:
        assert "Retry-After" not in response.headers
    rid = response.headers["X-Request-ID"]
    assert rid
    return rid


def assert_joinable(stack: Stack, rid: str, service_log: str) -> None:
    """The gateway's access log and the answering process's log both hold the id."""
    access = wait_for_line(stack.var / "logs" / "gateway-access.json", "downstream_X-Request-Id", rid)
    assert access["DownstreamStatus"]
    wait_for_line(stack.var / "logs" / f"{service_log}.log", "request_id", rid)


def wait_until(check: object, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.3)


class TestJoin:
    def test_an_answer_from_a_service_is_logged_with_its_id_by_the_gateway_and_the_service(
        self, api: httpx.Client, problems_stack: Stack
    ) -> None:
        response = api.get("/.well-known/jwks.json")
        assert response.status_code == 200
        assert_joinable(problems_stack, response.headers["X-Request-ID"], "auth")


class TestRateLimit:
    def test_a_signup_flood_gets_429_problems_with_retry_after_and_a_logged_id(
        self, api: httpx.Client, problems_stack: Stack
    ) -> None:
        responses = [api.post("/signup", json={}) for _ in range(BURST + 6)]
        codes = [r.status_code for r in responses]
        assert set(codes) <= {422, 429}, codes
        limited = [r for r in responses if r.status_code == 429]
        assert limited, codes
        for response in limited:
            rid = assert_problem(response, 429, "rate_limited", retry_after=True)
        assert_joinable(problems_stack, rid, "docs")

    def test_a_login_flood_gets_rate_limited_problems_from_auth_logged_by_both(
        self, api: httpx.Client, problems_stack: Stack
    ) -> None:
        # The per-IP limit of POST /token is auth's (its account_locked shares the route),
        # with the same small rate as signup's here.
        data = {"username": f"nobody-{uuid.uuid4().hex}@example.com", "password": "wrong-password"}
        responses = [api.post("/token", data=data) for _ in range(BURST + 6)]
        codes = [r.status_code for r in responses]
        assert set(codes) <= {401, 429}, codes
        limited = [r for r in responses if r.status_code == 429]
        assert limited, codes
        for response in limited:
            rid = assert_problem(response, 429, "rate_limited", retry_after=True)
        assert_joinable(problems_stack, rid, "auth")

    def test_a_money_flood_gets_429_problems_and_keeps_the_clients_request_id(self, api: httpx.Client) -> None:
        rid = f"flood-{uuid.uuid4().hex}"
        responses = [
            api.patch("/transaction/deposit", json={}, headers={**CANONICAL_BEARER, "X-Request-ID": rid})
            for _ in range(BURST + 6)
        ]
        codes = [r.status_code for r in responses]
        assert set(codes) <= {401, 429}, codes
        limited = [r for r in responses if r.status_code == 429]
        assert limited, codes
        for response in limited:
            assert assert_problem(response, 429, "rate_limited", retry_after=True) == rid


class TestBackendDown:
    def test_a_stopped_backend_gets_a_502_problem_with_retry_after(
        self, api: httpx.Client, problems_stack: Stack
    ) -> None:
        port = str(problems_stack.ports["auth"])  # type: ignore[index]
        hold = problems_stack.var / "run" / "hold-auth"
        hold.touch()
        try:
            for pid in pids(problems_stack, "uvicorn", f"--port\x00{port}\x00"):
                os.kill(pid, signal.SIGKILL)
            wait_until(lambda: not pids(problems_stack, "uvicorn", f"--port\x00{port}\x00"))
            response = api.get("/.well-known/jwks.json")
            rid = assert_problem(response, 502, "upstream_unavailable", retry_after=True)
            assert_joinable(problems_stack, rid, "docs")
        finally:
            hold.unlink()
        wait_until(lambda: api.get("/.well-known/jwks.json").status_code == 200)

    def test_a_backend_slower_than_the_gateway_timeout_gets_a_504_problem(
        self, api: httpx.Client, problems_stack: Stack
    ) -> None:
        port = str(problems_stack.ports["wallet1"])  # type: ignore[index]
        (pid,) = pids(problems_stack, "uvicorn", f"--port\x00{port}\x00")
        os.kill(pid, signal.SIGSTOP)  # the socket still accepts; nothing answers
        try:
            response = api.get("/wallet", headers=CANONICAL_BEARER)
        finally:
            os.kill(pid, signal.SIGCONT)
        rid = assert_problem(response, 504, "upstream_unavailable", retry_after=True)
        assert_joinable(problems_stack, rid, "docs")
        wait_until(lambda: api.get("/wallet", headers=CANONICAL_BEARER).status_code == 401)


class TestLimiterRedisDown:
    """Last in this module: the stack's Redis stays down until the stack stops."""

    def test_limited_calls_get_a_500_gateway_error_problem(self, api: httpx.Client, problems_stack: Stack) -> None:
        port = problems_stack.redis_url.rsplit(":", 1)[1].split("/")[0]
        (problems_stack.var / "run" / "hold-redis").touch()
        for pid in pids(problems_stack, "redis-server", port, check_env=False):
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not pids(problems_stack, "redis-server", port, check_env=False))
        response = api.patch("/transaction/deposit", json={}, headers=CANONICAL_BEARER)
        rid = assert_problem(response, 500, "gateway_error", retry_after=False)
        assert_joinable(problems_stack, rid, "docs")
        signup = api.post("/signup", json={})
        assert_problem(signup, 500, "gateway_error", retry_after=False)
        # An unlimited route still reaches its service.
        assert api.get("/.well-known/jwks.json").status_code == 200
