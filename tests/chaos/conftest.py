from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from e2e.conftest import BrevoStub, Stack, brevo, drop_databases, postgres_stack_env, start_stack

__all__ = ["brevo"]

log = logging.getLogger("chaos")

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


def _backend() -> str:
    if os.environ.get("TEST_DATABASE_URL"):
        return "Postgres (TEST_DATABASE_URL), two wallet replicas"
    return "SQLite, two wallet replicas: TEST_DATABASE_URL is not set (the Postgres-only scenario skips)"


def pytest_report_header() -> str:
    return f"chaos stack: {_backend()}"


@pytest.fixture(scope="module")
def chaos_stack(tmp_path_factory: pytest.TempPathFactory, brevo: BrevoStub) -> Iterator[Stack]:
    """One stack for every scenario: on Postgres when TEST_DATABASE_URL is set, else SQLite.
    Metrics are kept in a multiprocess folder (as in the Kubernetes manifests), so the
    notifier's counters add up across its processes and their restarts."""
    log.warning("chaos stack: %s", _backend())
    env = postgres_stack_env("chaos") or {}
    root = tmp_path_factory.mktemp("chaos")
    metrics_dir = root / "prometheus"
    metrics_dir.mkdir()
    stack = start_stack(
        root / "var",
        NOTIFIER_BREVO_BASE_URL=brevo.url,
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
        **CHAOS_ENV,
        **env,
    )
    try:
        yield stack
    finally:
        stack.stop()
        if env:
            drop_databases(env)


@pytest.fixture
def gw(chaos_stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=chaos_stack.url, timeout=30) as client:
        yield client
