"""The auth service, as the wallet service sees it: display names by user id."""

from __future__ import annotations

import logging

import httpx

from wallet.errors import AuthUnavailable, UnknownUser

log = logging.getLogger("wallet.users")


async def full_name(client: httpx.AsyncClient, user_id: int) -> str:
    """'First Last' of a user, from the auth service's internal batch lookup."""
    try:
        response = await client.get("/internal/users", params={"ids": user_id})
        response.raise_for_status()
        users = response.json()["users"]
    except (httpx.HTTPError, KeyError, ValueError) as exc:
        log.error("user lookup failed: %s", type(exc).__name__)
        raise AuthUnavailable() from exc
    match = next((u for u in users if u["id"] == user_id), None)
    if match is None:
        raise UnknownUser()
    return f"{match['first_name']} {match['last_name']}"
