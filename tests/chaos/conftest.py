from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from e2e.conftest import BrevoStub, Stack, brevo, drop_databases, postgres_stack_env, start_stack

__all__ = ["brevo"]

CHAOS_ENV = {
    "NOTIFIER_BREVO_API_KEY": BrevoStub.API_KEY,
    "NOTIFIER_MIN_BACKOFF_MS": "200",
    "NOTIFIER_MAX_BACKOFF_MS": "2000",
    "NOTIFIER_MAX_RETRIES": "40",  # outages here last seconds; receipts must outlive them
    "NOTIFIER_HEARTBEAT_TIMEOUT_MS": "3000",
    "NOTIFIER_BREVO_TIMEOUT_S": "3",
    "WALLET_REPLICAS": "2",
    # Republish unconfirmed outbox messages after 3 s (60 s by default), so a queue lost
    # with a Redis flush is refilled within the test.
    "AUTH_OUTBOX_REPUBLISH_AFTER_S": "3",
    "WALLET_OUTBOX_REPUBLISH_AFTER_S": "3",
    # Limits out of the way: the load is one IP and a few tokens (429s would only slow it).
    "GATEWAY_AUTH_RATE_AVERAGE": "100000",
    "GATEWAY_AUTH_RATE_BURST": "100000",
    "GATEWAY_MONEY_RATE_AVERAGE": "100000",
    "GATEWAY_MONEY_RATE_BURST": "100000",
}


@pytest.fixture(scope="module")
def chaos_stack(tmp_path_factory: pytest.TempPathFactory, brevo: BrevoStub) -> Iterator[Stack]:
    stack = start_stack(tmp_path_factory.mktemp("chaos") / "var", NOTIFIER_BREVO_BASE_URL=brevo.url, **CHAOS_ENV)
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def chaos_pg_stack(tmp_path_factory: pytest.TempPathFactory, brevo: BrevoStub) -> Iterator[Stack]:
    env = postgres_stack_env("chaos")
    if env is None:
        pytest.skip("TEST_DATABASE_URL is not set: dropping Postgres connections needs a Postgres server")
    stack = start_stack(
        tmp_path_factory.mktemp("chaos-pg") / "var", NOTIFIER_BREVO_BASE_URL=brevo.url, **CHAOS_ENV, **env
    )
    try:
        yield stack
    finally:
        stack.stop()
        drop_databases(env)


@pytest.fixture
def gw(chaos_stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=chaos_stack.url, timeout=30) as client:
        yield client
