"""Schemathesis checks of ours (loaded with SCHEMATHESIS_HOOKS=tests.fuzz.hooks... by path)."""

from __future__ import annotations

import re
from typing import Any

import schemathesis

# Anything that would tell an attacker how we are built, or hand them a secret.
LEAKS = re.compile(
    r"Traceback \(most recent call last\)|File \"/|sqlalchemy|psycopg|sqlite3\.|SELECT .* FROM|INSERT INTO|"
    r"\$2[aby]\$\d\d\$|-----BEGIN [A-Z ]*PRIVATE KEY-----|X-Service-Token|api-key",
    re.IGNORECASE,
)


@schemathesis.check
def no_leaks(ctx: Any, response: Any, case: Any) -> bool | None:
    """No stack trace, SQL, password hash or key material in any response."""
    match = LEAKS.search(response.text or "")
    if match:
        raise AssertionError(f"response leaks {match.group(0)!r}")
    return None
