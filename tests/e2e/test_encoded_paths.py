"""An encoded reserved character in a path is refused by the gateway (400) before any
router or service sees it: a router matches the still-encoded path while the services
decode it, so `/holds/1%2Fcapture` would reach the capture through a router without the
money limiter."""

from __future__ import annotations

import uuid

import httpx
import pytest

from .client import balance, new_user, open_wallet


@pytest.mark.parametrize("encoded", ["%2F", "%2f", "%5C", "%3B", "%25", "%3F", "%23", "%00"])
def test_an_encoded_reserved_character_is_400_and_moves_nothing(api: httpx.Client, encoded: str) -> None:
    payer, shop = new_user(api), new_user(api)
    open_wallet(api, payer, balance=500)
    to = open_wallet(api, shop)["id"]
    headers = {**payer.headers, "Idempotency-Key": uuid.uuid4().hex}
    hold = api.post("/holds", json={"amount": 200, "currency": "USD", "to_account_id": to}, headers=headers).json()
    for path in (f"/holds/{hold['id']}{encoded}capture", f"/holds/{hold['id']}{encoded}void"):
        headers = {**payer.headers, "Idempotency-Key": uuid.uuid4().hex}
        response = api.post(path, json={}, headers=headers)
        assert response.status_code == 400, (path, response.status_code, response.text)
    assert api.get(f"/holds/{hold['id']}", headers=payer.headers).json()["status"] == "active"
    assert (balance(api, payer), balance(api, shop)) == (500, 0)
