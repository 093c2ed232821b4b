from __future__ import annotations

import time

import bcrypt
import jwt
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr, ValidationError

from auth.config import Settings
from auth.main import create_app
from svckit.settings import DEV_SERVICE_TOKEN, InsecureServiceToken

from .factories import SERVICE_TOKEN, bearer, login, signup, token_for


class TestLogin:
    def test_token_has_the_contract_shape_and_our_claims(self, client: TestClient) -> None:
        user = signup(client)
        response = login(client)
        assert response.status_code == 200
        body = response.json()
        assert set(body) == {"access_token", "token_type", "expires_in"}
        assert body["token_type"] == "bearer"
        assert body["expires_in"] == 900
        assert response.headers["cache-control"] == "no-store"
        header = jwt.get_unverified_header(body["access_token"])
        assert header["alg"] == "EdDSA"
        assert header["typ"] == "at+jwt"  # RFC 9068: what every verifier requires
        jwks = client.get("/.well-known/jwks.json").json()
        assert header["kid"] in {k["kid"] for k in jwks["keys"]}
        key = jwt.PyJWKSet.from_dict(jwks)[header["kid"]].key
        claims = jwt.decode(body["access_token"], key, algorithms=["EdDSA"], audience="wallet-platform")
        assert claims["sub"] == str(user["id"])
        assert claims["iss"] == "wallet-platform-auth"
        assert set(claims) >= {"iss", "aud", "sub", "iat", "exp", "jti"}
        assert claims["exp"] - claims["iat"] == 900

    def test_email_is_matched_case_insensitively(self, client: TestClient) -> None:
        signup(client, email="jane@example.com")
        assert login(client, email=" JANE@example.com").status_code == 200

    def test_missing_form_fields_are_422(self, client: TestClient) -> None:
        response = client.post("/token", data={"username": "jane@example.com"})
        assert response.status_code == 422
        assert [e["field"] for e in response.json()["errors"]] == ["password"]


class TestServiceTokenSetting:
    def test_auth_refuses_to_start_with_the_default_token(
        self, settings: Settings, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        values = {**settings.model_dump(), "service_token": DEV_SERVICE_TOKEN}
        with pytest.raises(InsecureServiceToken, match="SERVICE_TOKEN"):
            create_app(Settings(**values))
        monkeypatch.setenv("AUTH_ALLOW_DEV_SERVICE_TOKEN", "true")  # a service run by hand, locally
        values.pop("allow_dev_service_token")
        assert create_app(Settings(**values)) is not None


class TestTokenLifetimeSetting:
    def test_auth_refuses_a_token_lifetime_its_verifiers_would_refuse(self, settings: Settings) -> None:
        raw = {**settings.model_dump(), "service_token": SERVICE_TOKEN}  # a plain string, as read from env
        with pytest.raises(ValidationError, match="AUTH_ACCESS_TOKEN_TTL_S") as caught:
            Settings(**{**raw, "access_token_ttl_s": 7200, "jwt_max_lifetime_s": 3600})
        assert "input_value" not in str(caught.value)  # a refusal never prints the values read (secrets)
        assert Settings(**{**settings.model_dump(), "access_token_ttl_s": 3600}).access_token_ttl_s == 3600


class TestNoUserEnumeration:
    def test_unknown_email_and_wrong_password_answer_alike(self, client: TestClient) -> None:
        signup(client)
        wrong_password = login(client, password="wrong-password")
        unknown_email = login(client, email="nobody@example.com", password="wrong-password")
        for response in (wrong_password, unknown_email):
            assert response.status_code == 401
            assert response.headers["www-authenticate"] == "Bearer"
        assert wrong_password.json() == unknown_email.json()
        assert wrong_password.json()["code"] == "invalid_credentials"

    def test_both_failures_cost_exactly_one_bcrypt_check(
        self, client: TestClient, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        signup(client)
        calls: list[bytes] = []
        real = bcrypt.checkpw

        def counting(password: bytes, hashed: bytes) -> bool:
            calls.append(hashed[:7])
            return real(password, hashed)

        monkeypatch.setattr(bcrypt, "checkpw", counting)
        login(client, password="wrong-password")
        login(client, email="nobody@example.com", password="wrong-password")
        login(client, password="x" * 100)
        # Same count and the same cost prefix ($2b$04$) for a known and an unknown email.
        assert calls == [b"$2b$04$"] * 3


class TestLockout:
    def test_ten_failures_lock_the_account_with_retry_after(self, client: TestClient) -> None:
        signup(client)
        for _ in range(10):
            assert login(client, password="wrong-password").status_code == 401
        locked = login(client)  # even the right password
        assert locked.status_code == 429
        assert locked.json()["code"] == "account_locked"
        assert 890 <= int(locked.headers["retry-after"]) <= 900

    def test_other_accounts_are_unaffected(self, client: TestClient) -> None:
        signup(client, email="jane@example.com")
        signup(client, email="john@example.com")
        for _ in range(10):
            login(client, email="jane@example.com", password="wrong-password")
        assert login(client, email="john@example.com").status_code == 200

    def test_a_success_resets_the_count(self, client: TestClient) -> None:
        signup(client)
        for _ in range(9):
            login(client, password="wrong-password")
        assert login(client).status_code == 200
        for _ in range(9):
            login(client, password="wrong-password")
        assert login(client).status_code == 200

    def test_unknown_emails_lock_too_so_a_lock_reveals_nothing(self, client: TestClient) -> None:
        for _ in range(10):
            login(client, email="ghost@example.com", password="wrong-password")
        assert login(client, email="ghost@example.com", password="wrong-password").status_code == 429

    def test_lock_expires(self, client: TestClient) -> None:
        client.app.state.lockout.seconds = 1  # type: ignore[attr-defined]
        signup(client)
        for _ in range(10):
            login(client, password="wrong-password")
        assert login(client).status_code == 429
        time.sleep(1.1)
        assert login(client).status_code == 200


class TestProfile:
    def test_own_profile(self, client: TestClient) -> None:
        user = signup(client)
        response = client.get(f"/users/{user['id']}", headers=bearer(token_for(client)))
        assert response.status_code == 200
        assert response.json() == user

    def test_another_users_profile_is_404_like_a_missing_one(self, client: TestClient) -> None:
        jane = signup(client, email="jane@example.com")
        john = signup(client, email="john@example.com")
        token = token_for(client, email="jane@example.com")
        other = client.get(f"/users/{john['id']}", headers=bearer(token))
        missing = client.get(f"/users/{jane['id'] + 1000}", headers=bearer(token))
        assert other.status_code == missing.status_code == 404
        assert other.json() == missing.json()

    @pytest.mark.parametrize(
        "headers",
        [{}, {"Authorization": "Bearer"}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer not.a.jwt"}],
    )
    def test_missing_or_malformed_token_is_401_with_challenge(
        self, client: TestClient, headers: dict[str, str]
    ) -> None:
        user = signup(client)
        response = client.get(f"/users/{user['id']}", headers=headers)
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json()["code"] == "unauthorized"

    def test_non_integer_id_is_422(self, client: TestClient) -> None:
        signup(client)
        response = client.get("/users/abc", headers=bearer(token_for(client)))
        assert response.status_code == 422
        assert response.json()["errors"][0]["field"] == "user_id"


class TestInternalLookup:
    def test_needs_the_service_credential(self, client: TestClient) -> None:
        user = signup(client)
        assert client.get("/internal/users", params={"ids": user["id"]}).status_code == 403
        wrong = client.get("/internal/users", params={"ids": user["id"]}, headers={"X-Service-Token": "nope"})
        assert wrong.status_code == 403

    @pytest.mark.parametrize("presented", ["", " ", SERVICE_TOKEN[:-1], SERVICE_TOKEN + "x"])
    def test_an_empty_or_near_miss_credential_is_refused(self, client: TestClient, presented: str) -> None:
        user = signup(client)
        response = client.get("/internal/users", params={"ids": user["id"]}, headers={"X-Service-Token": presented})
        assert response.status_code == 403

    def test_an_empty_configured_token_accepts_nothing(self, client: TestClient) -> None:
        # Start-up refuses an empty token; if one slipped through, an empty header still fails.
        user = signup(client)
        state = client.app.state  # type: ignore[attr-defined]
        state.settings = state.settings.model_copy(update={"service_token": SecretStr("")})
        response = client.get("/internal/users", params={"ids": user["id"]}, headers={"X-Service-Token": ""})
        assert response.status_code == 403

    def test_looks_up_several_users_at_once(self, client: TestClient) -> None:
        jane = signup(client, email="jane@example.com")
        john = signup(client, email="john@example.com")
        response = client.get(
            "/internal/users",
            params=[("ids", jane["id"]), ("ids", john["id"]), ("ids", 99999)],
            headers={"X-Service-Token": SERVICE_TOKEN},
        )
        assert response.status_code == 200
        assert response.json() == {"users": [jane, john]}

    def test_is_not_in_the_public_api_document(self, client: TestClient) -> None:
        paths = client.get("/openapi.json").json()["paths"]
        assert set(paths) == {"/signup", "/token", "/users/{user_id}", "/.well-known/jwks.json"}
