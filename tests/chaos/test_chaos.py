"""Break the platform on purpose under load; lose and duplicate nothing.

Each scenario: clients move money concurrently, retrying each movement with its key until
the answer is definitive; a fault strikes mid-load and heals; then every client's money
moved exactly once, every email arrived exactly once (at Brevo's stand-in, and by the
notifier's own counters), and wallet-audit is clean. A 5xx is forgiven only inside the
fault's window. All scenarios share one stack: Postgres with TEST_DATABASE_URL, else SQLite.
"""

from __future__ import annotations

import httpx
import pytest
import redis
from e2e.conftest import BrevoStub, Stack
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from .harness import Load, after_progress, kill

USERS, MOVES = 8, 20
TOTAL = USERS * MOVES


def test_a_wallet_replica_killed_mid_load(gw: httpx.Client, chaos_stack: Stack, brevo: BrevoStub) -> None:
    load = Load.create(gw, USERS, chaos_stack, brevo)
    port = chaos_stack.ports["wallet1"] if chaos_stack.ports else 0

    def fault() -> None:
        after_progress(load, 0.3, TOTAL)
        with load.fault():
            assert kill(chaos_stack, "uvicorn", match=f"--port\x00{port}") == 1  # the restart loop brings it back

    load.run(MOVES, during=fault)
    load.verify()


def test_redis_killed_mid_load_then_restarted(gw: httpx.Client, chaos_stack: Stack, brevo: BrevoStub) -> None:
    load = Load.create(gw, USERS, chaos_stack, brevo)
    port = str(chaos_stack.ports["redis"]) if chaos_stack.ports else ""

    def fault() -> None:
        after_progress(load, 0.3, TOTAL)
        with load.fault():
            assert kill(chaos_stack, "redis-server", match=port, check_env=False) == 1

    load.run(MOVES, during=fault)
    load.verify(redis_fault=True)


def test_redis_flushed_mid_load(gw: httpx.Client, chaos_stack: Stack, brevo: BrevoStub) -> None:
    """Queued messages, idempotency records, sent markers, limiter buckets: all gone at once."""
    load = Load.create(gw, USERS, chaos_stack, brevo)

    def fault() -> None:
        after_progress(load, 0.4, TOTAL)
        with load.fault():
            redis.Redis.from_url(chaos_stack.redis_url).flushall()

    load.run(MOVES, during=fault)
    load.verify(redis_fault=True)


def test_the_notifier_killed_while_brevo_fails_and_is_slow(
    gw: httpx.Client, chaos_stack: Stack, brevo: BrevoStub
) -> None:
    """No fault window: money never waits for the notifier, so no 5xx is forgiven."""
    load = Load.create(gw, USERS, chaos_stack, brevo)

    def fault() -> None:
        after_progress(load, 0.2, TOTAL)
        brevo.fail("500", count=5)
        brevo.fail("slow", count=3, delay_s=2)
        brevo.fail("429", count=2, reset=1)
        after_progress(load, 0.5, TOTAL)
        assert kill(chaos_stack, "dramatiq") >= 1

    load.run(MOVES, during=fault)
    load.verify(notifier_restarts=True)


def test_transfers_work_with_the_auth_service_down(gw: httpx.Client, chaos_stack: Stack, brevo: BrevoStub) -> None:
    """No fault window: the wallet checks tokens without the auth service, so no 5xx is forgiven."""
    load = Load.create(gw, USERS, chaos_stack, brevo)  # tokens issued while auth was up
    hold = chaos_stack.var / "run" / "hold-auth"
    port = chaos_stack.ports["auth"] if chaos_stack.ports else 0
    done_while_down = 0

    def fault() -> None:
        nonlocal done_while_down
        after_progress(load, 0.2, TOTAL)
        hold.touch()
        assert kill(chaos_stack, "uvicorn", match=f"--port\x00{port}") == 1
        before = len(load.results)
        after_progress(load, 0.7, TOTAL)
        done_while_down = len(load.results) - before
        assert gw.get("/.well-known/jwks.json").status_code >= 500  # auth really is down
        hold.unlink()

    try:
        load.run(MOVES, during=fault)
    finally:
        hold.unlink(missing_ok=True)
    assert done_while_down > 0
    load.verify()


def test_postgres_connections_dropped_mid_load(gw: httpx.Client, chaos_stack: Stack, brevo: BrevoStub) -> None:
    url = make_url(chaos_stack.wallet_database_url)
    if not url.drivername.startswith("postgresql"):
        pytest.skip("TEST_DATABASE_URL is not set: dropping Postgres connections needs the stack on Postgres")
    load = Load.create(gw, USERS, chaos_stack, brevo)
    admin = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")

    def fault() -> None:
        for share in (0.25, 0.5, 0.75):
            after_progress(load, share, TOTAL)
            with load.fault(), admin.connect() as conn:
                dropped = conn.execute(
                    text(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE datname = :db AND usename = current_user AND pid <> pg_backend_pid()"
                    ),
                    {"db": url.database},
                ).scalar_one()
            assert dropped > 0

    try:
        load.run(MOVES, during=fault)
    finally:
        admin.dispose()
    load.verify()
