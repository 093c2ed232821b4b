"""Request and response bodies of the wallet API (never table models)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from svckit.money import Amount, CurrencyCode, Id


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
