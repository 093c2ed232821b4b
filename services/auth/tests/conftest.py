from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import text

from auth.config import Settings
from auth.main import create_app
from svckit.testing import alembic, fresh_database, redis_server

from .factories import SERVICE_TOKEN

INI = Path(__file__).resolve().parents[1] / "alembic.ini"


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with fresh_database("auth", tmp_path_factory.mktemp("db")) as url:
        alembic(INI, url, "upgrade", "head")
        yield url


@pytest.fixture
def settings(database_url: str, redis_url: str, tmp_path: Path) -> Settings:
    return Settings(
        database_url=database_url,
        redis_url=redis_url,
        keys_dir=str(tmp_path / "keys"),
        bcrypt_rounds=4,  # the real cost is 12; tests only need real bcrypt, not slow bcrypt
        service_token=SERVICE_TOKEN,
    )


@contextmanager
def app_client(settings: Settings) -> Iterator[TestClient]:
    """A client of the auth app on these settings; its users, outbox and Redis are emptied after."""
    app = create_app(settings)
    with TestClient(app) as c:
        yield c
        with app.state.engine.begin() as conn:
            conn.execute(text("DELETE FROM outbox"))
            conn.execute(text("DELETE FROM users"))
    redis.Redis.from_url(settings.redis_url).flushdb()


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with app_client(settings) as c:
        yield c
