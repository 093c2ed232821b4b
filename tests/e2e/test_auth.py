"""The auth contract through the gateway, exactly as a client sees it."""

from __future__ import annotations

import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx

from .client import PASSWORD, login, new_user, signup, unique_email


class TestSignupLoginProfile:
    def test_the_contract_flow(self, api: httpx.Client) -> None:
        email = unique_email("jane")
        profile = signup(api, email=email.upper())
        assert profile == {"id": profile["id"], "first_name": "Jane", "last_name": "Doe", "email": email}
        token = login(api, email)
        assert token.status_code == 200
        assert set(token.json()) == {"access_token", "token_type", "expires_in"}
        me = api.get(f"/users/{profile['id']}", headers={"Authorization": f"Bearer {token.json()['access_token']}"})
        assert me.status_code == 200
        assert me.json() == profile

    def test_duplicate_email_is_409(self, api: httpx.Client) -> None:
        email = unique_email()
        signup(api, email=email)
        again = api.post("/signup", json={"first_name": "A", "last_name": "B", "email": email, "password": PASSWORD})
        assert again.status_code == 409
        assert again.json()["code"] == "email_taken"

    def test_73_byte_password_is_refused(self, api: httpx.Client) -> None:
        body = {"first_name": "A", "last_name": "B", "email": unique_email(), "password": "p" * 73}
        response = api.post("/signup", json=body)
        assert response.status_code == 422
        assert response.json()["errors"][0]["field"] == "password"
        assert login(api, body["email"], "p" * 73).status_code == 401  # nothing was created

    def test_other_profiles_are_404(self, api: httpx.Client) -> None:
        jane, john = new_user(api), new_user(api)
        assert api.get(f"/users/{john.id}", headers=jane.headers).status_code == 404

    def test_lockout_is_429_with_retry_after(self, api: httpx.Client) -> None:
        user = new_user(api)
        for _ in range(10):
            assert login(api, user.email, "wrong-password").status_code == 401
        locked = login(api, user.email)
        assert locked.status_code == 429
        assert locked.json()["code"] == "account_locked"
        assert int(locked.headers["retry-after"]) > 0

    def test_thirty_parallel_guesses_get_at_most_ten_checks(self, api: httpx.Client, gateway_url: str) -> None:
        user = new_user(api)
        # From a loopback address of its own: a fresh per-IP bucket (burst 40) lets all 30 in,
        # so every refusal below is the lockout's, not the gateway's.
        source = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(2, 254)}"
        transport = httpx.HTTPTransport(local_address=source)
        with (
            httpx.Client(base_url=gateway_url, timeout=30, transport=transport) as burst,
            ThreadPoolExecutor(30) as pool,
        ):
            responses = list(pool.map(lambda _: login(burst, user.email, "wrong-password"), range(30)))
        assert Counter(r.status_code for r in responses) == {401: 10, 429: 20}
        assert {r.json()["code"] for r in responses if r.status_code == 429} == {"account_locked"}
        locked = login(api, user.email)
        assert locked.status_code == 429
        assert int(locked.headers["retry-after"]) > 60

    def test_unknown_email_and_wrong_password_look_the_same(self, api: httpx.Client) -> None:
        user = new_user(api)
        a = login(api, user.email, "wrong-password")
        b = login(api, unique_email(), "wrong-password")
        assert (a.status_code, a.json(), a.headers["www-authenticate"]) == (
            b.status_code,
            b.json(),
            b.headers["www-authenticate"],
        )

    def test_tampered_token_is_401(self, api: httpx.Client) -> None:
        user = new_user(api)
        head, payload, sig = user.token.split(".")
        forged = f"{head}.{payload}.{sig[:-4]}AAAA"
        response = api.get(f"/users/{user.id}", headers={"Authorization": f"Bearer {forged}"})
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
