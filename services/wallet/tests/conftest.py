from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Connection, create_engine

from svckit.http import async_service_client
from svckit.jwt import JWKSVerifier
from svckit.testing import alembic, fresh_database, redis_server
from wallet.config import Settings
from wallet.main import create_app

from .factories import AuthFake, Signer

INI = Path(__file__).resolve().parents[1] / "alembic.ini"


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # One database per session, never cleaned: ledger tables refuse DELETE, and every
    # test uses fresh users, so the audit must hold over everything the suite did.
    with fresh_database("wallet", tmp_path_factory.mktemp("db")) as url:
        alembic(INI, url, "upgrade", "head")
        yield url


@pytest.fixture(scope="session")
def signer() -> Signer:
    return Signer()


@pytest.fixture
def auth_fake() -> AuthFake:
    return AuthFake()


@pytest.fixture
def settings(database_url: str, redis_url: str) -> Settings:
    return Settings(
        database_url=database_url, redis_url=redis_url, service_token="test-service-token", allow_dev_service_token=True
    )


@contextmanager
def app_client(settings: Settings, signer: Signer, auth_fake: AuthFake) -> Iterator[TestClient]:
    """A running wallet app on `settings`' database."""
    app = create_app(settings)
    with TestClient(app) as c:
        # Fakes only at the process edge: the auth service's JWKS and its user lookup.
        app.state.verifier = JWKSVerifier(signer.jwks, issuer=settings.jwt_issuer, audience=settings.jwt_audience)
        app.state.auth_client = async_service_client(
            "http://auth", service_token="test-service-token", transport=httpx.MockTransport(auth_fake), backoff_s=0
        )
        yield c


@pytest.fixture
def client(settings: Settings, signer: Signer, auth_fake: AuthFake) -> Iterator[TestClient]:
    with app_client(settings, signer, auth_fake) as c:
        yield c


@pytest.fixture
def holder(database_url: str) -> Iterator[Connection]:
    """Another session, as a stuck or slow client's transaction would be (no timeouts of ours)."""
    engine = create_engine(database_url)
    with engine.connect() as conn:
        yield conn
    engine.dispose()
