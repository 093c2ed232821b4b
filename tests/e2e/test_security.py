"""Attacks on authentication and authorization, through the gateway."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from .client import PASSWORD, User, balance, move, new_user, open_wallet
from .conftest import Stack

ISS, AUD = "wallet-platform-auth", "wallet-platform"


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def claims(user_id: int, **changes: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {
        "iss": ISS,
        "aud": AUD,
        "sub": str(user_id),
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        "jti": uuid.uuid4().hex,
    }
    return {**base, **changes}


@pytest.fixture(scope="module")
def victim(gateway_url: str) -> User:
    with httpx.Client(base_url=gateway_url, timeout=10) as api:
        user = new_user(api)
        open_wallet(api, user, balance=100)
        return user


@pytest.fixture(scope="module")
def signing_key(stack: Stack) -> tuple[str, Any]:
    """The stack's real signing key, to forge tokens that differ only in one claim."""
    if stack.process is None:
        pytest.skip("needs the stack this suite starts (reads its signing key)")
    pem = sorted((stack.var / "keys").glob("*.pem"))[-1]
    return pem.stem, load_pem_private_key(pem.read_bytes(), password=None)


class TestTokenMatrix:
    def forged_tokens(self, api: httpx.Client, user: User, kid: str, key: Any) -> dict[str, str]:
        jwk = api.get("/.well-known/jwks.json").json()["keys"][0]
        header = {"alg": "HS256", "typ": "JWT", "kid": kid}
        signing_input = f"{b64(header)}.{b64(claims(user.id))}".encode()
        hs = base64.urlsafe_b64encode(hmac.new(jwk["x"].encode(), signing_input, hashlib.sha256).digest())
        head, _, sig = user.token.split(".")

        def signed(typ: str = "at+jwt", **changes: Any) -> str:
            return jwt.encode(claims(user.id, **changes), key, algorithm="EdDSA", headers={"kid": kid, "typ": typ})

        now = int(time.time())
        return {
            "alg none": jwt.encode(claims(user.id), None, algorithm="none", headers={"kid": kid, "typ": "at+jwt"}),
            "hmac with the public key": f"{signing_input.decode()}.{hs.rstrip(b'=').decode()}",
            "wrong kid": jwt.encode(
                claims(user.id), key, algorithm="EdDSA", headers={"kid": "no-such-kid", "typ": "at+jwt"}
            ),
            "kid pointing elsewhere": jwt.encode(
                claims(user.id),
                key,
                algorithm="EdDSA",
                headers={"kid": "http://127.0.0.1:9/jwks.json", "typ": "at+jwt"},
            ),
            # An attacker's key, announced in `jku`: we never fetch keys from a token.
            "jku pointing elsewhere": jwt.encode(
                claims(user.id),
                load_pem_private_key(_other_key_pem(), password=None),
                algorithm="EdDSA",
                headers={"kid": kid, "typ": "at+jwt", "jku": "http://127.0.0.1:9/jwks.json"},
            ),
            "expired": signed(exp=int(time.time()) - 60, iat=int(time.time()) - 700),
            "not yet valid": signed(nbf=int(time.time()) + 600),
            "wrong issuer": signed(iss="someone-else"),
            "wrong audience": signed(aud="another-platform"),
            "not typed as an access token": signed(typ="JWT"),
            "lives a year": signed(iat=now, exp=now + 365 * 86400),
            "issued in the future": signed(iat=now + 600, nbf=now, exp=now + 900),
            "sub with spaces": signed(sub=f" {user.id} "),
            "sub with a leading zero": signed(sub=f"0{user.id}"),
            "tampered payload": f"{head}.{b64(claims(user.id + 1))}.{sig}",
            "truncated": user.token[:-8],
            "signed by another key": jwt.encode(
                claims(user.id),
                load_pem_private_key(_other_key_pem(), password=None),
                algorithm="EdDSA",
                headers={"kid": kid, "typ": "at+jwt"},
            ),
        }

    def test_every_forgery_is_401_on_reads_and_money_moves(
        self, api: httpx.Client, victim: User, signing_key: tuple[str, Any]
    ) -> None:
        kid, key = signing_key
        valid = jwt.encode(claims(victim.id), key, algorithm="EdDSA", headers={"kid": kid, "typ": "at+jwt"})
        assert api.get("/wallet", headers={"Authorization": f"Bearer {valid}"}).status_code == 200  # control
        for name, token in self.forged_tokens(api, victim, kid, key).items():
            headers = {"Authorization": f"Bearer {token}"}
            read = api.get("/wallet", headers=headers)
            deposit = api.patch(
                "/transaction/deposit",
                json={"amount": 1, "currency": "USD"},
                headers={**headers, "Idempotency-Key": uuid.uuid4().hex},
            )
            for response in (read, deposit):
                assert response.status_code == 401, f"{name}: {response.status_code}"
                assert response.headers["www-authenticate"] == "Bearer", name
        assert balance(api, victim) == 100


def _other_key_pem() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class TestAuthorizationMatrix:
    def test_another_users_wallet_transactions_and_ledger_are_out_of_reach(self, api: httpx.Client) -> None:
        alice, mallory = new_user(api), new_user(api)
        alice_wallet = open_wallet(api, alice, balance=500)
        open_wallet(api, mallory, balance=1)
        move(api, alice, "deposit", amount=5)
        [txn, *_] = api.get("/transaction/history", headers=alice.headers).json()["transactions"]
        assert api.get(f"/transaction/{txn['id']}/ledger", headers=mallory.headers).status_code == 404
        assert api.get(f"/users/{alice.id}", headers=mallory.headers).status_code == 404
        mine = api.get("/transaction/history", headers=mallory.headers, params={"limit": 100}).json()
        assert txn["id"] not in {t["id"] for t in mine["transactions"]}
        assert api.get("/wallet", headers=mallory.headers).json()["id"] != alice_wallet["id"]
        assert balance(api, alice) == 505

    def test_mass_assignment_has_no_effect(self, api: httpx.Client) -> None:
        alice, mallory = new_user(api), new_user(api)
        alice_wallet = open_wallet(api, alice, balance=500)
        created = api.post(
            "/wallet",
            headers=mallory.headers,
            json={"currency": "USD", "user_id": alice.id, "id": alice_wallet["id"], "balance": 0},
        )
        assert created.status_code == 201
        assert created.json()["user_id"] == mallory.id
        assert created.json()["id"] != alice_wallet["id"]
        sneaky = move(api, mallory, "deposit", amount=5, wallet_id=alice_wallet["id"], user_id=alice.id, balance=10**9)
        assert sneaky.json()["wallet_id"] == created.json()["id"]
        assert (balance(api, alice), balance(api, mallory)) == (500, 5)
        signup = api.post(
            "/signup",
            json={
                "first_name": "M",
                "last_name": "X",
                "email": f"m-{uuid.uuid4().hex}@ex.com",
                "password": PASSWORD,
                "id": alice.id,
            },
        )
        assert signup.json()["id"] != alice.id


def test_logs_hold_no_password_token_hash_or_key(api: httpx.Client, stack: Stack) -> None:
    if stack.process is None:
        pytest.skip("needs the stack this suite starts (reads its logs)")
    password = f"Sekr3t-{uuid.uuid4().hex[:10]}"
    email = f"logs-{uuid.uuid4().hex[:8]}@example.com"
    api.post("/signup", json={"first_name": "L", "last_name": "G", "email": email, "password": password})
    token = api.post("/token", data={"username": email, "password": password}).json()["access_token"]
    api.post("/token", data={"username": email, "password": password + "-wrong"})
    headers = {"Authorization": f"Bearer {token}"}
    api.post("/wallet", json={"currency": "USD", "balance": 10}, headers=headers)
    api.get("/wallet", headers={"Authorization": f"Bearer {token[:-3]}xyz"})  # a refused token too
    time.sleep(2)  # let the relay, the workers and the log writers catch up
    service_token = (stack.var / "secrets" / "service_token").read_text().strip()
    secrets = {
        "password": password,
        "token": token,
        "token signature": token.rsplit(".", 1)[1],
        "service token": service_token,
        "brevo key": "e2e-brevo-key",
        "bcrypt hash": "$2b$",
    }
    logs = [p for p in (stack.var / "logs").iterdir() if p.is_file()]
    assert len(logs) >= 8
    for path in logs:
        text = Path(path).read_text(errors="replace")
        for name, secret in secrets.items():
            assert secret not in text, f"{name} found in {path.name}"
