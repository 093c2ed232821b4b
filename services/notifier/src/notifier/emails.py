"""What the emails say: subjects, HTML and text, amounts formatted from minor units."""

from __future__ import annotations

from html import escape

from notifier.brevo import Email
from svckit.messages import Receipt
from svckit.money import format_amount

# Subjects carry no user-chosen text (a counterparty's name could hold bidi overrides or
# line breaks, and a subject is a header every mail client shows unescaped); the body names
# the counterparty, escaped in the HTML part.
_RECEIPT_SUBJECTS = {
    "deposit": "You received a deposit of {amount}",
    "withdrawal": "You withdrew {amount}",
    "transfer_sent": "You sent {amount}",
    "transfer_received": "You received {amount}",
}
_RECEIPT_SENTENCES = {
    "deposit": "You received a deposit of {amount}",
    "withdrawal": "You withdrew {amount}",
    "transfer_sent": "You sent {amount} to {counterparty}",
    "transfer_received": "{counterparty} sent you {amount}",
}


def welcome(*, email_id: str, to_email: str, first_name: str, last_name: str) -> Email:
    text = f"Hi {first_name},\n\nWelcome to Wallet. Your account is ready.\n"
    html = f"<p>Hi {escape(first_name)},</p><p>Welcome to Wallet. Your account is ready.</p>"
    return Email(
        email_id=email_id,
        to_email=to_email,
        to_name=f"{first_name} {last_name}",
        subject="Welcome to Wallet",
        html=html,
        text=text,
        tags=["welcome"],
    )


def receipt(message: Receipt, *, to_email: str, first_name: str, last_name: str) -> Email:
    amount = format_amount(message.amount, message.currency)
    balance = format_amount(message.balance_after, message.currency)
    subject = _RECEIPT_SUBJECTS[message.kind].format(amount=amount)
    sentence = _RECEIPT_SENTENCES[message.kind].format(amount=amount, counterparty=message.counterparty)
    at = message.occurred_at  # as strftime("%Y-%m-%d %H:%M UTC") writes it, at less than half its CPU
    when = f"{at.year}-{at.month:02d}-{at.day:02d} {at.hour:02d}:{at.minute:02d} UTC"
    lines = [
        f"Hi {first_name},",
        "",
        f"{sentence}.",
        f"Transaction: {message.transaction_id}",
        f"Date: {when}",
        f"Balance after: {balance}",
    ]
    html = (
        f"<p>Hi {escape(first_name)},</p><p>{escape(sentence)}.</p>"
        f"<table><tr><td>Transaction</td><td>{message.transaction_id}</td></tr>"
        f"<tr><td>Date</td><td>{when}</td></tr>"  # digits and separators only: nothing to escape
        f"<tr><td>Balance after</td><td>{escape(balance)}</td></tr></table>"
    )
    return Email(
        email_id=message.email_id,
        to_email=to_email,
        to_name=f"{first_name} {last_name}",
        subject=subject,
        html=html,
        text="\n".join(lines) + "\n",
        tags=["receipt", message.kind],
    )
