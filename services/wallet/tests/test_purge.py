"""`wallet-purge`: idempotency records past their age and confirmed outbox rows go, in
batches, beside money that keeps moving; nothing younger than the contract's 24 hours."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlalchemy import Engine, func, insert, select, update
from sqlalchemy.exc import DBAPIError

from svckit import retention
from svckit.db import make_engine, utcnow
from wallet.purge import IDEMPOTENCY, OUTBOX, PurgeSettings, targets

from .factories import AuthFake, Signer, User, key, move, new_user, open_wallet

PURGE = Path(sys.executable).parent / "wallet-purge"
HOUR = timedelta(hours=1)


@pytest.fixture
def engine(database_url: str) -> Any:
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


def records(engine: Engine, user_id: int, ages: list[timedelta]) -> list[int]:
    """Idempotency records of `user_id`, as old as `ages` (written directly: the suite's
    requests are all young)."""
    now = utcnow()
    rows = [
        {
            "user_id": user_id,
            "endpoint": "deposit",
            "key": key(),
            "fingerprint": "0" * 64,
            "status_code": 200,
            "response_body": "{}",
            "created_at": now - age,
        }
        for age in ages
    ]
    with engine.begin() as conn:
        return list(conn.execute(insert(IDEMPOTENCY).returning(IDEMPOTENCY.c.id), rows).scalars())


def kept(engine: Engine, user_id: int) -> set[int]:
    with engine.connect() as conn:
        return set(conn.execute(select(IDEMPOTENCY.c.id).where(IDEMPOTENCY.c.user_id == user_id)).scalars())


def idempotency(settings: PurgeSettings) -> retention.Target:
    return targets(settings)[0]


class TestIdempotencyRecords:
    def test_records_past_the_age_go_and_younger_ones_stay(self, engine: Engine, database_url: str) -> None:
        user = 9_000_001
        old = records(engine, user, [72 * HOUR, 49 * HOUR])
        young = records(engine, user, [47 * HOUR, 25 * HOUR, HOUR, timedelta(0)])
        settings = PurgeSettings(database_url=database_url)  # two days by default
        result = retention.purge(engine, idempotency(settings), batch_size=1_000, pause_s=0)
        assert result.deleted >= len(old)  # and any aged record an earlier test left
        assert kept(engine, user) == set(young)

    def test_an_age_under_the_contracts_24_hours_is_refused(self, database_url: str) -> None:
        with pytest.raises(ValidationError, match="at least 86400"):
            PurgeSettings(retention_idempotency_age_s=86_399)
        assert PurgeSettings(retention_idempotency_age_s=86_400).retention_idempotency_age_s == 86_400
        env = {**os.environ, "WALLET_DATABASE_URL": database_url, "WALLET_RETENTION_IDEMPOTENCY_AGE_S": "3600"}
        result = subprocess.run([str(PURGE)], env=env, capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 1
        assert "WALLET_RETENTION_IDEMPOTENCY_AGE_S must be at least 86400" in result.stderr
        assert "input_value" not in result.stderr  # settings errors never echo what was read

    def test_the_database_refuses_to_delete_a_record_younger_than_24_hours(self, engine: Engine) -> None:
        user = 9_000_002
        (young,) = records(engine, user, [23 * HOUR])
        (old,) = records(engine, user, [25 * HOUR])
        with pytest.raises(DBAPIError, match="kept at least 24 hours"), engine.begin() as conn:
            conn.execute(IDEMPOTENCY.delete().where(IDEMPOTENCY.c.user_id == user))
        assert kept(engine, user) == {young, old}  # the whole statement was refused
        with engine.begin() as conn:
            conn.execute(IDEMPOTENCY.delete().where(IDEMPOTENCY.c.id == old))
        assert kept(engine, user) == {young}

    def test_a_key_whose_record_was_purged_runs_afresh(
        self, client: TestClient, signer: Signer, auth_fake: AuthFake, engine: Engine, database_url: str
    ) -> None:
        """The documented end of a key: once its record is purged (and Redis's copy expired),
        the same request is a new one and moves money again."""
        user = new_user(signer, auth_fake)
        open_wallet(client, user)
        idem = key()
        first = move(client, user, "deposit", amount=100, idem=idem)
        again = move(client, user, "deposit", amount=100, idem=idem)
        assert (first.status_code, again.headers.get("Idempotent-Replayed")) == (200, "true")
        assert again.content == first.content
        with engine.begin() as conn:  # three days pass
            conn.execute(
                update(IDEMPOTENCY).where(IDEMPOTENCY.c.user_id == user.id).values(created_at=utcnow() - 72 * HOUR)
            )
        expire_cached_outcomes(client, user)
        settings = PurgeSettings(database_url=database_url)
        assert retention.purge(engine, idempotency(settings), batch_size=100, pause_s=0).deleted >= 1
        assert kept(engine, user.id) == set()

        fresh = move(client, user, "deposit", amount=100, idem=idem)
        assert fresh.status_code == 200
        assert "Idempotent-Replayed" not in fresh.headers
        assert fresh.json()["current_balance"] == 200
        assert client.get("/wallet", headers=user.headers).json()["balance"] == 200
        assert len(kept(engine, user.id)) == 1  # the key's new record, young again

    def test_money_moves_while_a_long_purge_runs(
        self, client: TestClient, signer: Signer, auth_fake: AuthFake, engine: Engine, database_url: str
    ) -> None:
        """Deposits beside a purge of 3,000 records in batches of 100, under the service's own
        lock_timeout (a movement that waited past it would answer 503)."""
        records(engine, 9_000_003, [72 * HOUR] * 3_000)
        user = new_user(signer, auth_fake)
        open_wallet(client, user)
        settings = PurgeSettings(database_url=database_url)
        done: list[retention.Result] = []
        purger = threading.Thread(
            target=lambda: done.append(retention.purge(engine, idempotency(settings), batch_size=100, pause_s=0.001))
        )
        purger.start()
        statuses = []
        while purger.is_alive() or not statuses:
            statuses.append(move(client, user, "deposit", amount=1).status_code)
        purger.join(60)
        assert set(statuses) == {200}
        assert done[0].deleted >= 3_000
        assert kept(engine, 9_000_003) == set()
        assert client.get("/wallet", headers=user.headers).json()["balance"] == len(statuses)


def expire_cached_outcomes(client: TestClient, user: User) -> None:
    """What WALLET_IDEMPOTENCY_TTL_S does to Redis's copy of the user's outcomes."""
    cache = redis.Redis.from_url(client.app.state.settings.redis_url)  # type: ignore[attr-defined]
    try:
        for name in cache.scan_iter(f"idem:resp:{user.id}:*"):
            cache.delete(name)
    finally:
        cache.close()


class TestTheCommand:
    def test_it_purges_old_records_and_confirmed_outbox_rows(self, engine: Engine, database_url: str) -> None:
        user = 9_000_004
        records(engine, user, [72 * HOUR])
        now = utcnow()
        sent, dead = key(), key()
        with engine.begin() as conn:
            conn.execute(
                insert(OUTBOX),
                [
                    {
                        "id": email_id,
                        "actor_name": "notifier.send_receipt",
                        "payload": "{}",
                        "created_at": now - timedelta(days=9),
                        "published_at": now - timedelta(days=9),
                        "confirmed_at": now - timedelta(days=8),
                        "outcome": outcome,
                    }
                    for email_id, outcome in ((sent, "sent"), (dead, "dead_lettered"))
                ],
            )
        env = {**os.environ, "WALLET_DATABASE_URL": database_url, "WALLET_RETENTION_BATCH_SIZE": "50"}
        result = subprocess.run([str(PURGE)], env=env, capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 0, result.stderr
        assert "idempotency_records: purged" in result.stdout
        assert "outbox: purged" in result.stdout
        assert kept(engine, user) == set()
        with engine.connect() as conn:
            left = set(conn.execute(select(OUTBOX.c.id).where(OUTBOX.c.id.in_([sent, dead]))).scalars())
            unconfirmed = conn.execute(select(func.count()).where(OUTBOX.c.confirmed_at.is_(None))).scalar_one()
        assert left == {dead}  # dead letters stay for `wallet-relay dead-letters`
        assert unconfirmed > 0  # the suite's own rows: never published here, never purged


def test_indexes_serve_both_purges(engine: Engine, database_url: str) -> None:
    """The migrations' indexes (0007) cover each purge's WHERE and ORDER BY."""
    expected = {"idempotency_records": "ix_idempotency_records_created_at", "outbox": retention.OUTBOX_INDEX}
    for target in targets(PurgeSettings(database_url=database_url)):
        cursor = (utcnow() - timedelta(days=30), 0 if target.name == "idempotency_records" else "0")
        query = retention.candidates(target, cutoff=utcnow(), after=cursor, limit=100, dialect=engine.dialect.name)
        plan = explain(engine, query)
        assert expected[target.name] in plan, plan
        assert "TEMP B-TREE" not in plan, plan  # SQLite: read in the index's order
        assert "Sort" not in plan, plan  # Postgres: the same


def explain(engine: Engine, query: Any) -> str:
    compiled = query.compile(engine)
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            # Not whether the planner prefers the index on the suite's small tables: whether
            # it can read the rows from it, in its order.
            for method in ("seqscan", "bitmapscan", "sort"):
                conn.exec_driver_sql(f"SET LOCAL enable_{method} = off")
            return "\n".join(conn.exec_driver_sql("EXPLAIN " + str(compiled), compiled.params).scalars())
        params = tuple(str(compiled.params[name]) for name in compiled.positiontup or ())
        return "\n".join(r[3] for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + str(compiled), params))
