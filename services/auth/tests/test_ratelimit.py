"""POST /token per client IP: a 429 `rate_limited` problem past the burst, before any
password check, keyed on the address the gateway saw (X-Forwarded-For's rightmost entry)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from starlette.requests import Request

from auth.config import Settings
from auth.ratelimit import IpRateLimit, client_ip
from svckit.redis import redis_client
from svckit.testing import free_port

from .conftest import app_client
from .factories import login, signup

BURST = 3


@pytest.fixture
def limited(settings: Settings) -> Iterator[TestClient]:
    with app_client(settings.model_copy(update={"token_rate_average": 1, "token_rate_burst": BURST})) as c:
        yield c


def from_ip(client: TestClient, forwarded: str, **kw: str) -> int:
    client.headers["X-Forwarded-For"] = forwarded
    return login(client, **kw).status_code


def test_past_the_burst_a_client_gets_a_rate_limited_problem_before_any_password_check(
    limited: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    signup(limited)
    assert [from_ip(limited, "203.0.113.7") for _ in range(BURST)] == [200] * BURST
    checks: list[str] = []
    hasher = limited.app.state.hasher  # type: ignore[attr-defined]
    monkeypatch.setattr(hasher, "verify", lambda *a: checks.append("verify") or True)
    r = login(limited)
    assert r.status_code == 429
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["code"] == "rate_limited"
    assert int(r.headers["Retry-After"]) >= 1
    assert checks == []  # refused before bcrypt


def test_each_address_has_its_own_bucket_and_a_forged_header_entry_does_not_help(limited: TestClient) -> None:
    signup(limited)
    for _ in range(BURST):
        assert from_ip(limited, "203.0.113.7") == 200
    assert from_ip(limited, "203.0.113.7") == 429
    # A client's own X-Forwarded-For is dropped by the gateway; one that got through is
    # still left of the gateway's entry, which is what counts.
    assert from_ip(limited, "198.51.100.1, 203.0.113.7") == 429
    assert from_ip(limited, "203.0.113.8") == 200


def test_depth_counts_trusted_proxies_from_the_right() -> None:
    def request(forwarded: str | None) -> Request:
        headers = [(b"x-forwarded-for", forwarded.encode())] if forwarded else []
        return Request({"type": "http", "headers": headers, "client": ("10.0.0.9", 5000)})

    assert client_ip(request("198.51.100.1, 10.1.1.1"), 0) == "10.1.1.1"
    assert client_ip(request("198.51.100.1, 10.1.1.1"), 1) == "198.51.100.1"
    assert client_ip(request("10.1.1.1"), 3) == "10.1.1.1"  # fewer entries: the leftmost
    assert client_ip(request(None), 0) == "10.0.0.9"  # no gateway in front: the TCP peer


def test_redis_down_skips_the_limit_and_logs_it(caplog: pytest.LogCaptureFixture) -> None:
    dead = redis_client(f"redis://127.0.0.1:{free_port()}/0")
    limit = IpRateLimit(dead, name="token", average=1, burst=1)
    request = Request({"type": "http", "headers": [], "client": ("203.0.113.7", 5000)})
    with caplog.at_level(logging.ERROR, logger="auth.ratelimit"):
        for _ in range(3):
            limit.check(request)  # no exception: logins keep working
    assert "Redis unavailable" in caplog.text
