"""The Brevo client against the stand-in: what is success, what is retried, what is not."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from notifier.brevo import BrevoTransport, Email, FolderTransport, PermanentError, TransientError

from .conftest import API_KEY


def email(email_id: str = "e1") -> Email:
    return Email(
        email_id=email_id,
        to_email="jane@example.com",
        to_name="Jane Doe",
        subject="Hi",
        html="<p>Hi</p>",
        text="Hi",
        tags=["welcome"],
    )


def transport(url: str, *, key: str = API_KEY, timeout_s: float = 5) -> BrevoTransport:
    return BrevoTransport(
        base_url=url, api_key=key, sender_email="no-reply@wallet.example", sender_name="Wallet", timeout_s=timeout_s
    )


class TestBrevoTransport:
    def test_sends_the_documented_body_with_the_id_as_idempotency_key(self, brevo_url: str, stub: httpx.Client) -> None:
        assert transport(brevo_url).send(email("abc")).endswith("@stub.brevo>")
        [body] = stub.get("/_stub/emails").json()["emails"]
        assert body["headers"] == {"idempotencyKey": "abc"}
        assert body["sender"] == {"name": "Wallet", "email": "no-reply@wallet.example"}
        assert body["to"] == [{"email": "jane@example.com", "name": "Jane Doe"}]
        assert (body["subject"], body["htmlContent"], body["textContent"]) == ("Hi", "<p>Hi</p>", "Hi")

    def test_a_repeated_key_is_success_without_a_second_email(self, brevo_url: str, stub: httpx.Client) -> None:
        client = transport(brevo_url)
        client.send(email("same"))
        assert client.send(email("same")) == "duplicate"
        assert len(stub.get("/_stub/emails").json()["emails"]) == 1

    @pytest.mark.parametrize("mode", ["500", "429"])
    def test_5xx_and_429_are_transient(self, brevo_url: str, stub: httpx.Client, mode: str) -> None:
        stub.post("/_stub/fail", json={"mode": mode, "count": 1, "reset": 7})
        with pytest.raises(TransientError) as info:
            transport(brevo_url).send(email())
        assert info.value.retry_after_ms == (7000 if mode == "429" else None)  # Brevo's reset header
        assert transport(brevo_url).send(email())  # and the next call goes through

    def test_a_timeout_is_transient(self, brevo_url: str, stub: httpx.Client) -> None:
        stub.post("/_stub/fail", json={"mode": "slow", "count": 1, "delay_s": 2})
        with pytest.raises(TransientError, match="timed out"):
            transport(brevo_url, timeout_s=0.5).send(email())

    def test_other_4xx_are_permanent(self, brevo_url: str, stub: httpx.Client) -> None:
        stub.post("/_stub/fail", json={"mode": "400", "count": 1})
        with pytest.raises(PermanentError):
            transport(brevo_url).send(email())
        with pytest.raises(PermanentError, match="401"):
            transport(brevo_url, key="wrong-key").send(email())

    def test_unreachable_is_transient(self) -> None:
        with pytest.raises(TransientError):
            transport("http://127.0.0.1:9").send(email())


class TestFolderTransport:
    def test_one_file_per_email_named_by_its_id(self, tmp_path: Path) -> None:
        folder = FolderTransport(str(tmp_path), sender_email="no-reply@wallet.example", sender_name="Wallet")
        folder.send(email("id-1"))
        folder.send(email("id-1"))  # a redelivery rewrites the same file
        folder.send(email("id-2"))
        assert sorted(p.name for p in tmp_path.iterdir()) == ["id-1.json", "id-2.json"]
        body = json.loads((tmp_path / "id-1.json").read_text())
        assert body["headers"]["idempotencyKey"] == "id-1"
