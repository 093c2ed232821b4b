"""The careful client of these tests (client.move): what it retries and what it does not.
No stack: a scripted transport plays the service."""

from __future__ import annotations

import httpx
import pytest

from .client import User, move

ServerError = AssertionError

USER = User(id=1, email="j@example.com", token="t")


def scripted(*answers: httpx.Response | type[Exception]) -> tuple[httpx.Client, list[str]]:
    """A client whose calls get `answers` in order; returns it and the keys it was sent."""
    keys: list[str] = []
    queue = list(answers)

    def handle(request: httpx.Request) -> httpx.Response:
        keys.append(request.headers["idempotency-key"])
        answer = queue.pop(0)
        if isinstance(answer, httpx.Response):
            return answer
        raise answer("dropped", request=request)

    return httpx.Client(base_url="http://wallet.test", transport=httpx.MockTransport(handle)), keys


def test_429_in_progress_and_dropped_connections_are_retried_with_the_same_key() -> None:
    api, keys = scripted(
        httpx.Response(429, json={"code": "rate_limited"}),
        httpx.Response(409, json={"code": "idempotency_in_progress"}),
        httpx.ConnectError,
        httpx.Response(200, json={"id": 7}),
    )
    assert move(api, USER, "deposit", amount=5).json() == {"id": 7}
    assert len(keys) == 4
    assert len(set(keys)) == 1


def test_another_409_is_the_answer() -> None:
    api, keys = scripted(httpx.Response(409, json={"code": "idempotency_key_reused"}))
    assert move(api, USER, "deposit", amount=5).status_code == 409
    assert len(keys) == 1


@pytest.mark.parametrize("status", [500, 502, 503])
def test_a_5xx_is_not_retried_and_fails_with_its_body(status: int) -> None:
    api, keys = scripted(
        httpx.Response(status, json={"detail": "database is locked"}), httpx.Response(200, json={"id": 7})
    )
    with pytest.raises(ServerError, match="database is locked"):
        move(api, USER, "deposit", amount=5)
    assert len(keys) == 1
