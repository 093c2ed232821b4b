"""make_engine's Postgres sessions: keepalives always, the configured limits when given."""

from __future__ import annotations

import os

import pytest
from sqlalchemy.engine import make_url

from svckit.db import SessionLimits, make_engine
from svckit.settings import BaseServiceSettings

KEEPALIVE_OPTIONS = "-c tcp_keepalives_idle=30 -c tcp_keepalives_interval=10 -c tcp_keepalives_count=3"


class TestConnectArgs:
    def test_without_limits_only_keepalives_and_a_connect_timeout(self) -> None:
        args = SessionLimits().connect_args(make_url("postgresql+psycopg://db/app"))
        assert args == {
            "keepalives": 1,
            "keepalives_idle": 30,
            "keepalives_interval": 10,
            "keepalives_count": 3,
            "connect_timeout": 10,
            "options": KEEPALIVE_OPTIONS,  # the server's own lock/statement/idle settings stand
        }

    def test_the_settings_give_the_limits_and_zero_turns_one_off(self) -> None:
        limits = SessionLimits.from_settings(BaseServiceSettings(), statement_timeout_ms=0)
        options = limits.connect_args(make_url("postgresql+psycopg://db/app"))["options"]
        assert options == (
            "-c lock_timeout=2000 -c statement_timeout=0 -c idle_in_transaction_session_timeout=30000 "
            + KEEPALIVE_OPTIONS
        )

    def test_what_the_url_sets_itself_is_kept(self) -> None:
        url = make_url("postgresql+psycopg://db/app?options=-c%20search_path%3Dledger&connect_timeout=20")
        args = SessionLimits(lock_timeout_ms=500).connect_args(url)
        assert "connect_timeout" not in args  # the URL's 20 is passed by SQLAlchemy itself
        assert args["options"] == "-c search_path=ledger -c lock_timeout=500 " + KEEPALIVE_OPTIONS


def test_postgres_sessions_carry_them() -> None:
    base = os.environ.get("TEST_DATABASE_URL")
    if not base:
        pytest.skip("TEST_DATABASE_URL is not set: no Postgres to connect to")
    url = make_url(base).update_query_dict({"options": "-c search_path=public"})
    engine = make_engine(url.render_as_string(hide_password=False), limits=SessionLimits(lock_timeout_ms=1234))
    try:
        with engine.connect() as conn:
            shown = {
                name: conn.exec_driver_sql(f"SHOW {name}").scalar_one()
                for name in ("lock_timeout", "search_path", "tcp_keepalives_idle", "tcp_keepalives_count")
            }
    finally:
        engine.dispose()
    assert shown == {
        "lock_timeout": "1234ms",
        "search_path": "public",
        "tcp_keepalives_idle": "30",
        "tcp_keepalives_count": "3",
    }
