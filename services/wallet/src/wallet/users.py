"""The auth service, as the wallet service sees it: display names and addresses by user id."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import httpx

from svckit.messages import Recipient
from wallet.errors import AuthUnavailable, UnknownUser

log = logging.getLogger("wallet.users")


@dataclass(frozen=True)
class Owner:
    """A wallet's owner as the wallet keeps it: the display name, and whom receipts go to."""

    name: str  # 'First Last'
    recipient: Recipient


async def owner(client: httpx.AsyncClient, user_id: int) -> Owner:
    """A user's name and address, from the auth service's internal batch lookup."""
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
    try:
        recipient = Recipient(email=match["email"], first_name=match["first_name"], last_name=match["last_name"])
    except (KeyError, ValueError) as exc:
        log.error("user lookup answered an unexpected shape: %s", type(exc).__name__)
        raise AuthUnavailable() from exc
    return Owner(name=f"{recipient.first_name} {recipient.last_name}", recipient=recipient)
