"""Request and response bodies of the wallet API (never table models)."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field, StrictInt

from svckit.money import Amount, CurrencyCode, Id

_ISO_DATE_TIME = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}")


def _iso_text(value: object) -> object:
    """Only ISO 8601 text: pydantic alone would take a number as a Unix time."""
    if isinstance(value, str) and not _ISO_DATE_TIME.match(value):
        raise ValueError("expected an ISO 8601 date and time with an offset, like 2026-05-31T12:00:00Z")
    return value


# A query's instant: ISO 8601 with an explicit offset (the contract's timestamps).
Instant = Annotated[AwareDatetime, BeforeValidator(_iso_text)]


class WalletCreate(BaseModel):
    balance: StrictInt = Field(default=0, ge=0, le=10**12, description="Opening balance in minor units")
    currency: CurrencyCode


class WalletCreated(BaseModel):
    id: int
    user_id: int
    balance: int
    created_at: datetime
    currency: str


class WalletRead(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    id: int
    user_id: int
    balance: int
    created_at: datetime
    updated_at: datetime
    currency: str
    full_name: str = Field(alias="full name", serialization_alias="full name")


class Message(BaseModel):
    message: str


class MoneyIn(BaseModel):
    amount: Amount
    currency: CurrencyCode


class TransferIn(MoneyIn):
    to_account_id: Id = Field(description="The recipient's wallet id")


class MovementResult(BaseModel):
    wallet_id: int
    amount: int
    current_balance: int


class TransferResult(BaseModel):
    wallet_id: int
    recipient_wallet_id: int
    amount: int
    current_balance: int


class HistoryItem(BaseModel):
    id: int
    amount: int
    currency: str
    type: Literal["deposit", "withdrawal", "transfer"]
    date: datetime
    sender: str
    receiver: str


class History(BaseModel):
    transactions: list[HistoryItem]
    limit: int
    offset: int


class LedgerEntryRead(BaseModel):
    id: int
    transaction_id: int
    wallet_id: int
    entry_type: Literal["debit", "credit"]
    amount: int
    currency: str
    balance_snapshot: int
    created_at: datetime


# --- holds, refunds, balances (contract: Extensions) -----------------------------------

HoldStatus = Literal["active", "captured", "voided", "expired"]


class HoldIn(MoneyIn):
    to_account_id: Id | None = Field(default=None, description="The recipient's wallet id, now or at capture")
    expires_in_s: StrictInt = Field(default=86_400, ge=60, le=604_800, description="Seconds until the hold lapses")


class CaptureIn(BaseModel):
    amount: Amount | None = Field(default=None, description="Default: all of the hold")
    to_account_id: Id | None = Field(default=None, description="The recipient's wallet id, if the hold names none")


class HoldRead(BaseModel):
    id: int
    wallet_id: int
    recipient_wallet_id: int | None
    amount: int
    captured_amount: int
    currency: str
    status: HoldStatus
    transaction_id: int | None
    expires_at: datetime
    created_at: datetime


class HoldList(BaseModel):
    holds: list[HoldRead]


class RefundIn(BaseModel):
    amount: Amount | None = Field(default=None, description="Default: what is left to refund")


class RefundResult(BaseModel):
    refund_id: int
    transaction_id: int
    amount: int
    refunded_total: int
    current_balance: int


class TransactionRead(HistoryItem):
    refunded_total: int
    refund_of: int | None


class BalanceRead(BaseModel):
    wallet_id: int
    currency: str
    balance: int
    held: int | None
    available: int | None
    at: datetime


class StatementLine(BaseModel):
    transaction_id: int
    date: datetime
    type: Literal["deposit", "withdrawal", "transfer"]
    counterparty: str
    amount: int = Field(description="Signed minor units: credits positive, debits negative")
    balance: int = Field(description="The wallet's balance right after this line")


class Statement(BaseModel):
    wallet_id: int
    currency: str
    from_: datetime = Field(alias="from", serialization_alias="from")
    to: datetime
    opening_balance: int
    closing_balance: int
    lines: list[StatementLine]

    model_config = ConfigDict(populate_by_name=True)
