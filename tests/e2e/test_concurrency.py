"""Concurrency through the gateway with two wallet replicas, on SQLite and on Postgres,
each run ending with `wallet-audit` clean."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from .client import balance, move, new_user, open_wallet
from .conftest import Stack, drop_databases, postgres_stack_env, start_stack

AUDIT = Path(sys.executable).parent / "wallet-audit"


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if request.param == "sqlite":
        yield stack
        return
    env = postgres_stack_env("e2e")
    if env is None:
        pytest.skip("TEST_DATABASE_URL is not set: the Postgres concurrency run needs a Postgres server")
    pg = start_stack(tmp_path_factory.mktemp("pg") / "var", **env)
    try:
        yield pg
    finally:
        pg.stop()
        drop_databases(env)


def audit(stack: Stack) -> str:
    url = stack.wallet_database_url
    if url:
        result = subprocess.run([str(AUDIT), "--database-url", url], capture_output=True, text=True, check=False)
    elif stack.exec_prefix:
        result = stack.command("wallet-audit")  # inside the external stack, on its own database
    else:
        pytest.skip("GATEWAY_URL without STACK_EXEC: no way to audit that stack's database")
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture
def gw(backend: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=backend.url, timeout=30) as client:
        yield client


def test_sixty_withdrawals_of_50_from_1000(gw: httpx.Client, backend: Stack) -> None:
    user = new_user(gw)
    open_wallet(gw, user, balance=1000)
    with ThreadPoolExecutor(30) as pool:
        answers = list(pool.map(lambda _: move(gw, user, "withdraw", amount=50), range(60)))
    codes = Counter(a.status_code for a in answers)
    assert codes == {200: 20, 422: 40}, codes
    assert {a.json()["code"] for a in answers if a.status_code == 422} == {"insufficient_funds"}
    assert balance(gw, user) == 0
    audit(backend)


def test_crossed_transfers(gw: httpx.Client, backend: Stack) -> None:
    a, b = new_user(gw), new_user(gw)
    wa, wb = open_wallet(gw, a, balance=1000)["id"], open_wallet(gw, b, balance=1000)["id"]

    def one(i: int) -> int:
        sender, to = (a, wb) if i % 2 else (b, wa)
        return move(gw, sender, "transfer", amount=3, to_account_id=to).status_code

    with ThreadPoolExecutor(30) as pool:
        codes = list(pool.map(one, range(80)))
    assert set(codes) == {200}
    assert balance(gw, a) + balance(gw, b) == 2000
    assert balance(gw, a) == 1000  # 40 each way
    audit(backend)


def test_thirty_requests_with_one_key(gw: httpx.Client, backend: Stack) -> None:
    user = new_user(gw)
    open_wallet(gw, user)
    key = uuid.uuid4().hex
    headers = {**user.headers, "Idempotency-Key": key}
    body = {"amount": 100, "currency": "USD"}
    with ThreadPoolExecutor(30) as pool:
        answers = list(pool.map(lambda _: gw.patch("/transaction/deposit", json=body, headers=headers), range(30)))
    assert {a.status_code for a in answers} <= {200, 409}
    assert len({a.content for a in answers if a.status_code == 200}) == 1
    conflicts = [a for a in answers if a.status_code == 409]
    assert all(a.json()["code"] == "idempotency_in_progress" and a.headers["retry-after"] for a in conflicts)
    assert balance(gw, user) == 100
    audit(backend)
