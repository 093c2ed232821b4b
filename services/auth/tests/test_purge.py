"""`auth-purge`: outbox rows the notifier confirmed sent go once past their age; the rest stay."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from uuid import uuid4

from sqlalchemy import insert, select

from auth.purge import OUTBOX
from svckit.db import make_engine, utcnow

PURGE = Path(sys.executable).parent / "auth-purge"


def test_old_confirmed_rows_go_and_the_rest_stay(database_url: str) -> None:
    now = utcnow()
    rows = {
        "old-sent": (now - timedelta(days=8), "sent"),
        "young-sent": (now - timedelta(days=6), "sent"),
        "old-dead": (now - timedelta(days=8), "dead_lettered"),
        "unconfirmed": (None, None),
    }
    ids = {name: uuid4().hex for name in rows}
    engine = make_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                insert(OUTBOX),
                [
                    {
                        "id": ids[name],
                        "actor_name": "notifier.send_welcome",
                        "payload": "{}",
                        "created_at": now - timedelta(days=9),
                        "published_at": now - timedelta(days=9),
                        "confirmed_at": confirmed,
                        "outcome": outcome,
                    }
                    for name, (confirmed, outcome) in rows.items()
                ],
            )
        env = {**os.environ, "AUTH_DATABASE_URL": database_url}  # the default age: 7 days
        result = subprocess.run([str(PURGE)], env=env, capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 0, result.stderr
        assert "outbox: purged 1 rows" in result.stdout
        with engine.connect() as conn:
            left = set(conn.execute(select(OUTBOX.c.id).where(OUTBOX.c.id.in_(ids.values()))).scalars())
        assert left == {ids["young-sent"], ids["old-dead"], ids["unconfirmed"]}
    finally:
        engine.dispose()
