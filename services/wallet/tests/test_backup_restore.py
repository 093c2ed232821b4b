"""The runbook's backup and restore (pg_dump -Fc, pg_restore) keeps a ledger that audits clean.

Postgres only: it runs in the Postgres pass (TEST_DATABASE_URL), with the server's own tools.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.engine import make_url

from svckit.db import make_engine
from svckit.testing import fresh_database
from wallet.audit import audit

from .factories import AuthFake, Signer, move, new_user, open_wallet

pytestmark = pytest.mark.skipif(
    not os.environ.get("TEST_DATABASE_URL") or not shutil.which("pg_dump"),
    reason="needs TEST_DATABASE_URL and pg_dump/pg_restore (the Postgres pass)",
)


def libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def test_dump_and_restore_keep_the_ledger(
    client: TestClient, signer: Signer, auth_fake: AuthFake, database_url: str, tmp_path: Path
) -> None:
    jane, john = new_user(signer, auth_fake), new_user(signer, auth_fake)
    open_wallet(client, jane, balance=500)
    to = open_wallet(client, john)["id"]
    move(client, jane, "transfer", amount=120, to_account_id=to)
    dump = tmp_path / "wallet.dump"
    subprocess.run(["pg_dump", "-Fc", "-f", str(dump), libpq(database_url)], check=True)
    with fresh_database("wallet_restore", tmp_path) as restored:
        subprocess.run(["pg_restore", "--no-owner", "-d", libpq(restored), str(dump)], check=True)
        engine = make_engine(restored)
        try:
            report = audit(engine)
            assert report.violations == []
            assert report.transactions == audit(make_engine(database_url)).transactions
            with pytest.raises(Exception, match="append-only"), engine.begin() as conn:
                conn.execute(text("DELETE FROM ledger_entries"))  # the triggers came back too
        finally:
            engine.dispose()
