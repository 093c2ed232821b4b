from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlmodel import Session

from auth import repository
from auth.models import User

from .factories import PASSWORD


class TestDatabaseErrorsLeakNoValues:
    def test_a_failed_insert_is_logged_without_its_bound_parameters(
        self, client: TestClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        # A forced database error on the insert, carrying the new user's values as parameters.
        def broken_add_user(session: Session, user: User) -> User:
            session.execute(
                text("INSERT INTO users (email, password_hash, no_such_column) VALUES (:email, :hash, 1)"),
                {"email": user.email, "hash": user.password_hash},
            )
            return user

        monkeypatch.setattr(repository, "add_user", broken_add_user)
        body = {"first_name": "Jane", "last_name": "Doe", "email": "leaky@example.com", "password": PASSWORD}
        with caplog.at_level(logging.ERROR):
            response = client.post("/signup", json=body)
        assert response.status_code == 500
        assert response.json()["code"] == "internal_error"
        logged = "\n".join(caplog.text.splitlines() + [r.getMessage() for r in caplog.records])
        assert "no_such_column" in logged  # the error itself is logged, with its SQL
        assert "leaky@example.com" not in logged
        assert "$2b$" not in logged  # nor the password hash
        assert "leaky@example.com" not in response.text
