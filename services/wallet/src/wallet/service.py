"""Use cases of the wallet service. Each opens and commits its own transaction before the
response is built, so a failed commit can never follow a 200."""

from __future__ import annotations

import logging
from collections.abc import Callable

from pydantic import BaseModel
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from svckit.db import READ_ONLY
from wallet import repository
from wallet.domain import (
    EXTERNAL_DESTINATION,
    EXTERNAL_SOURCE,
    Booking,
    LockedWallet,
    Party,
    SystemWallets,
    book,
)
from wallet.errors import (
    CurrencyMismatch,
    InsufficientFunds,
    RecipientNotFound,
    SelfTransfer,
    TransactionNotFound,
    UnsupportedCurrency,
    WalletExists,
    WalletNotEmpty,
    WalletNotFound,
)
from wallet.idempotency import Operation
from wallet.models import OPEN, USER, Wallet
from wallet.schemas import (
    History,
    HistoryItem,
    LedgerEntryRead,
    Message,
    MovementResult,
    TransferResult,
    WalletCreated,
    WalletRead,
)

log = logging.getLogger("wallet.service")


def check_currency(currency: str, allowed: frozenset[str]) -> None:
    if currency not in allowed:
        raise UnsupportedCurrency(f"{currency} is not a supported currency ({', '.join(sorted(allowed))}).")


def ensure_system_wallets(session: Session, currencies: frozenset[str], *, shards: int) -> SystemWallets:
    """Create whichever system wallets are missing (race-safe: replicas start together)."""
    wanted = sorted((currency, shard) for currency in currencies for shard in range(shards))
    for _ in range(3):
        with session.begin():
            session.connection(execution_options=READ_ONLY)
            existing = repository.system_wallet_ids(session)
        missing = [pair for pair in wanted if pair not in existing]
        if not missing:
            return SystemWallets({c: [existing[(c, shard)] for shard in range(shards)] for c in currencies})
        try:
            with session.begin():
                for currency, shard in missing:
                    repository.add_system_wallet(session, currency, shard)
        except IntegrityError:
            continue  # another replica created them meanwhile
    raise RuntimeError("could not create the system wallets")


# --- wallets -------------------------------------------------------------------------


def create_wallet(
    session: Session,
    *,
    user_id: int,
    currency: str,
    balance: int,
    full_name: Callable[[], str],
    system_wallet_id: int,
) -> WalletCreated:
    with session.begin():
        if repository.open_wallet_of(session, user_id) is not None:
            raise WalletExists()
    name = full_name()  # over HTTP to the auth service: outside any database transaction
    try:
        with session.begin():
            wallet = repository.add_wallet(
                session, Wallet(user_id=user_id, currency=currency, balance=0, owner_name=name)
            )
            if wallet.id is None:  # the flush assigns it
                raise RuntimeError("wallet id not assigned")
            if balance:
                # The opening balance is an ordinary deposit: in the history and the ledger.
                locked = repository.lock_for_movement(session, user_id=user_id, other_id=system_wallet_id)
                booking = book(
                    kind="deposit",
                    source=Party.external(system_wallet_id, EXTERNAL_SOURCE),
                    destination=Party(wallet.id, user_id, name),
                    amount=balance,
                    currency=currency,
                    locked=locked,
                    user_id=user_id,
                )
                repository.write_booking(session, booking)
            session.refresh(wallet)
    except IntegrityError as exc:  # a concurrent create won the one-open-wallet race
        raise WalletExists() from exc
    return WalletCreated(
        id=wallet.id, user_id=user_id, balance=wallet.balance, created_at=wallet.created_at, currency=wallet.currency
    )


def get_wallet(session: Session, *, user_id: int) -> WalletRead:
    with session.begin():
        wallet = repository.open_wallet_of(session, user_id)
        if wallet is None or wallet.id is None:
            raise WalletNotFound()
        return WalletRead(
            id=wallet.id,
            user_id=user_id,
            balance=wallet.balance,
            created_at=wallet.created_at,
            updated_at=wallet.updated_at,
            currency=wallet.currency,
            full_name=wallet.owner_name,
        )


def close_wallet(session: Session, *, user_id: int) -> Message:
    with session.begin():
        wallet = repository.open_wallet_of(session, user_id, lock=True)
        if wallet is None:
            raise WalletNotFound()
        if wallet.balance != 0:
            raise WalletNotEmpty()
        repository.close_wallet(session, wallet)
        name = wallet.owner_name
    return Message(message=f"wallet belonging to {name} deleted successfully")


# --- money movement --------------------------------------------------------------------


def _own_wallet(locked: dict[int, LockedWallet], user_id: int, currency: str) -> LockedWallet:
    own = next((w for w in locked.values() if w.user_id == user_id and w.status == OPEN), None)
    if own is None:
        raise WalletNotFound()
    if own.currency != currency:
        raise CurrencyMismatch(f"Your wallet holds {own.currency}, not {currency}.")
    return own


def _external_op(*, kind: str, user_id: int, amount: int, currency: str, system_wallet_id: int) -> Operation:
    """A deposit (from the outside world) or a withdrawal (to it): the currency's system
    wallet is the other side."""
    deposit = kind == "deposit"

    def run(session: Session) -> tuple[BaseModel, Booking]:
        locked = repository.lock_for_movement(session, user_id=user_id, other_id=system_wallet_id)
        own = _own_wallet(locked.wallets, user_id, currency)
        if not deposit and own.balance < amount:
            raise InsufficientFunds()
        outside = Party.external(system_wallet_id, EXTERNAL_SOURCE if deposit else EXTERNAL_DESTINATION)
        booking = book(
            kind=kind,
            source=outside if deposit else Party.of(own),
            destination=Party.of(own) if deposit else outside,
            amount=amount,
            currency=currency,
            locked=locked,
            user_id=user_id,
        )
        result = MovementResult(wallet_id=own.id, amount=amount, current_balance=booking.snapshots[own.id])
        return result, booking

    return run


def deposit_op(*, user_id: int, amount: int, currency: str, system_wallet_id: int) -> Operation:
    return _external_op(
        kind="deposit", user_id=user_id, amount=amount, currency=currency, system_wallet_id=system_wallet_id
    )


def withdraw_op(*, user_id: int, amount: int, currency: str, system_wallet_id: int) -> Operation:
    return _external_op(
        kind="withdrawal", user_id=user_id, amount=amount, currency=currency, system_wallet_id=system_wallet_id
    )


def transfer_op(*, user_id: int, to_wallet_id: int, amount: int, currency: str) -> Operation:
    def run(session: Session) -> tuple[BaseModel, Booking]:
        locked = repository.lock_for_movement(session, user_id=user_id, other_id=to_wallet_id)
        own = _own_wallet(locked.wallets, user_id, currency)
        if to_wallet_id == own.id:
            raise SelfTransfer()
        recipient = locked.wallets.get(to_wallet_id)
        if recipient is None or recipient.kind != USER or recipient.status != OPEN:
            raise RecipientNotFound()
        if recipient.currency != currency:
            raise CurrencyMismatch(f"The recipient wallet holds {recipient.currency}, not {currency}.")
        if own.balance < amount:
            raise InsufficientFunds()
        booking = book(
            kind="transfer",
            source=Party.of(own),
            destination=Party.of(recipient),
            amount=amount,
            currency=currency,
            locked=locked,
            user_id=user_id,
        )
        result = TransferResult(
            wallet_id=own.id,
            recipient_wallet_id=to_wallet_id,
            amount=amount,
            current_balance=booking.snapshots[own.id],
        )
        return result, booking

    return run


# --- reads -------------------------------------------------------------------------------


def history(session: Session, *, user_id: int, limit: int, offset: int) -> History:
    with session.begin():
        wallet_ids = repository.user_wallet_ids(session, user_id)
        rows = repository.history(session, wallet_ids=wallet_ids, limit=limit, offset=offset)
    items = [
        HistoryItem(
            id=txn_id,
            amount=amount,
            currency=currency,
            type=kind,
            date=created_at,
            sender=EXTERNAL_SOURCE if src_kind != USER else src_name,
            receiver=EXTERNAL_DESTINATION if dst_kind != USER else dst_name,
        )
        for txn_id, amount, currency, kind, created_at, src_name, src_kind, dst_name, dst_kind in rows
    ]
    return History(transactions=items, limit=limit, offset=offset)


def ledger_of(
    session: Session, *, user_id: int, transaction_id: int, show_counterparty: bool = True
) -> list[LedgerEntryRead]:
    """A transaction's entries, for a user whose wallet is part of it: both sides, or with
    `show_counterparty` off only the user's own (the other side's snapshot is the other
    wallet's balance)."""
    with session.begin():
        wallet_ids = repository.user_wallet_ids(session, user_id)
        entries = repository.ledger_entries(
            session, transaction_id=transaction_id, visible_to=wallet_ids, own_only=not show_counterparty
        )
    if not entries:
        raise TransactionNotFound()
    return [LedgerEntryRead.model_validate(e, from_attributes=True) for e in entries]
