"""Production's two database roles: the migrations run as the role that owns the tables, the
service as one that may only read and append the ledger (Postgres only: SQLite has no roles).

Nothing the service's role can run rewrites history: the append-only triggers are the
owner's, and the owner is not who the service connects as.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.exc import DBAPIError

from svckit import aiodb
from svckit.db import make_engine
from svckit.messages import SENT_MARKER
from svckit.outbox import Relay
from svckit.testing import RoleDatabase, role_database
from wallet import repository
from wallet.audit import audit
from wallet.config import Settings
from wallet.models import FUNCTIONS
from wallet.outbox import TABLE as OUTBOX

from . import conftest
from .conftest import INI
from .factories import AuthFake, Signer, key, move, new_user, open_wallet
from .test_wait_for_schema import PREVIOUS

pytestmark = pytest.mark.skipif(
    not os.environ.get("TEST_DATABASE_URL"), reason="database roles exist only on Postgres: set TEST_DATABASE_URL"
)

ALEMBIC = Path(sys.executable).parent / "alembic"
WAIT = Path(sys.executable).parent / "wallet-migrations"


def migrate(db: RoleDatabase, *args: str) -> subprocess.CompletedProcess[str]:
    """Alembic as compose and Kubernetes run it: the service's URL (the app role) and the
    migration URL (the owner) from the environment."""
    env = {**os.environ, "WALLET_DATABASE_URL": db.app_url, "WALLET_MIGRATION_DATABASE_URL": db.migration_url}
    return subprocess.run(
        [str(ALEMBIC), "-c", str(INI), *(args or ("upgrade", "head"))],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


def wait(db: RoleDatabase, *args: str) -> subprocess.CompletedProcess[str]:
    """`wallet-migrations wait` as the initContainer runs it: the service's URL only."""
    return subprocess.run(
        [str(WAIT), "wait", "-c", str(INI), "--interval", "0.1", *args],
        env={**os.environ, "WALLET_DATABASE_URL": db.app_url},
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.fixture(scope="module")
def db() -> Iterator[RoleDatabase]:
    with role_database("wallet") as created:
        result = migrate(created)
        assert result.returncode == 0, result.stderr
        yield created


@pytest.fixture
def app_client(db: RoleDatabase, redis_url: str, signer: Signer, auth_fake: AuthFake) -> Iterator[TestClient]:
    settings = Settings(
        database_url=db.app_url, redis_url=redis_url, service_token="test-service-token", allow_dev_service_token=True
    )
    with conftest.app_client(settings, signer, auth_fake) as c:
        yield c


def refused(url: str, statement: str) -> psycopg.Error:
    engine = make_engine(url)
    try:
        with pytest.raises(DBAPIError) as caught, engine.begin() as conn:
            conn.execute(text(statement))
    finally:
        engine.dispose()
    error = caught.value.orig
    assert isinstance(error, psycopg.Error)
    return error


class TestTheServiceRole:
    def test_money_moves_the_audit_and_the_relay_work(
        self, db: RoleDatabase, app_client: TestClient, signer: Signer, auth_fake: AuthFake, redis_url: str
    ) -> None:
        alice, bob = new_user(signer, auth_fake), new_user(signer, auth_fake, first="Bob")
        open_wallet(app_client, alice, balance=1_000)  # wallet row, and a deposit
        bob_wallet = open_wallet(app_client, bob)
        idem = key()
        assert move(app_client, alice, "deposit", amount=500, idem=idem).status_code == 200
        assert move(app_client, alice, "deposit", amount=500, idem=idem).status_code == 200  # replayed
        transfer = move(app_client, alice, "transfer", amount=300, to_account_id=bob_wallet["id"])
        assert transfer.status_code == 200, transfer.text
        assert move(app_client, bob, "withdraw", amount=300).status_code == 200
        assert app_client.get("/wallet", headers=alice.headers).json()["balance"] == 1_200
        assert app_client.get("/wallet", headers=bob.headers).json()["balance"] == 0
        assert app_client.get("/transaction/history", headers=alice.headers).status_code == 200
        assert app_client.delete("/wallet", headers=bob.headers).status_code == 200  # closing updates it

        engine = make_engine(db.app_url)
        try:
            report = audit(engine)
            assert report.violations == []
            assert report.transactions >= 3

            markers = redis.Redis.from_url(redis_url)
            published: list[str] = []
            relay = Relay(
                engine, OUTBOX, published.append, lease=None, name="wallet", markers=markers, republish_after_s=0
            )
            relay.check_every_s = 0
            assert relay.run_once() > 0  # claims (FOR UPDATE) and stamps published_at
            with engine.connect() as conn:
                first, *others = conn.execute(select(OUTBOX.c.id)).scalars()
            markers.set(SENT_MARKER.format(first), 1)
            assert relay.reconcile() == len(others)  # confirms one, publishes the others again
            with engine.connect() as conn:
                confirmed = conn.execute(select(func.count()).where(OUTBOX.c.confirmed_at.is_not(None))).scalar_one()
            assert confirmed == 1
        finally:
            engine.dispose()

    def test_the_batchs_record_look_up_runs_as_the_service_role(
        self, db: RoleDatabase, app_client: TestClient, signer: Signer, auth_fake: AuthFake
    ) -> None:
        """A batch of movements asks which of its keys are recorded through migration 0012's
        function: the service's role may run it (without it every batch would fail, and its
        movements run again one by one)."""
        alice = new_user(signer, auth_fake)
        open_wallet(app_client, alice)
        idem = key()
        assert move(app_client, alice, "deposit", amount=5, idem=idem).status_code == 200

        async def look_up() -> set[tuple[int, str, str]]:
            database = await aiodb.make_database(db.app_url, pool_size=1, max_overflow=0)
            try:
                async with aiodb.transaction(database, read_only=True) as conn:
                    return await repository.recorded_keys(
                        conn, [(alice.id, "deposit", idem), (alice.id, "deposit", key())]
                    )
            finally:
                await database.dispose()

        assert asyncio.run(look_up()) == {(alice.id, "deposit", idem)}

    @pytest.mark.parametrize(
        ("statement", "message"),
        [
            ("UPDATE transactions SET amount = amount + 1", "permission denied for table transactions"),
            ("DELETE FROM transactions", "permission denied for table transactions"),
            ("TRUNCATE transactions", "permission denied for table transactions"),
            ("UPDATE ledger_entries SET amount = amount + 1", "permission denied for table ledger_entries"),
            ("DELETE FROM ledger_entries", "permission denied for table ledger_entries"),
            ("TRUNCATE ledger_entries", "permission denied for table ledger_entries"),
            # The hash chain is as append-only as the entries (wallets.chain_head it moves).
            ("UPDATE ledger_entries SET hash = NULL, prev_hash = NULL", "permission denied for table ledger_entries"),
            ("ALTER TABLE transactions DISABLE TRIGGER transactions_append_only", "must be owner of table"),
            ("ALTER TABLE ledger_entries DISABLE TRIGGER ALL", "must be owner of table"),
            ("DROP TRIGGER ledger_entries_append_only ON ledger_entries", "must be owner of"),
            ("DROP TRIGGER transactions_no_truncate ON transactions", "must be owner of"),
            ("DROP FUNCTION refuse_append_only_change() CASCADE", "must be owner of function"),
            ("SET session_replication_role = replica", 'permission denied to set parameter "session_replication_role"'),
            ("ALTER TABLE wallets DROP CONSTRAINT ck_wallets_user_balance_not_negative", "must be owner of table"),
            ("DELETE FROM wallets", "permission denied for table wallets"),
            ("ALTER TABLE wallets DROP CONSTRAINT ck_wallets_held", "must be owner of table"),
            ("DELETE FROM holds", "permission denied for table holds"),
            # Nor hand a wallet (and its money) to another user, or change what a hold reserves.
            ("UPDATE wallets SET user_id = user_id + 1", "permission denied for table wallets"),
            ("UPDATE wallets SET currency = 'EUR'", "permission denied for table wallets"),
            ("UPDATE wallets SET owner_email = 'thief@example.com'", "permission denied for table wallets"),
            ("UPDATE holds SET amount = 1", "permission denied for table holds"),
            ("UPDATE holds SET wallet_id = wallet_id + 1", "permission denied for table holds"),
            ("UPDATE refunds SET amount = amount + 1", "permission denied for table refunds"),
            ("DELETE FROM refunds", "permission denied for table refunds"),
            # It may DELETE records (wallet-purge), but never age one to get past the trigger.
            ("UPDATE idempotency_records SET created_at = created_at - interval '2 days'", "permission denied"),
            ("UPDATE idempotency_records SET status_code = 200", "permission denied for table idempotency_records"),
            ("ALTER TABLE idempotency_records DISABLE TRIGGER idempotency_records_retention", "must be owner of"),
            ("DROP FUNCTION refuse_young_idempotency_delete() CASCADE", "must be owner of function"),
            ("SELECT setval('transactions_id_seq', 1)", "permission denied for sequence transactions_id_seq"),
            ("CREATE TABLE shadow (id int)", "permission denied for schema public"),
            ("UPDATE alembic_version SET version_num = '0001'", "permission denied for table alembic_version"),
            ("DELETE FROM alembic_version", "permission denied for table alembic_version"),
        ],
    )
    def test_it_cannot_rewrite_history_or_the_rules(self, db: RoleDatabase, statement: str, message: str) -> None:
        # Privileges are checked before any row is read: the triggers never get a say.
        error = refused(db.app_url, statement)
        assert error.sqlstate == "42501", error  # insufficient_privilege, not the triggers
        assert message in str(error)

    def test_the_purge_runs_as_it_and_the_trigger_keeps_young_records(self, db: RoleDatabase) -> None:
        """wallet-purge connects as the service's role: DELETE is granted, and the owner's
        trigger still refuses a record younger than 24 hours."""
        owner = make_engine(db.migration_url)
        try:
            with owner.begin() as conn:  # a record written three days ago, and an old confirmed email
                conn.execute(
                    text(
                        "INSERT INTO idempotency_records (user_id, endpoint, key, fingerprint, status_code,"
                        " response_body, created_at) VALUES (1, 'deposit', 'old', '', 200, '{}', now() - interval '3 days')"
                    )
                )
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
            [str(ALEMBIC.parent / "wallet-purge")],
            env={**os.environ, "WALLET_DATABASE_URL": db.app_url},
            capture_output=True,
            text=True,
            check=False,
        )
        assert purge.returncode == 0, purge.stderr
        assert "idempotency_records: purged 1 rows" in purge.stdout
        assert "outbox: purged 1 rows" in purge.stdout
        error = refused(db.app_url, "DELETE FROM idempotency_records")  # the suite's young records
        assert error.sqlstate == "23001", error  # restrict_violation: the trigger, not privileges
        assert "kept at least 24 hours" in str(error)

    def test_it_cannot_become_the_owner(self, db: RoleDatabase) -> None:
        error = refused(db.app_url, f'SET ROLE "{db.owner}"')
        assert error.sqlstate == "42501"
        assert "permission denied to set role" in str(error)


class TestWaitForSchema:
    """`wallet-migrations wait`, the initContainer, with the service's URL (the app role)."""

    def test_the_app_role_reads_the_revision_and_the_wait_returns_at_once(self, db: RoleDatabase) -> None:
        engine = make_engine(db.app_url)
        try:
            with engine.connect() as conn:
                revision = conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
        finally:
            engine.dispose()
        result = wait(db, "--timeout", "30")
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"database at {revision}: this image's head, ready" in result.stdout

    def test_it_waits_while_the_version_is_unreadable_until_the_migration_grants_it(self) -> None:
        with role_database("wallet_wait") as fresh:
            # The previous release's grants: everything but alembic_version.
            assert migrate(fresh, "upgrade", PREVIOUS).returncode == 0
            owner = make_engine(fresh.migration_url)
            try:
                with owner.begin() as conn:
                    conn.execute(text(f'REVOKE ALL ON alembic_version FROM "{fresh.app}"'))
            finally:
                owner.dispose()
            unreadable = wait(fresh, "--timeout", "0.5")
            assert unreadable.returncode == 1
            assert "permission denied for table alembic_version" in unreadable.stdout
            waiting = subprocess.Popen(
                [str(WAIT), "wait", "-c", str(INI), "--timeout", "120", "--interval", "0.1"],
                env={**os.environ, "WALLET_DATABASE_URL": fresh.app_url},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            try:
                assert waiting.stdout is not None
                assert "image needs" in waiting.stdout.readline()
                assert "permission denied for table alembic_version" in waiting.stdout.readline()
                assert migrate(fresh).returncode == 0  # this release's migration Job
                out, _ = waiting.communicate(timeout=60)
            finally:
                if waiting.poll() is None:
                    waiting.kill()
                    waiting.wait()
            assert waiting.returncode == 0, out
            assert "this image's head, ready" in out


class TestTheGrants:
    def test_a_privilege_on_alembic_version_granted_by_hand_is_revoked_and_select_stays(self, db: RoleDatabase) -> None:
        owner = make_engine(db.migration_url)
        try:
            with owner.begin() as conn:
                conn.execute(text(f'GRANT UPDATE, DELETE ON alembic_version TO "{db.app}"'))
        finally:
            owner.dispose()
        assert migrate(db).returncode == 0
        assert "permission denied for table alembic_version" in str(
            refused(db.app_url, "UPDATE alembic_version SET version_num = version_num")
        )
        assert wait(db, "--timeout", "0").returncode == 0  # SELECT granted again

    def test_a_privilege_granted_by_hand_is_revoked_by_the_next_migration(self, db: RoleDatabase) -> None:
        owner = make_engine(db.migration_url)
        try:
            with owner.begin() as conn:
                conn.execute(text(f'GRANT DELETE, TRUNCATE ON transactions TO "{db.app}"'))
        finally:
            owner.dispose()
        result = migrate(db)  # already at head: no migration runs, the grants are applied anyway
        assert result.returncode == 0, result.stderr
        assert "permission denied for table transactions" in str(refused(db.app_url, "TRUNCATE transactions"))

    def test_the_functions_are_the_app_roles_to_run_and_no_one_elses_whatever_was_changed_by_hand(
        self, db: RoleDatabase
    ) -> None:
        [function] = FUNCTIONS
        owner = make_engine(db.migration_url)
        try:
            with owner.begin() as conn:  # by hand: back to a function's default, and the app role's taken
                conn.execute(text(f"GRANT EXECUTE ON FUNCTION {function} TO PUBLIC"))
                conn.execute(text(f'REVOKE EXECUTE ON FUNCTION {function} FROM "{db.app}"'))
            assert migrate(db).returncode == 0
            with owner.connect() as conn:
                may = "SELECT has_function_privilege(:who, CAST(:f AS regprocedure), 'EXECUTE')"
                assert conn.execute(text(may), {"who": db.app, "f": function}).scalar_one()
                acl = conn.execute(
                    text("SELECT CAST(proacl AS text[]) FROM pg_proc WHERE oid = CAST(:f AS regprocedure)"),
                    {"f": function},
                ).scalar_one()
        finally:
            owner.dispose()
        assert not [entry for entry in acl if entry.startswith("=")], acl  # PUBLIC may not

    def test_an_app_role_that_is_a_member_of_the_owner_is_refused(self, db: RoleDatabase) -> None:
        admin = create_engine(os.environ["TEST_DATABASE_URL"], isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.execute(text(f'GRANT "{db.owner}" TO "{db.app}"'))
            try:
                result = migrate(db)
            finally:
                with admin.connect() as conn:
                    conn.execute(text(f'REVOKE "{db.owner}" FROM "{db.app}"'))
        finally:
            admin.dispose()
        assert result.returncode != 0
        assert f"app role '{db.app}' is a member of the migration role '{db.owner}'" in result.stderr
