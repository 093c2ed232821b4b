"""HTTP routes of the wallet service: parse, call one service function, return a schema."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Path, Query, Request, Response

from svckit.money import MAX_ID
from svckit.problems import Unauthorized, problem_responses
from wallet import idempotency, service
from wallet.deps import KeyDep, SessionDep, UserDep
from wallet.errors import (
    AuthUnavailable,
    CurrencyMismatch,
    IdempotencyInProgress,
    IdempotencyKeyMissing,
    IdempotencyKeyReused,
    InsufficientFunds,
    RecipientNotFound,
    SelfTransfer,
    TransactionNotFound,
    UnsupportedCurrency,
    WalletBusy,
    WalletExists,
    WalletNotEmpty,
    WalletNotFound,
)
from wallet.schemas import (
    History,
    LedgerEntryRead,
    Message,
    MoneyIn,
    MovementResult,
    TransferIn,
    TransferResult,
    WalletCreate,
    WalletCreated,
    WalletRead,
)
from wallet.users import full_name

router = APIRouter()

# Transaction ids are BIGINT (migration 0005); wallet ids stay within svckit's MAX_ID.
MAX_TRANSACTION_ID = 2**63 - 1

_IDEMPOTENT = (
    IdempotencyKeyMissing,
    IdempotencyKeyReused,
    IdempotencyInProgress,
    Unauthorized,
    UnsupportedCurrency,
    WalletBusy,
)
_REPLAY_HEADERS: dict[str, Any] = {
    "Idempotent-Replayed": {
        "description": "`true` when this is a stored response replayed",
        "schema": {"type": "string"},
    }
}


@router.post(
    "/wallet",
    status_code=201,
    response_model=WalletCreated,
    tags=["wallet"],
    responses=problem_responses(Unauthorized, WalletExists, UnsupportedCurrency, AuthUnavailable),
)
def create_wallet(body: WalletCreate, session: SessionDep, caller: UserDep, request: Request) -> WalletCreated:
    """Open your wallet; a non-zero opening balance is booked as a deposit."""
    state = request.app.state
    service.check_currency(body.currency, state.settings.currency_set)
    return service.create_wallet(
        session,
        user_id=caller.user_id,
        currency=body.currency,
        balance=body.balance,
        full_name=lambda: full_name(state.auth_client, caller.user_id),
        system_wallet_id=state.system_wallets.for_user(body.currency, caller.user_id),
    )


@router.get(
    "/wallet",
    response_model=WalletRead,
    response_model_by_alias=True,
    tags=["wallet"],
    responses=problem_responses(Unauthorized, WalletNotFound),
)
def get_wallet(session: SessionDep, caller: UserDep) -> WalletRead:
    """Your open wallet."""
    return service.get_wallet(session, user_id=caller.user_id)


@router.delete(
    "/wallet",
    response_model=Message,
    tags=["wallet"],
    responses=problem_responses(Unauthorized, WalletNotFound, WalletNotEmpty, WalletBusy),
)
def close_wallet(session: SessionDep, caller: UserDep) -> Message:
    """Close your wallet (its balance must be zero). History and ledger stay."""
    return service.close_wallet(session, user_id=caller.user_id)


def _move(
    request: Request,
    session: SessionDep,
    caller: UserDep,
    key: str,
    endpoint: str,
    body: MoneyIn,
    operation: idempotency.Operation,
) -> Response:
    settings = request.app.state.settings
    return idempotency.run_idempotent(
        session,
        cache=request.app.state.idempotency,
        user_id=caller.user_id,
        endpoint=endpoint,
        key=key,
        payload=body.model_dump(mode="json"),
        operation=operation,
        retries=settings.db_retries,
    )


@router.patch(
    "/transaction/deposit",
    response_model=MovementResult,
    tags=["transaction"],
    responses={**problem_responses(*_IDEMPOTENT, WalletNotFound, CurrencyMismatch), 200: {"headers": _REPLAY_HEADERS}},
)
def deposit(body: MoneyIn, session: SessionDep, caller: UserDep, key: KeyDep, request: Request) -> Response:
    """Add money to your wallet from outside. Idempotent: send an Idempotency-Key."""
    state = request.app.state
    service.check_currency(body.currency, state.settings.currency_set)
    operation = service.deposit_op(
        user_id=caller.user_id,
        amount=body.amount,
        currency=body.currency,
        system_wallet_id=state.system_wallets.for_user(body.currency, caller.user_id),
    )
    return _move(request, session, caller, key, "deposit", body, operation)


@router.patch(
    "/transaction/withdraw",
    response_model=MovementResult,
    tags=["transaction"],
    responses={
        **problem_responses(*_IDEMPOTENT, WalletNotFound, CurrencyMismatch, InsufficientFunds),
        200: {"headers": _REPLAY_HEADERS},
    },
)
def withdraw(body: MoneyIn, session: SessionDep, caller: UserDep, key: KeyDep, request: Request) -> Response:
    """Take money out of your wallet. Idempotent: send an Idempotency-Key."""
    state = request.app.state
    service.check_currency(body.currency, state.settings.currency_set)
    operation = service.withdraw_op(
        user_id=caller.user_id,
        amount=body.amount,
        currency=body.currency,
        system_wallet_id=state.system_wallets.for_user(body.currency, caller.user_id),
    )
    return _move(request, session, caller, key, "withdraw", body, operation)


@router.patch(
    "/transaction/transfer",
    response_model=TransferResult,
    tags=["transaction"],
    responses={
        **problem_responses(
            *_IDEMPOTENT, WalletNotFound, RecipientNotFound, CurrencyMismatch, InsufficientFunds, SelfTransfer
        ),
        200: {"headers": _REPLAY_HEADERS},
    },
)
def transfer(body: TransferIn, session: SessionDep, caller: UserDep, key: KeyDep, request: Request) -> Response:
    """Send money to another wallet (`to_account_id`). Idempotent: send an Idempotency-Key."""
    service.check_currency(body.currency, request.app.state.settings.currency_set)
    operation = service.transfer_op(
        user_id=caller.user_id, to_wallet_id=body.to_account_id, amount=body.amount, currency=body.currency
    )
    return _move(request, session, caller, key, "transfer", body, operation)


@router.get(
    "/transaction/history", response_model=History, tags=["transaction"], responses=problem_responses(Unauthorized)
)
def history(
    session: SessionDep,
    caller: UserDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
    offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
) -> History:
    """Your transactions, newest first, across all your wallets (closed ones included)."""
    return service.history(session, user_id=caller.user_id, limit=limit, offset=offset)


@router.get(
    "/transaction/{transaction_id}/ledger",
    response_model=list[LedgerEntryRead],
    tags=["transaction"],
    responses=problem_responses(Unauthorized, TransactionNotFound),
)
def ledger(
    transaction_id: Annotated[int, Path(ge=1, le=MAX_TRANSACTION_ID)],
    session: SessionDep,
    caller: UserDep,
    request: Request,
) -> list[LedgerEntryRead]:
    """The double-entry ledger lines of one of your transactions."""
    return service.ledger_of(
        session,
        user_id=caller.user_id,
        transaction_id=transaction_id,
        show_counterparty=request.app.state.settings.ledger_show_counterparty,
    )


def require_idempotency_key_in_docs(app: FastAPI) -> None:
    """Money movements need a key: document `Idempotency-Key` as required. (At run time the
    older `X-Idempotency-Key` is accepted instead, which one schema cannot say; a missing
    key is a 400 problem, not a validation error.)"""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        doc = build()
        for path in ("/transaction/deposit", "/transaction/withdraw", "/transaction/transfer"):
            for parameter in doc["paths"][path]["patch"].get("parameters", []):
                if parameter["name"] == "Idempotency-Key":
                    parameter["required"] = True
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
