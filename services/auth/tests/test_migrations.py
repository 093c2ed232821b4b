"""Every migration goes up and down cleanly (SQLite here, Postgres in the Postgres pass)."""

from __future__ import annotations

import pytest

from auth.models import Base
from svckit.testing import fresh_database, migration_roundtrip

from .conftest import INI


def test_upgrade_downgrade_upgrade(tmp_path_factory: pytest.TempPathFactory) -> None:
    with fresh_database("auth_migrations", tmp_path_factory.mktemp("mig")) as url:
        up, down, again = migration_roundtrip(INI, url)
    assert up == set(Base.metadata.tables)  # the migrations build exactly the models' tables
    assert down == set()
    assert again == up
