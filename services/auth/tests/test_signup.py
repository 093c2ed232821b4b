from __future__ import annotations

import json

import bcrypt
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from .factories import PASSWORD, signup


def stored_users(client: TestClient) -> list[tuple[str, str, str, str]]:
    with client.app.state.engine.connect() as conn:  # type: ignore[attr-defined]
        return [tuple(r) for r in conn.execute(text("SELECT email, first_name, last_name, password_hash FROM users"))]


class TestSignup:
    def test_created_with_exactly_the_contract_shape(self, client: TestClient) -> None:
        response = client.post(
            "/signup",
            json={"first_name": " Jane ", "last_name": "Doe", "email": "Jane@Example.COM", "password": PASSWORD},
        )
        assert response.status_code == 201
        body = response.json()
        assert set(body) == {"id", "first_name", "last_name", "email"}
        assert body["first_name"] == "Jane"  # trimmed
        assert body["email"] == "jane@example.com"  # lower-cased
        assert isinstance(body["id"], int)

    def test_password_is_stored_as_a_bcrypt_hash_of_the_configured_cost(self, client: TestClient) -> None:
        signup(client)
        [(_, _, _, hashed)] = stored_users(client)
        assert hashed != PASSWORD
        assert hashed.startswith("$2b$04$")
        assert bcrypt.checkpw(PASSWORD.encode(), hashed.encode())

    def test_duplicate_email_is_409_whatever_its_case(self, client: TestClient) -> None:
        signup(client, email="jane@example.com")
        response = client.post(
            "/signup", json={"first_name": "J", "last_name": "D", "email": "JANE@example.com", "password": PASSWORD}
        )
        assert response.status_code == 409
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["code"] == "email_taken"
        assert len(stored_users(client)) == 1


class TestSignupValidation:
    @pytest.mark.parametrize(
        ("password", "ok"),
        [
            ("a" * 72, True),
            ("a" * 73, False),  # bcrypt's limit: refused, never truncated
            ("é" * 36, True),  # 72 bytes
            ("é" * 37, False),  # 37 characters but 74 bytes
            ("short7!", False),
            ("8chars!!", True),
        ],
    )
    def test_password_length_in_characters_and_bytes(self, client: TestClient, password: str, ok: bool) -> None:
        body = {"first_name": "Jane", "last_name": "Doe", "email": "jane@example.com", "password": password}
        response = client.post("/signup", json=body)
        assert response.status_code == (201 if ok else 422), response.text
        if not ok:
            assert [e["field"] for e in response.json()["errors"]] == ["password"]
            assert stored_users(client) == []

    @pytest.mark.parametrize(
        "changes",
        [
            {"first_name": "   "},
            {"last_name": "x" * 101},
            {"email": "not-an-email"},
            {"email": 42},
            {"first_name": None},
        ],
    )
    def test_bad_fields_are_422_problems_that_name_the_field(
        self, client: TestClient, changes: dict[str, object]
    ) -> None:
        body = {"first_name": "Jane", "last_name": "Doe", "email": "jane@example.com", "password": PASSWORD, **changes}
        response = client.post("/signup", json=body)
        assert response.status_code == 422
        problem = response.json()
        assert response.headers["content-type"] == "application/problem+json"
        assert problem["code"] == "validation_error"
        assert problem["status"] == 422
        assert {e["field"] for e in problem["errors"]} == set(changes)
        assert stored_users(client) == []

    @pytest.mark.parametrize("field", ["first_name", "last_name"])
    @pytest.mark.parametrize(
        "name",
        [
            "Ja\u202ene",  # right-to-left override (Cf)
            "\u202eJane",
            "Ja\x00ne",  # NUL (Cc)
            "Ja\r\nne",  # CR/LF (Cc)
            "Ja\tne",
            "Ja\u200bne",  # zero width space (Cf)
            "Ja\u2028ne",  # line separator (Zl)
            "Ja\u2029ne",  # paragraph separator (Zp)
            "Ja\x85ne",  # next line (Cc)
        ],
    )
    def test_control_and_format_characters_in_names_are_refused(
        self, client: TestClient, field: str, name: str
    ) -> None:
        body = {"first_name": "Jane", "last_name": "Doe", "email": "jane@example.com", "password": PASSWORD}
        response = client.post("/signup", json={**body, field: name})
        assert response.status_code == 422, response.text
        problem = response.json()
        assert problem["code"] == "validation_error"
        assert [e["field"] for e in problem["errors"]] == [field]
        assert stored_users(client) == []

    @pytest.mark.parametrize("name", ["Zoë", "José María", "O'Brien", "Jean-Luc", "李小龍", "Ngũgĩ", "محمد"])
    def test_ordinary_names_in_any_script_are_accepted(self, client: TestClient, name: str) -> None:
        body = {"first_name": name, "last_name": name, "email": "jane@example.com", "password": PASSWORD}
        response = client.post("/signup", json=body)
        assert response.status_code == 201, response.text
        assert (response.json()["first_name"], response.json()["last_name"]) == (name, name)

    def test_malformed_json_is_a_422_problem(self, client: TestClient) -> None:
        response = client.post("/signup", content=b"{not json", headers={"content-type": "application/json"})
        assert response.status_code == 422
        assert response.json()["code"] == "validation_error"


class TestWelcomeEmailIsStaged:
    def outbox(self, client: TestClient) -> list[dict[str, object]]:
        with client.app.state.engine.connect() as conn:  # type: ignore[attr-defined]
            return [json.loads(p) for (p,) in conn.execute(text("SELECT payload FROM outbox"))]

    def test_signup_commits_exactly_one_welcome_message(self, client: TestClient) -> None:
        user = signup(client)
        [message] = self.outbox(client)
        assert message["actor_name"] == "notifier.send_welcome"
        assert message["queue_name"] == "notifications"
        assert message["kwargs"]["message"]["user_id"] == user["id"]  # type: ignore[index]
        assert message["message_id"] == message["kwargs"]["message"]["email_id"]  # type: ignore[index]
        # It carries the recipient: the notifier needs no lookup back at auth.
        assert message["kwargs"]["message"]["recipient"] == {  # type: ignore[index]
            "email": user["email"],
            "first_name": user["first_name"],
            "last_name": user["last_name"],
        }

    def test_a_refused_signup_stages_nothing_more(self, client: TestClient) -> None:
        signup(client)
        client.post(
            "/signup", json={"first_name": "J", "last_name": "D", "email": "jane@example.com", "password": PASSWORD}
        )
        client.post(
            "/signup", json={"first_name": "", "last_name": "D", "email": "x@example.com", "password": PASSWORD}
        )
        assert len(self.outbox(client)) == 1
