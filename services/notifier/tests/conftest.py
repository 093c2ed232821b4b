from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

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
