"""Postgres sessions carry lock, statement and idle-transaction timeouts, and a movement
that runs into one answers a retryable 503 that keeps nothing under its idempotency key."""

from __future__ import annotations

import uuid

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import Connection, text

from svckit.aiodb import transaction
from wallet.config import Settings

from .factories import AuthFake, Signer, move, new_user, open_wallet
from .test_concurrency import first_record_commit_answer_lost

LIMITS = ("lock_timeout", "statement_timeout", "idle_in_transaction_session_timeout")
KEEPALIVES = ("tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count")


@pytest.fixture
def settings(request: pytest.FixtureRequest, database_url: str, redis_url: str) -> Settings:
    if not database_url.startswith("postgresql"):
        pytest.skip("needs Postgres (TEST_DATABASE_URL): the timeouts are Postgres session settings")
    overrides = getattr(request, "param", {})
    return Settings(
        database_url=database_url,
        redis_url=redis_url,
        service_token="test-service-token",
        allow_dev_service_token=True,
        **overrides,
    )


class TestEngineSessions:
    def test_carry_the_configured_limits_and_keepalives(self, client: TestClient, settings: Settings) -> None:
        db = client.app.state.db  # type: ignore[attr-defined]

        async def session_settings() -> dict[str, str]:
            async with transaction(db, read_only=True) as conn:
                return {name: (await conn.execute(text(f"SHOW {name}"))).scalar_one() for name in LIMITS + KEEPALIVES}

        shown = client.portal.call(session_settings)  # type: ignore[union-attr]
        assert shown == {
            "lock_timeout": "2s",
            "statement_timeout": "10s",
            "idle_in_transaction_session_timeout": "30s",
            "tcp_keepalives_idle": "30",
            "tcp_keepalives_interval": "10",
            "tcp_keepalives_count": "3",
        }
        assert (settings.db_lock_timeout_ms, settings.db_statement_timeout_ms) == (2_000, 10_000)  # the defaults
        # The client gives up too, a little after the server's statement timeout (a dead
        # server cannot hold a request), and waits at most the connect timeout to connect.
        pool = db.pool
        assert pool._connect_kwargs["command_timeout"] == 15
        assert pool._connect_kwargs["timeout"] == settings.db_connect_timeout_s == 5


BUSY_CASES = [
    pytest.param({"db_lock_timeout_ms": 300}, "55P03", id="lock_timeout"),
    # With no lock timeout, the statement timeout ends the wait instead.
    pytest.param({"db_lock_timeout_ms": 0, "db_statement_timeout_ms": 300}, "57014", id="statement_timeout"),
]


@pytest.mark.parametrize(("settings", "sqlstate"), BUSY_CASES, indirect=["settings"])
class TestAMovementOnALockedWallet:
    def test_is_a_retryable_503_that_keeps_nothing(
        self,
        client: TestClient,
        signer: Signer,
        auth_fake: AuthFake,
        holder: Connection,
        sqlstate: str,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        user = new_user(signer, auth_fake)
        wallet_id = open_wallet(client, user, balance=100)["id"]
        history = client.get("/transaction/history", headers=user.headers).json()
        holder.execute(text("SELECT id FROM wallets WHERE id = :id FOR UPDATE"), {"id": wallet_id})
        key = uuid.uuid4().hex

        busy = move(client, user, "withdraw", idem=key, amount=30)

        assert holder.in_transaction()  # answered while the wallet was still locked
        assert busy.status_code == 503, busy.text
        assert busy.headers["content-type"] == "application/problem+json"
        assert busy.headers["retry-after"] == "1"
        assert (busy.json()["code"], busy.json()["status"]) == ("wallet_busy", 503)
        assert f"withdraw timed out in the database ({sqlstate})" in caplog.text
        # Nothing moved, nothing was kept under the key, and its Redis lock is free.
        assert client.get("/wallet", headers=user.headers).json()["balance"] == 100
        assert client.get("/transaction/history", headers=user.headers).json() == history
        kept = holder.execute(
            text("SELECT count(*) FROM idempotency_records WHERE user_id = :u AND key = :k"), {"u": user.id, "k": key}
        ).scalar_one()
        assert kept == 0
        cache = redis.Redis.from_url(client.app.state.settings.redis_url)  # type: ignore[attr-defined]
        assert cache.exists(f"idem:lock:{user.id}:withdraw:{key}", f"idem:resp:{user.id}:withdraw:{key}") == 0

        holder.rollback()  # the stuck session ends
        again = move(client, user, "withdraw", idem=key, amount=30)
        assert again.status_code == 200, again.text
        assert "idempotent-replayed" not in again.headers  # it ran now, for the first time
        assert again.json()["current_balance"] == 70
        assert client.get("/wallet", headers=user.headers).json()["balance"] == 70

    def test_closing_the_wallet_is_the_same_503(
        self, client: TestClient, signer: Signer, auth_fake: AuthFake, holder: Connection, sqlstate: str
    ) -> None:
        user = new_user(signer, auth_fake)
        wallet_id = open_wallet(client, user)["id"]
        holder.execute(text("SELECT id FROM wallets WHERE id = :id FOR UPDATE"), {"id": wallet_id})

        busy = client.delete("/wallet", headers=user.headers)

        assert (busy.status_code, busy.json()["code"], busy.headers["retry-after"]) == (503, "wallet_busy", "1")
        assert client.get("/wallet", headers=user.headers).status_code == 200  # still open
        holder.rollback()
        assert client.delete("/wallet", headers=user.headers).status_code == 200


@pytest.mark.parametrize("settings", [{"db_lock_timeout_ms": 300}], indirect=True)
def test_a_lost_commit_answers_first_even_when_the_wallet_is_locked_for_the_retry(
    client: TestClient,
    signer: Signer,
    auth_fake: AuthFake,
    holder: Connection,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The COMMIT reaches the database but its answer is lost, and before the retry another
    session locks the wallet: the retry finds its own record without waiting on that lock,
    so the client gets the movement's first answer, not a 503 'nothing was done'."""
    user = new_user(signer, auth_fake)
    wallet_id = open_wallet(client, user, balance=100)["id"]
    key = uuid.uuid4().hex

    def lock_the_wallet() -> None:
        holder.execute(text("SELECT id FROM wallets WHERE id = :id FOR UPDATE"), {"id": wallet_id})

    with first_record_commit_answer_lost(monkeypatch, on_lost=lock_the_wallet) as lost:
        first = move(client, user, "withdraw", idem=key, amount=30)
    assert len(lost) == 1
    assert holder.in_transaction()  # the retry ran with the wallet locked
    assert first.status_code == 200, first.text
    assert "idempotent-replayed" not in first.headers
    assert first.json()["current_balance"] == 70
    holder.rollback()
    assert client.get("/wallet", headers=user.headers).json()["balance"] == 70


@pytest.mark.parametrize(
    "settings", [{"db_pool_size": 1, "db_max_overflow": 0, "db_lock_timeout_ms": 300}], indirect=True
)
def test_a_taken_pool_is_a_503_that_leaves_the_key_free(
    client: TestClient, signer: Signer, auth_fake: AuthFake
) -> None:
    """Every pooled connection taken: the movement waits the lock timeout, answers 503
    wallet_busy, and leaves its key's Redis lock free, so the retry runs at once (no 409)."""
    user = new_user(signer, auth_fake)
    open_wallet(client, user, balance=100)
    db = client.app.state.db  # type: ignore[attr-defined]
    held = client.portal.call(db.connect)  # type: ignore[union-attr]
    key = uuid.uuid4().hex
    try:
        busy = move(client, user, "withdraw", idem=key, amount=30)
    finally:
        client.portal.call(held.close)  # type: ignore[union-attr]
    assert (busy.status_code, busy.json()["code"], busy.headers["retry-after"]) == (503, "wallet_busy", "1")
    again = move(client, user, "withdraw", idem=key, amount=30)
    assert again.status_code == 200, again.text
    assert "idempotent-replayed" not in again.headers
    assert again.json()["current_balance"] == 70
