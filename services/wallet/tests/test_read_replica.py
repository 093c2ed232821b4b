"""WALLET_READ_DATABASE_URL: history and ledgers are read there, everything that decides
whether money moves (and the balance) from WALLET_DATABASE_URL (deploy/SCALING.md).

The "replica" here is a second database at the same schema that has not seen the
primary's latest writes yet, as a lagging replica would be: what each call answers shows
which database it read."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from svckit.testing import alembic, fresh_database
from wallet.config import Settings

from .conftest import INI, app_client
from .factories import AuthFake, Signer, move, new_user, open_wallet


@pytest.fixture(scope="module")
def lagging_replica(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with fresh_database("wallet_replica", tmp_path_factory.mktemp("replica")) as url:
        alembic(INI, url, "upgrade", "head")
        yield url


def test_history_and_ledger_come_from_the_replica_money_from_the_primary(
    settings: Settings, lagging_replica: str, signer: Signer, auth_fake: AuthFake
) -> None:
    user, payee = new_user(signer, auth_fake), new_user(signer, auth_fake)
    with app_client(settings, signer, auth_fake) as client:  # no replica: all on the primary
        open_wallet(client, user, balance=700)
        to = open_wallet(client, payee)["id"]
        [opening] = client.get("/transaction/history", headers=user.headers).json()["transactions"]
        assert client.get(f"/transaction/{opening['id']}/ledger", headers=user.headers).status_code == 200

    lagging = settings.model_copy(update={"read_database_url": lagging_replica})
    with app_client(lagging, signer, auth_fake) as client:
        # Reads that may lag: the replica has not seen this user's wallet yet.
        assert client.get("/transaction/history", headers=user.headers).json()["transactions"] == []
        assert client.get(f"/transaction/{opening['id']}/ledger", headers=user.headers).status_code == 404
        # The balance, and what a movement checks, are the primary's.
        assert client.get("/wallet", headers=user.headers).json()["balance"] == 700
        assert move(client, user, "transfer", amount=300, to_account_id=to).status_code == 200
        assert move(client, user, "transfer", amount=500, to_account_id=to).json()["code"] == "insufficient_funds"
        assert client.get("/wallet", headers=user.headers).json()["balance"] == 400
        assert client.get("/readyz").json()["checks"]["replica"] == "ok"
