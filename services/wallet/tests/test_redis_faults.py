"""Redis is only the fast path: losing its data or the whole server moves no money twice."""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections import Counter

import redis
from fastapi.testclient import TestClient

from svckit.aiodb import make_database
from svckit.redis import async_redis_client
from svckit.testing import free_port, redis_server
from wallet.audit import audit
from wallet.config import Settings
from wallet.idempotency import IdempotencyCache

from .conftest import app_client
from .factories import AuthFake, Signer, call, key, move, new_user, open_wallet, run_all, sync_engine


def test_redis_flushed_between_a_request_and_its_retry(client: TestClient, signer: Signer, auth_fake: AuthFake) -> None:
    user = new_user(signer, auth_fake)
    open_wallet(client, user, balance=100)
    k = key()
    first = move(client, user, "withdraw", idem=k, amount=60)
    redis.Redis.from_url(client.app.state.settings.redis_url).flushall()  # type: ignore[attr-defined]
    retry = move(client, user, "withdraw", idem=k, amount=60)
    assert retry.content == first.content
    assert retry.headers["idempotent-replayed"] == "true"
    assert client.get("/wallet", headers=user.headers).json()["balance"] == 40
    assert audit(sync_engine(client)).violations == []


def test_a_redis_that_lost_its_scripts_still_locks_and_caches(
    client: TestClient, signer: Signer, auth_fake: AuthFake
) -> None:
    """A restarted Redis (or another node) no longer knows the scripts: they are loaded
    again and the fast path keeps working, not silently falling back to the database."""
    user = new_user(signer, auth_fake)
    open_wallet(client, user, balance=100)
    r = redis.Redis.from_url(client.app.state.settings.redis_url)  # type: ignore[attr-defined]
    r.script_flush()
    k = key()
    first = move(client, user, "withdraw", idem=k, amount=25)
    assert first.status_code == 200
    [cached] = r.keys(f"idem:resp:*{k}*")
    assert first.json()["current_balance"] == 75
    assert str(first.json()["current_balance"]).encode() in r.get(cached)
    assert all(r.script_exists(*[s.sha for s in _scripts(client)]))


def _scripts(client: TestClient) -> list:  # type: ignore[type-arg]
    cache = client.app.state.uow.idempotency  # type: ignore[attr-defined]
    return [cache._begin, cache._finish]


def test_money_moves_correctly_with_redis_down(client: TestClient, signer: Signer, auth_fake: AuthFake) -> None:
    user = new_user(signer, auth_fake)
    open_wallet(client, user, balance=100)
    state = client.app.state  # type: ignore[attr-defined]
    dead = async_redis_client(f"redis://127.0.0.1:{free_port()}/0")
    state.uow = dataclasses.replace(state.uow, idempotency=IdempotencyCache(dead, ttl_s=60, lock_ttl_ms=1000))
    k = key()
    first = move(client, user, "withdraw", idem=k, amount=30)
    assert first.status_code == 200
    retry = move(client, user, "withdraw", idem=k, amount=30)
    assert retry.content == first.content  # answered from the database
    assert retry.headers["idempotent-replayed"] == "true"
    assert move(client, user, "withdraw", idem=k, amount=31).json()["code"] == "idempotency_key_reused"
    assert move(client, user, "withdraw", amount=80).json()["code"] == "insufficient_funds"
    assert client.get("/wallet", headers=user.headers).json()["balance"] == 70
    assert audit(sync_engine(client)).violations == []


def test_an_expired_lock_cannot_double_move(client: TestClient, signer: Signer, auth_fake: AuthFake) -> None:
    """A first request whose lock expired (slow request) and a retry both reach the database:
    the unique constraint lets one movement through and the other replays it."""
    user = new_user(signer, auth_fake)
    open_wallet(client, user, balance=100)
    state = client.app.state  # type: ignore[attr-defined]
    k = key()
    first = move(client, user, "withdraw", idem=k, amount=10)
    # Drop the cached response and the lock, as if both had expired before the retry.
    cache = redis.Redis.from_url(state.settings.redis_url)
    for redis_key in cache.scan_iter(f"idem:*:{user.id}:withdraw:{k}"):
        cache.delete(redis_key)
    retry = move(client, user, "withdraw", idem=k, amount=10)
    assert retry.content == first.content
    assert client.get("/wallet", headers=user.headers).json()["balance"] == 90
    assert audit(sync_engine(client)).violations == []


def test_redis_stopped_during_a_run(client: TestClient, signer: Signer, auth_fake: AuthFake) -> None:
    """Concurrent withdrawals, each retried with its key until definitive, while the Redis
    server is shut down mid-run: exactly the affordable ones succeed, and the audit is clean."""
    user = new_user(signer, auth_fake)
    open_wallet(client, user, balance=1000)
    state = client.app.state  # type: ignore[attr-defined]
    with redis_server() as url:
        victim = async_redis_client(url)
        state.uow = dataclasses.replace(state.uow, idempotency=IdempotencyCache(victim, ttl_s=60, lock_ttl_ms=5000))
        count = itertools.count()

        def until_definitive(k: str) -> tuple[int, bytes]:
            for _ in range(200):
                if next(count) == 25:
                    redis.Redis.from_url(url).shutdown(nosave=True)  # mid-run
                status, body = call(client, user, "withdraw", k, amount=50)
                if status != 409:
                    return status, body
                time.sleep(0.01)
            raise AssertionError("never definitive")

        keys = [key() for _ in range(60)]
        results = run_all([lambda k=k: until_definitive(k) for k in keys])
        # A second round with the same keys replays: nothing moves twice.
        replays = run_all([lambda k=k: until_definitive(k) for k in keys])
    assert Counter(s for s, _ in results) == {200: 20, 422: 40}
    assert replays == results
    assert client.get("/wallet", headers=user.headers).json()["balance"] == 0
    assert audit(sync_engine(client)).violations == []


class TestReadiness:
    """Money moves without Redis, so Redis down leaves the wallet ready (degraded); only a
    database that does not answer takes it out of the Service."""

    def test_redis_down_is_ready_and_degraded(self, settings: Settings, signer: Signer, auth_fake: AuthFake) -> None:
        dead = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})  # nothing listens
        with app_client(dead, signer, auth_fake) as client:
            ready = client.get("/readyz")
            assert ready.status_code == 200
            assert ready.json() == {
                "status": "degraded",
                "checks": {"database": "ok", "redis": "ConnectionError"},
                "degraded": ["redis"],
            }
            user = new_user(signer, auth_fake)
            open_wallet(client, user, balance=100)
            assert move(client, user, "withdraw", amount=30).status_code == 200  # what "ready" promises

    def test_the_database_down_is_503(self, client: TestClient) -> None:
        state = client.app.state  # type: ignore[attr-defined]
        assert client.get("/readyz").json()["status"] == "ok"
        live = state.db
        refused = f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/wallet"
        state.db = client.portal.call(make_database, refused)  # type: ignore[union-attr]
        try:
            ready = client.get("/readyz")
        finally:
            client.portal.call(state.db.dispose)  # type: ignore[union-attr]
            state.db = live
        assert ready.status_code == 503
        assert ready.json()["status"] == "unavailable"
        assert ready.json()["checks"] == {"database": "OperationalError", "redis": "ok"}
