"""Delivering an email: Brevo's transactional API, or a local folder when no key is set."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx

from notifier.metrics import BREVO_CALLS

log = logging.getLogger("notifier.brevo")


@dataclass(frozen=True)
class Email:
    email_id: str  # Brevo's idempotencyKey: the same email is never sent twice
    to_email: str
    to_name: str
    subject: str
    html: str
    text: str
    tags: list[str] = field(default_factory=list)

    def brevo_body(self, sender_email: str, sender_name: str) -> dict[str, Any]:
        return {
            "sender": {"name": sender_name, "email": sender_email},
            "to": [{"email": self.to_email, "name": self.to_name}],
            "subject": self.subject,
            "htmlContent": self.html,
            "textContent": self.text,
            "tags": self.tags,
            "headers": {"idempotencyKey": self.email_id},
        }


class TransientError(Exception):
    """Worth retrying: a timeout, a 5xx, or a 429 (with Brevo's reset delay if it gave one)."""

    def __init__(self, reason: str, *, retry_after_ms: int | None = None) -> None:
        super().__init__(reason)
        self.retry_after_ms = retry_after_ms


class PermanentError(Exception):
    """A 4xx other than 429: retrying cannot help; the message goes to the dead-letter queue."""


class Transport(Protocol):
    def send(self, email: Email) -> str: ...


class BrevoTransport:
    def __init__(self, *, base_url: str, api_key: str, sender_email: str, sender_name: str, timeout_s: float) -> None:
        self.client = httpx.Client(
            base_url=base_url,
            headers={"api-key": api_key, "accept": "application/json", "content-type": "application/json"},
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 3.0)),
        )
        self.sender_email = sender_email
        self.sender_name = sender_name

    def send(self, email: Email) -> str:
        """Returns Brevo's messageId (or "duplicate" when Brevo already has this email)."""
        body = email.brevo_body(self.sender_email, self.sender_name)
        try:
            response = self.client.post("/v3/smtp/email", json=body)
        except httpx.TimeoutException as exc:
            BREVO_CALLS.labels("timeout").inc()
            raise TransientError("Brevo timed out") from exc
        except httpx.TransportError as exc:
            BREVO_CALLS.labels("unreachable").inc()
            raise TransientError(f"Brevo unreachable: {type(exc).__name__}") from exc
        BREVO_CALLS.labels(str(response.status_code)).inc()
        if response.status_code in (201, 202):
            return str(response.json().get("messageId") or response.json().get("batchId") or "")
        code = _error_code(response)
        if response.status_code == 400 and code == "duplicate_parameter":
            # The idempotencyKey was seen: an earlier attempt got through. That is success.
            log.info("Brevo already has email %s", email.email_id)
            return "duplicate"
        if response.status_code == 429:
            reset = response.headers.get("x-sib-ratelimit-reset")
            delay = int(float(reset) * 1000) if reset and reset.replace(".", "", 1).isdigit() else None
            raise TransientError("Brevo rate limit", retry_after_ms=delay)
        if response.status_code >= 500:
            raise TransientError(f"Brevo answered {response.status_code}")
        raise PermanentError(f"Brevo refused the email: {response.status_code} {code}")


def _error_code(response: httpx.Response) -> str:
    try:
        return str(response.json().get("code", ""))
    except ValueError:
        return ""


class FolderTransport:
    """The local default: one JSON file per email, named by its id, holding what Brevo would get."""

    def __init__(self, folder: str, *, sender_email: str, sender_name: str) -> None:
        self.folder = Path(folder)
        self.sender_email = sender_email
        self.sender_name = sender_name

    def send(self, email: Email) -> str:
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.folder / f"{email.email_id}.json"
        body = json.dumps(email.brevo_body(self.sender_email, self.sender_name), indent=2, ensure_ascii=False)
        # Write-then-rename: a reader never sees half a file, and a repeat just rewrites it.
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp-")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(body)
        os.replace(tmp, target)
        return str(target)
