"""The lockout holds under parallel guesses: each attempt is counted before bcrypt runs."""

from __future__ import annotations

import logging
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from fastapi.testclient import TestClient

from auth.config import Settings
from auth.main import create_app
from auth.security import PasswordHasher
from svckit.redis import redis_client
from svckit.testing import free_port

from .factories import PASSWORD, login, signup

WRONG = "wrong-password"


class GatedHasher:
    """Holds every password check until the test opens a gate, so all attempts overlap.

    `release(predicate)` lets through the checks whose password matches; `wait_for(n)`
    waits until n checks are being held or answered. No timing is asserted."""

    def __init__(self, real: PasswordHasher) -> None:
        self.real = real
        self.cond = threading.Condition()
        self.held = 0
        self.answered = 0
        self.open: Callable[[str], bool] = lambda _: False

    def verify(self, password: str, hashed: str | None) -> bool:
        with self.cond:
            self.held += 1
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.open(password), timeout=30)
            self.held -= 1
        return self.real.verify(password, hashed)

    def hash(self, password: str) -> str:
        return self.real.hash(password)

    def note_answer(self) -> None:
        with self.cond:
            self.answered += 1
            self.cond.notify_all()

    def wait_for(self, predicate: Callable[[GatedHasher], bool]) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: predicate(self), timeout=30)

    def release(self, which: Callable[[str], bool]) -> None:
        with self.cond:
            self.open = which
            self.cond.notify_all()


@pytest.fixture
def gate(client: TestClient) -> Iterator[GatedHasher]:
    state: Any = client.app.state  # type: ignore[attr-defined]
    real = state.hasher
    state.hasher = GatedHasher(real)
    yield state.hasher
    state.hasher.release(lambda _: True)
    state.hasher = real


def send_at_once(
    client: TestClient, gate: GatedHasher, attempts: list[tuple[str, str]]
) -> tuple[ThreadPoolExecutor, list[Any]]:
    pool = ThreadPoolExecutor(len(attempts))

    def one(email: str, password: str) -> Any:
        try:
            return login(client, email=email, password=password)
        finally:
            gate.note_answer()

    return pool, [pool.submit(one, email, password) for email, password in attempts]


class TestParallelGuesses:
    @pytest.mark.parametrize("email", ["jane@example.com", "ghost@example.com"])
    def test_thirty_wrong_passwords_at_once_get_at_most_ten_checks(
        self, client: TestClient, gate: GatedHasher, email: str
    ) -> None:
        signup(client)
        pool, futures = send_at_once(client, gate, [(email, WRONG)] * 30)
        # Every attempt is either being checked (held at the gate) or already answered.
        assert gate.wait_for(lambda g: g.held + g.answered == 30)
        checked = gate.held
        gate.release(lambda _: True)
        responses = [f.result(timeout=30) for f in futures]
        pool.shutdown()
        assert checked == 10
        assert Counter(r.status_code for r in responses) == {401: 10, 429: 20}
        refused = [r for r in responses if r.status_code == 429]
        assert {r.json()["code"] for r in refused} == {"account_locked"}
        assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
        # The ten failures locked the account, even against the right password.
        locked = login(client, email=email, password=PASSWORD)
        assert locked.status_code == 429
        assert 890 <= int(locked.headers["retry-after"]) <= 900

    def test_a_right_password_among_the_reserved_attempts_works_and_resets_the_count(
        self, client: TestClient, gate: GatedHasher
    ) -> None:
        signup(client)
        pool, futures = send_at_once(client, gate, [("jane@example.com", WRONG)] * 9 + [("jane@example.com", PASSWORD)])
        assert gate.wait_for(lambda g: g.held == 10)  # all ten reserved a slot
        gate.release(lambda password: password == WRONG)  # nine failures finish first
        assert gate.wait_for(lambda g: g.answered == 9)
        gate.release(lambda _: True)
        responses = [f.result(timeout=30) for f in futures]
        pool.shutdown()
        assert [r.status_code for r in responses] == [401] * 9 + [200]
        # The success reset the count: nine more failures in a row do not lock.
        for _ in range(9):
            assert login(client, password=WRONG).status_code == 401
        assert login(client).status_code == 200

    def test_other_accounts_keep_their_own_slots(self, client: TestClient, gate: GatedHasher) -> None:
        signup(client, email="jane@example.com")
        signup(client, email="john@example.com")
        pool, futures = send_at_once(
            client, gate, [("jane@example.com", WRONG)] * 12 + [("john@example.com", PASSWORD)]
        )
        assert gate.wait_for(lambda g: g.held + g.answered == 13)
        gate.release(lambda _: True)
        responses = [f.result(timeout=30) for f in futures]
        pool.shutdown()
        assert responses[-1].status_code == 200
        assert Counter(r.status_code for r in responses[:-1]) == {401: 10, 429: 2}


class TestSlots:
    def test_a_check_that_errors_gives_its_slot_back(self, client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
        signup(client)
        state: Any = client.app.state  # type: ignore[attr-defined]

        def broken(password: str, hashed: str | None) -> bool:
            raise RuntimeError("database gone mid-login")

        monkeypatch.setattr(state.hasher, "verify", broken)
        for _ in range(15):
            assert login(client, password=WRONG).status_code == 500
        monkeypatch.undo()
        assert login(client).status_code == 200  # nothing was counted, nothing is locked

    def test_a_slot_whose_check_never_settled_expires(self, client: TestClient) -> None:
        lockout = client.app.state.lockout  # type: ignore[attr-defined]
        lockout.stale_s = 1
        signup(client)
        for _ in range(10):
            assert not lockout.reserve("jane@example.com").retry_after  # ten processes died mid-check
        assert login(client).status_code == 429  # every slot taken, for now
        assert eventually(lambda: login(client).status_code == 200)


def eventually(predicate: Callable[[], bool], attempts: int = 60) -> bool:
    """Polls predicate every 0.1 s, up to attempts times (a wait, not a timing assertion)."""
    event = threading.Event()
    for _ in range(attempts):
        if predicate():
            return True
        event.wait(0.1)
    return False


class TestRedisDown:
    def test_logins_fail_open_and_the_error_is_logged(
        self, client: TestClient, caplog: pytest.LogCaptureFixture
    ) -> None:
        signup(client)
        lockout = client.app.state.lockout  # type: ignore[attr-defined]
        lockout.redis = redis_client(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
        with caplog.at_level(logging.ERROR, logger="auth.lockout"):
            for _ in range(12):
                assert login(client, password=WRONG).status_code == 401
            assert login(client).status_code == 200
        assert "Redis unavailable" in caplog.text


class TestReadiness:
    """Logins work without Redis (the lockout fails open), so Redis down leaves auth ready,
    degraded: taking every replica out of the Service would stop every login instead."""

    def test_redis_down_is_ready_and_degraded(self, settings: Settings) -> None:
        dead = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})  # nothing listens
        with TestClient(create_app(dead)) as client:
            ready = client.get("/readyz")
            assert ready.status_code == 200
            assert ready.json() == {
                "status": "degraded",
                "checks": {"database": "ok", "redis": "ConnectionError"},
                "degraded": ["redis"],
            }
            email = f"ready-{uuid.uuid4().hex}@example.com"
            signup(client, email=email)
            assert login(client, email=email).status_code == 200
