from __future__ import annotations

from datetime import UTC, datetime

import pytest

from notifier import emails
from svckit.messages import Receipt
from svckit.money import format_amount


def receipt(**changes: object) -> Receipt:
    fields: dict[str, object] = {
        "email_id": "r1",
        "user_id": 1,
        "transaction_id": 9,
        "kind": "transfer_sent",
        "amount": 123456,
        "currency": "USD",
        "balance_after": 50,
        "counterparty": "John Smith",
        "occurred_at": datetime(2026, 5, 31, 12, 5, tzinfo=UTC),
    }
    return Receipt.model_validate({**fields, **changes})


@pytest.mark.parametrize(
    ("amount", "currency", "text"),
    [
        (200, "USD", "2.00 USD"),
        (5, "EUR", "0.05 EUR"),
        (123456789, "USD", "1,234,567.89 USD"),
        (1500, "JPY", "1,500 JPY"),
        (1234, "KWD", "1.234 KWD"),
        (-250, "USD", "-2.50 USD"),
        (0, "GBP", "0.00 GBP"),
    ],
)
def test_amounts_are_formatted_from_minor_units(amount: int, currency: str, text: str) -> None:
    assert format_amount(amount, currency) == text


class TestReceipts:
    @pytest.mark.parametrize(
        ("kind", "subject"),
        [
            ("deposit", "You received a deposit of 1,234.56 USD"),
            ("withdrawal", "You withdrew 1,234.56 USD"),
            ("transfer_sent", "You sent 1,234.56 USD"),
            ("transfer_received", "You received 1,234.56 USD"),
        ],
    )
    def test_subject_per_kind(self, kind: str, subject: str) -> None:
        email = emails.receipt(receipt(kind=kind), to_email="j@example.com", first_name="Jane", last_name="Doe")
        assert email.subject == subject
        assert "Balance after: 0.50 USD" in email.text
        assert email.email_id == "r1"

    @pytest.mark.parametrize("kind", ["transfer_sent", "transfer_received"])
    def test_the_counterparty_is_named_in_the_body_never_the_subject(self, kind: str) -> None:
        name = "Eve\u202e\r\nBcc: x@evil.example <b>"
        email = emails.receipt(
            receipt(kind=kind, counterparty=name), to_email="j@example.com", first_name="Jane", last_name="Doe"
        )
        assert email.subject == ("You sent 1,234.56 USD" if kind == "transfer_sent" else "You received 1,234.56 USD")
        assert name in email.text
        assert "Eve\u202e\r\nBcc: x@evil.example &lt;b&gt;" in email.html

    def test_the_welcome_subject_names_no_one(self) -> None:
        email = emails.welcome(email_id="w1", to_email="j@example.com", first_name="Eve\u202e", last_name="\r\nX")
        assert email.subject == "Welcome to Wallet"

    def test_names_are_escaped_in_html(self) -> None:
        email = emails.receipt(
            receipt(counterparty="<script>x</script>"),
            to_email="j@example.com",
            first_name="<b>Jane</b>",
            last_name="Doe",
        )
        assert "<script>" not in email.html
        assert "&lt;script&gt;" in email.html
        assert "<b>Jane" not in email.html

    @pytest.mark.parametrize("at", [datetime(2026, 5, 31, 12, 5, tzinfo=UTC), datetime(999, 1, 2, 3, 4, tzinfo=UTC)])
    def test_the_date_is_written_as_strftime_writes_it(self, at: datetime) -> None:
        email = emails.receipt(receipt(occurred_at=at), to_email="j@example.com", first_name="Jane", last_name="Doe")
        when = at.strftime("%Y-%m-%d %H:%M UTC")
        assert f"Date: {when}\n" in email.text
        assert f"<td>Date</td><td>{when}</td>" in email.html
