"""What every service's migrations check before they run (the Postgres side of the grants
is tested per service, in services/*/tests/test_roles.py)."""

from __future__ import annotations

import pytest
from sqlalchemy import Column, Integer, MetaData, Table

from svckit.migrate import app_role, check_grants
from svckit.settings import BaseServiceSettings

metadata = MetaData()
Table("ledger", metadata, Column("id", Integer, primary_key=True))
Table("notes", metadata, Column("id", Integer, primary_key=True))


def test_every_table_needs_a_declaration() -> None:
    with pytest.raises(ValueError, match=r"tables without a GRANTS entry: \['notes'\]"):
        check_grants(metadata, {"ledger": ("SELECT", "INSERT")})
    check_grants(metadata, {"ledger": ("SELECT", "INSERT"), "notes": ()})  # nothing is a declaration


@pytest.mark.parametrize("privilege", ["TRUNCATE", "TRIGGER", "REFERENCES", "ALL"])
def test_privileges_that_could_bypass_the_ledger_rules_are_never_granted(privilege: str) -> None:
    with pytest.raises(ValueError, match="may not be granted"):
        check_grants(metadata, {"ledger": ("SELECT", privilege), "notes": ()})


@pytest.mark.parametrize(
    ("env", "role"),
    [
        ({"database_url": "postgresql+psycopg://wallet_app:pw@db/wallet"}, ""),  # one URL: nothing to grant
        (
            {
                "database_url": "postgresql+psycopg://wallet_app:pw@db/wallet",
                "migration_database_url": "postgresql+psycopg://wallet_owner:pw@db/wallet",
            },
            "wallet_app",
        ),
        (
            {
                "database_url": "postgresql+psycopg://login_user:pw@pooler/wallet",
                "migration_database_url": "postgresql+psycopg://wallet_owner:pw@db/wallet",
                "database_app_role": "wallet_app",
            },
            "wallet_app",
        ),
        ({"database_url": "sqlite:///var/data/wallet.db"}, ""),
    ],
)
def test_the_app_role_is_who_the_service_connects_as(env: dict[str, str], role: str) -> None:
    assert app_role(BaseServiceSettings(**env)) == role  # type: ignore[arg-type]
