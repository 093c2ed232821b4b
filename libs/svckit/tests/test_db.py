"""Database errors never carry their bound values (they end up in logs and tracebacks)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from svckit.db import make_engine


def test_a_constraint_violation_names_no_parameter_values(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}/t.db")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE users (email TEXT UNIQUE, password_hash TEXT)"))
        conn.execute(text("INSERT INTO users VALUES (:e, :h)"), {"e": "jane@example.com", "h": "$2b$12$secret"})
    with pytest.raises(IntegrityError) as caught, engine.begin() as conn:
        conn.execute(text("INSERT INTO users VALUES (:e, :h)"), {"e": "jane@example.com", "h": "$2b$12$secret"})
    message = str(caught.value)
    assert "UNIQUE" in message
    assert "jane@example.com" not in message
    assert "$2b$12$secret" not in message
    engine.dispose()


def test_postgres_engines_hide_parameters_too() -> None:
    # No connection needed: the engine is configured at creation.
    engine = make_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")
    assert engine.hide_parameters
    engine.dispose()
