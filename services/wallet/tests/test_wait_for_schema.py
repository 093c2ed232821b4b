"""`wallet-migrations wait`, the Deployments' initContainer: exit 0 once the database is at
this image's migration head (SQLite here, Postgres in the Postgres pass; the app role's
side is in test_roles.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import make_url

from svckit.db import make_engine
from svckit.schema_wait import Image, wait_for_schema
from svckit.testing import alembic, fresh_database

from .conftest import INI

WAIT = str(Path(sys.executable).parent / "wallet-migrations")
(HEAD,) = Image.from_ini(INI).heads
PREVIOUS = ScriptDirectory.from_config(Config(str(INI))).get_revision(HEAD).down_revision
assert isinstance(PREVIOUS, str)


@pytest.fixture
def url(tmp_path: Path) -> Iterator[str]:
    """A database nobody has migrated yet (on SQLite: no file yet)."""
    with fresh_database("wallet_wait", tmp_path) as created:
        yield created


def wait_command(url: str, *args: str) -> tuple[list[str], dict[str, str]]:
    return [WAIT, "wait", "-c", str(INI), "--interval", "0.1", *args], {**os.environ, "WALLET_DATABASE_URL": url}


def wait(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    command, env = wait_command(url, *args)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)


def stamp(url: str, revision: str) -> None:
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = :r"), {"r": revision})
    finally:
        engine.dispose()


class TestWaitForSchema:
    def test_at_the_head_it_returns_at_once(self, url: str) -> None:
        alembic(INI, url, "upgrade", "head")
        engine = make_engine(url)
        said: list[str] = []
        started = time.monotonic()
        try:
            assert wait_for_schema(Image.from_ini(INI), engine, timeout_s=60, say=said.append) == 0
        finally:
            engine.dispose()
        assert time.monotonic() - started < 5
        assert said == [f"database at {HEAD}: this image's head, ready"]
        result = wait(url, "--timeout", "60")  # the console script, as the initContainer runs it
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"wallet-migrations wait: database at {HEAD}: this image's head, ready" in result.stdout

    def test_it_waits_for_the_migration_and_then_returns(self, url: str) -> None:
        command, env = wait_command(url, "--timeout", "120")
        waiting = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            assert waiting.stdout is not None
            lines = [waiting.stdout.readline(), waiting.stdout.readline()]  # its start, then what it sees
            assert lines[0].startswith(f"wallet-migrations wait: image needs {HEAD}; database ")
            assert f"database at no revision, image needs {HEAD}" in lines[1]
            time.sleep(0.5)
            assert waiting.poll() is None  # still waiting
            alembic(INI, url, "upgrade", "head")  # the migration Job, meanwhile
            out, _ = waiting.communicate(timeout=60)
        finally:
            if waiting.poll() is None:
                waiting.kill()
                waiting.wait()
        assert waiting.returncode == 0, "".join(lines) + out
        assert out.rstrip().endswith(f"database at {HEAD}: this image's head, ready")

    def test_a_database_never_migrated_times_out_with_exit_1(self, url: str) -> None:
        result = wait(url, "--timeout", "1")
        assert result.returncode == 1, result.stdout + result.stderr
        last = result.stdout.strip().splitlines()[-1]
        assert f"timed out after 1 s: database at no revision, image needs {HEAD}" in last
        assert "migration Job" in last
        if make_url(url).get_backend_name() == "sqlite":
            assert "no database file yet" in last
            assert not Path(make_url(url).database or "").exists()  # looking created no empty file

    def test_a_database_one_migration_behind_times_out_with_exit_1(self, url: str) -> None:
        alembic(INI, url, "upgrade", PREVIOUS)
        result = wait(url, "--timeout", "0.5")
        assert result.returncode == 1, result.stdout + result.stderr
        assert f"timed out after 0.5 s: database at {PREVIOUS}, image needs {HEAD};" in result.stdout

    def test_a_newer_schema_starts_with_a_warning_unless_strict(self, url: str) -> None:
        alembic(INI, url, "upgrade", "head")
        stamp(url, "9999")  # a newer release's migration, as a rollback meets it
        started = wait(url, "--timeout", "60")
        assert started.returncode == 0, started.stdout + started.stderr
        assert f"WARNING: database at 9999, newer than this image (it needs {HEAD}" in started.stdout
        refused = wait(url, "--timeout", "60", "--strict")
        assert refused.returncode == 1
        assert "database at 9999, which this image does not know (9999): refused (--strict)" in refused.stdout

    def test_without_its_alembic_ini_it_says_where_it_looked(self, url: str, tmp_path: Path) -> None:
        result = subprocess.run(
            [WAIT, "wait", "--timeout", "1"],
            cwd=tmp_path,  # not the image's WORKDIR: services/wallet/alembic.ini is not there
            env={**os.environ, "WALLET_DATABASE_URL": url},
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 2
        assert f"no alembic.ini at {tmp_path / 'services/wallet/alembic.ini'}" in result.stdout

    def test_the_password_is_never_printed(self, url: str) -> None:
        if make_url(url).get_backend_name() == "sqlite":
            pytest.skip("a SQLite URL has no password")
        with_password = make_url(url).set(password="s3cret-pw").render_as_string(hide_password=False)
        result = wait(with_password, "--timeout", "0")
        assert "s3cret-pw" not in result.stdout + result.stderr
