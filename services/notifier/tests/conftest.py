from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from notifier import actors
from notifier.brevo import Email, FolderTransport, TransientError
from notifier.dedupe import SentMarkers
from svckit.messages import Receipt
from svckit.redis import redis_client
from svckit.testing import free_port, redis_server

STUB = Path(__file__).resolve().parents[3] / "tests" / "tools" / "brevo_stub.py"
API_KEY = "unit-brevo-key"


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


@pytest.fixture(scope="session")
def brevo_url() -> Iterator[str]:
    """The Brevo stand-in, a real HTTP server in its own process."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(STUB), "--port", str(port), "--api-key", API_KEY], stdout=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while True:
        try:
            httpx.get(f"{url}/_stub/emails")
            break
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def stub(brevo_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=brevo_url) as client:
        client.post("/_stub/reset")
        yield client


class Recording(FolderTransport):
    def __init__(self, folder: Path) -> None:
        super().__init__(str(folder), sender_email="s@example.com", sender_name="S")
        self.sent: list[str] = []
        self.fail_next = 0

    def send(self, email: Email) -> str:
        if self.fail_next:
            self.fail_next -= 1
            raise TransientError("Brevo answered 503")
        self.sent.append(email.email_id)
        return super().send(email)


@pytest.fixture
def transport(tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Recording:
    recording = Recording(tmp_path)
    markers = SentMarkers(redis_client(redis_url), ttl_s=60, claim_ms=2000)
    ctx = actors.Context(transport=recording, markers=markers, auth=httpx.Client())
    monkeypatch.setattr(actors, "context", lambda: ctx)
    return recording


def make_receipt(**changes: Any) -> Receipt:
    """A deposit's receipt with fresh ids; `changes` override any field."""
    fields: dict[str, Any] = {
        "email_id": uuid.uuid4().hex,
        "user_id": 7,
        "transaction_id": 1,
        "kind": "deposit",
        "amount": 200,
        "currency": "USD",
        "balance_after": 200,
        "counterparty": "External Source",
        "occurred_at": datetime.now(UTC),
    }
    return Receipt(**{**fields, **changes})
