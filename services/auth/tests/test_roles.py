"""Production's two database roles: the migrations run as the role that owns the tables, the
service as one that may only create and read accounts (Postgres only: SQLite has no roles)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from auth.config import Settings
from auth.main import create_app
from auth.outbox import TABLE as OUTBOX
from svckit.db import make_engine
from svckit.outbox import Relay
from svckit.testing import RoleDatabase, role_database

from .conftest import INI
from .factories import bearer, signup, token_for

pytestmark = pytest.mark.skipif(
    not os.environ.get("TEST_DATABASE_URL"), reason="database roles exist only on Postgres: set TEST_DATABASE_URL"
)

ALEMBIC = Path(sys.executable).parent / "alembic"


def migrate(db: RoleDatabase, *args: str) -> None:
    """Alembic as compose and Kubernetes run it: both URLs from the environment."""
    env = {**os.environ, "AUTH_DATABASE_URL": db.app_url, "AUTH_MIGRATION_DATABASE_URL": db.migration_url}
    result = subprocess.run(
        [str(ALEMBIC), "-c", str(INI), *(args or ("upgrade", "head"))],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def db() -> Iterator[RoleDatabase]:
    with role_database("auth") as created:
        migrate(created)
        yield created


@pytest.fixture
def app_client(db: RoleDatabase, redis_url: str, tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(
        database_url=db.app_url,
        redis_url=redis_url,
        keys_dir=str(tmp_path / "keys"),
        bcrypt_rounds=4,
        service_token="test-service-token",
        allow_dev_service_token=True,
    )
    with TestClient(create_app(settings)) as c:
        yield c


class TestTheServiceRole:
    def test_signup_login_lookups_and_the_relay_work(self, db: RoleDatabase, app_client: TestClient) -> None:
        user = signup(app_client, email="roles@example.com")
        token = token_for(app_client, email="roles@example.com")
        assert app_client.get(f"/users/{user['id']}", headers=bearer(token)).status_code == 200
        found = app_client.get(
            "/internal/users", params={"ids": user["id"]}, headers={"X-Service-Token": "test-service-token"}
        )
        assert [u["id"] for u in found.json()["users"]] == [user["id"]]
        engine = make_engine(db.app_url)
        try:
            published: list[str] = []
            assert Relay(engine, OUTBOX, published.append, lease=None, name="auth").run_once() == 1
        finally:
            engine.dispose()
        assert len(published) == 1  # the welcome email, claimed and stamped published

    def test_the_purge_runs_as_it(self, db: RoleDatabase) -> None:
        """auth-purge connects as the service's role: it may DELETE confirmed outbox rows."""
        owner = make_engine(db.migration_url)
        try:
            with owner.begin() as conn:
                conn.execute(
                    text(
                        "INSERT INTO outbox (id, actor_name, payload, created_at, published_at, confirmed_at, outcome)"
                        " VALUES ('old-email', 'a', '{}', now() - interval '9 days', now() - interval '9 days',"
                        " now() - interval '8 days', 'sent')"
                    )
                )
        finally:
            owner.dispose()
        purge = subprocess.run(
            [str(ALEMBIC.parent / "auth-purge")],
            env={**os.environ, "AUTH_DATABASE_URL": db.app_url},
            capture_output=True,
            text=True,
            check=False,
        )
        assert purge.returncode == 0, purge.stderr
        assert "outbox: purged 1 rows" in purge.stdout

    @pytest.mark.parametrize(
        ("statement", "message"),
        [
            ("UPDATE users SET password_hash = 'x'", "permission denied for table users"),
            ("DELETE FROM users", "permission denied for table users"),
            ("TRUNCATE users", "permission denied for table users"),
            ("ALTER TABLE users DROP CONSTRAINT users_pkey CASCADE", "must be owner of table users"),
            ("UPDATE alembic_version SET version_num = '0001'", "permission denied for table alembic_version"),
            ("DELETE FROM alembic_version", "permission denied for table alembic_version"),
            ("SET session_replication_role = replica", 'permission denied to set parameter "session_replication_role"'),
            ("CREATE TABLE shadow (id int)", "permission denied for schema public"),
        ],
    )
    def test_it_cannot_change_or_remove_accounts(self, db: RoleDatabase, statement: str, message: str) -> None:
        engine = make_engine(db.app_url)
        try:
            with pytest.raises(DBAPIError) as caught, engine.begin() as conn:
                conn.execute(text(statement))
        finally:
            engine.dispose()
        error = caught.value.orig
        assert isinstance(error, psycopg.Error)
        assert error.sqlstate == "42501", error  # insufficient_privilege
        assert message in str(error)


def test_it_reads_the_schema_revision_and_waits_for_nothing_at_the_head(db: RoleDatabase) -> None:
    """`auth-migrations wait`, the initContainer, reads alembic_version as the app role."""
    engine = make_engine(db.app_url)
    try:
        with engine.connect() as conn:
            revision = conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
    finally:
        engine.dispose()
    result = subprocess.run(
        [str(ALEMBIC.parent / "auth-migrations"), "wait", "-c", str(INI), "--timeout", "30"],
        env={**os.environ, "AUTH_DATABASE_URL": db.app_url},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"database at {revision}: this image's head, ready" in result.stdout


def test_tables_the_migration_role_does_not_own_stop_the_migration(db: RoleDatabase) -> None:
    # An old deployment's tables, created by the superuser: they must be handed over first.
    superuser = make_url(os.environ["TEST_DATABASE_URL"])
    admin = create_engine(superuser.set(database=db.name))
    try:
        with admin.begin() as conn:
            conn.execute(text(f'ALTER TABLE users OWNER TO "{superuser.username}"'))
        with pytest.raises(AssertionError, match=r"tables \['users'\] are not owned by the migration role"):
            migrate(db)
        with admin.begin() as conn:
            conn.execute(text(f'ALTER TABLE users OWNER TO "{db.owner}"'))
        migrate(db)
    finally:
        admin.dispose()


def test_grants_follow_a_downgrade_and_an_upgrade(db: RoleDatabase, app_client: TestClient) -> None:
    migrate(db, "downgrade", "base")  # no tables left to grant on
    migrate(db)
    assert signup(app_client, email="again@example.com")["id"] >= 1  # the new tables' privileges
