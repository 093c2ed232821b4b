"""schemathesis against the gateway's public OpenAPI, with an authenticated user.

Checks: no 5xx, status codes, content types, headers and bodies as documented, negative
data rejected, authentication enforced, nothing leaked (hooks.py). One check is left out:
`positive_data_acceptance`, because business rules legitimately refuse schema-valid
requests (insufficient funds, one wallet per user, configured currencies, the 72-byte
password rule).

`make test` runs a bounded pass (FUZZ_EXAMPLES=25 per operation and phase); `make fuzz` a
long one. The number of generated cases is printed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from e2e.client import new_user, open_wallet  # noqa: E402
from e2e.conftest import Stack, start_stack  # noqa: E402
from fuzz.hooks import LEAKS  # noqa: E402


@pytest.fixture(scope="module")
def fuzz_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # Limits out of the way: the fuzzer is one client sending thousands of requests.
    high = {
        f"GATEWAY_{k}": "100000"
        for k in ("AUTH_RATE_AVERAGE", "AUTH_RATE_BURST", "MONEY_RATE_AVERAGE", "MONEY_RATE_BURST")
    }
    stack = start_stack(tmp_path_factory.mktemp("fuzz") / "var", WALLET_REPLICAS="1", **high)
    yield stack
    stack.stop()


@pytest.mark.parametrize(
    ("text", "leaks"),
    [
        ('Traceback (most recent call last):\n  File "/app/x.py"', True),
        ("(psycopg.errors.UniqueViolation) duplicate key", True),
        ("SELECT users.id FROM users WHERE", True),
        ("$2b$12$abcdefghijklmnopqrstuv", True),
        ("-----BEGIN PRIVATE KEY-----", True),
        ('{"type":"https://docs.wallet.example/problems/not_found","code":"not_found"}', False),
    ],
)
def test_the_leak_check_knows_a_leak(text: str, leaks: bool) -> None:
    assert bool(LEAKS.search(text)) is leaks


def test_public_api_survives_fuzzing(fuzz_stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    with httpx.Client(base_url=fuzz_stack.url, timeout=10) as api:
        user = new_user(api)
        open_wallet(api, user, balance=10**9)  # so money moves succeed as well as fail
        new_user(api)  # a recipient exists
    examples = os.environ.get("FUZZ_EXAMPLES", "25")
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "schemathesis"),
            "run",
            f"{fuzz_stack.url}/openapi.json",
            "-H",
            f"Authorization: Bearer {user.token}",
            "--checks",
            "all",
            "--exclude-checks",
            "positive_data_acceptance",
            "--max-examples",
            examples,
            "--seed",
            os.environ.get("FUZZ_SEED", "20261124"),
            "--no-color",
        ],
        env={**os.environ, "SCHEMATHESIS_HOOKS": "fuzz.hooks", "PYTHONPATH": str(ROOT / "tests")},
        capture_output=True,
        text=True,
        check=False,
        timeout=1800,
    )
    summary = re.search(r"(\d+) generated", result.stdout)
    with capsys.disabled():
        print(f"\nfuzz: {summary.group(0) if summary else '?'} cases, {examples} examples per operation and phase")
    assert result.returncode == 0, result.stdout[-6000:]
    assert summary is not None
    assert int(summary.group(1)) > 100
