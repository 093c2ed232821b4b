"""HTTP routes of the wallet service: parse, call one service function, return a schema."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Awaitable, Collection
from typing import Annotated, Any, Literal

from fastapi import APIRouter, FastAPI, Path, Query, Request, Response

from svckit.money import MAX_ID
from svckit.problems import Unauthorized, problem_responses
from wallet import service
from wallet.deps import KeyDep, UowDep, UserDep
from wallet.errors import (
    AuthUnavailable,
    CurrencyMismatch,
    IdempotencyInProgress,
    IdempotencyKeyMissing,
    IdempotencyKeyReused,
    InsufficientFunds,
    InvalidRange,
    OffsetWithAfter,
    RecipientNotFound,
    SelfTransfer,
    StatementTooLarge,
    TransactionNotFound,
    UnsupportedCurrency,
    WalletBusy,
    WalletExists,
    WalletNotEmpty,
    WalletNotFound,
)
from wallet.idempotency import Answer
from wallet.metrics import MONEY_MOVED, MOVEMENTS
from wallet.schemas import (
    History,
    Instant,
    LedgerEntryRead,
    Message,
    MoneyIn,
    MovementResult,
    Statement,
    TransferIn,
    TransferResult,
    WalletCreate,
    WalletCreated,
    WalletRead,
)
from wallet.users import owner

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


async def _answered(kind: str, amount: int, currency: str, movement: Awaitable[Answer]) -> Response:
    """The movement's answer as the response, counted here at the edge: first answers by
    outcome (and money moved), a timeout's 503 by its code. Replays are counted as
    idempotency events, where they are found."""
    try:
        answer = await movement
    except WalletBusy:
        MOVEMENTS.labels(kind, WalletBusy.code).inc()
        raise
    if not answer.replayed:
        outcome = answer.outcome
        if outcome.status_code == 200:
            MOVEMENTS.labels(kind, "ok").inc()
            MONEY_MOVED.labels(kind, currency).inc(amount)
        else:
            MOVEMENTS.labels(kind, json.loads(outcome.body).get("code", "refused")).inc()
    return answer.response()


@router.post(
    "/wallet",
    status_code=201,
    response_model=WalletCreated,
    tags=["wallet"],
    responses=problem_responses(Unauthorized, WalletExists, UnsupportedCurrency, AuthUnavailable),
)
async def create_wallet(body: WalletCreate, uow: UowDep, caller: UserDep, request: Request) -> WalletCreated:
    """Open your wallet; a non-zero opening balance is booked as a deposit."""
    state = request.app.state
    service.check_currency(body.currency, state.settings.currency_set)
    return await service.create_wallet(
        uow,
        user_id=caller.user_id,
        currency=body.currency,
        balance=body.balance,
        owner=lambda: owner(state.auth_client, caller.user_id),
    )


@router.get(
    "/wallet",
    response_model=WalletRead,
    response_model_by_alias=True,
    tags=["wallet"],
    responses=problem_responses(Unauthorized, WalletNotFound),
)
async def get_wallet(uow: UowDep, caller: UserDep) -> WalletRead:
    """Your open wallet."""
    return await service.get_wallet(uow, user_id=caller.user_id)


@router.delete(
    "/wallet",
    response_model=Message,
    tags=["wallet"],
    responses=problem_responses(Unauthorized, WalletNotFound, WalletNotEmpty, WalletBusy),
)
async def close_wallet(uow: UowDep, caller: UserDep) -> Message:
    """Close your wallet (its balance must be zero). History and ledger stay."""
    return await service.close_wallet(uow, user_id=caller.user_id)


@router.patch(
    "/transaction/deposit",
    response_model=MovementResult,
    tags=["transaction"],
    responses={**problem_responses(*_IDEMPOTENT, WalletNotFound, CurrencyMismatch), 200: {"headers": _REPLAY_HEADERS}},
)
async def deposit(body: MoneyIn, uow: UowDep, caller: UserDep, key: KeyDep, request: Request) -> Response:
    """Add money to your wallet from outside. Idempotent: send an Idempotency-Key."""
    service.check_currency(body.currency, request.app.state.settings.currency_set)
    movement = service.deposit(uow, user_id=caller.user_id, key=key, amount=body.amount, currency=body.currency)
    return await _answered("deposit", body.amount, body.currency, movement)


@router.patch(
    "/transaction/withdraw",
    response_model=MovementResult,
    tags=["transaction"],
    responses={
        **problem_responses(*_IDEMPOTENT, WalletNotFound, CurrencyMismatch, InsufficientFunds),
        200: {"headers": _REPLAY_HEADERS},
    },
)
async def withdraw(body: MoneyIn, uow: UowDep, caller: UserDep, key: KeyDep, request: Request) -> Response:
    """Take money out of your wallet. Idempotent: send an Idempotency-Key."""
    service.check_currency(body.currency, request.app.state.settings.currency_set)
    movement = service.withdraw(uow, user_id=caller.user_id, key=key, amount=body.amount, currency=body.currency)
    return await _answered("withdrawal", body.amount, body.currency, movement)


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
async def transfer(body: TransferIn, uow: UowDep, caller: UserDep, key: KeyDep, request: Request) -> Response:
    """Send money to another wallet (`to_account_id`). Idempotent: send an Idempotency-Key."""
    service.check_currency(body.currency, request.app.state.settings.currency_set)
    movement = service.transfer(
        uow,
        user_id=caller.user_id,
        key=key,
        to_wallet_id=body.to_account_id,
        amount=body.amount,
        currency=body.currency,
    )
    return await _answered("transfer", body.amount, body.currency, movement)


_FROM = Query(alias="from", description="ISO 8601 with an offset (`2026-05-31T12:00:00Z`): from this instant, included")
_TO = Query(alias="to", description="ISO 8601 with an offset: up to this instant, included")


@router.get(
    "/transaction/history",
    response_model=History,
    tags=["transaction"],
    responses=problem_responses(Unauthorized, OffsetWithAfter, InvalidRange),
)
async def history(
    uow: UowDep,
    caller: UserDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
    offset: Annotated[int | None, Query(ge=0, le=MAX_ID, description="Default 0; not with `after`")] = None,
    after: Annotated[
        int | None,
        Query(
            ge=1,
            le=MAX_TRANSACTION_ID,
            description="Extension: the page of items older than this transaction id (the last one you saw)",
        ),
    ] = None,
    kind: Annotated[
        Literal["deposit", "withdrawal", "transfer"] | None, Query(alias="type", description="Only this type")
    ] = None,
    since: Annotated[Instant | None, _FROM] = None,
    until: Annotated[Instant | None, _TO] = None,
) -> History:
    """Your transactions, newest first, across all your wallets (closed ones included).
    Page by `offset`, or by keyset with `after`."""
    return await service.history(
        uow, user_id=caller.user_id, limit=limit, offset=offset, after=after, kind=kind, since=since, until=until
    )


_CSV_COLUMNS = ("transaction_id", "date", "type", "counterparty", "amount", "balance")


@router.get(
    "/wallet/statement",
    response_model=Statement,
    response_model_by_alias=True,
    tags=["wallet"],
    responses={
        **problem_responses(Unauthorized, WalletNotFound, InvalidRange, StatementTooLarge),
        200: {
            "description": "The statement; with `Accept: text/csv`, its lines as CSV with a header row",
            "content": {"text/csv": {"schema": {"type": "string"}, "example": ",".join(_CSV_COLUMNS) + "\r\n"}},
        },
    },
)
async def statement(
    uow: UowDep,
    caller: UserDep,
    request: Request,
    since: Annotated[Instant | None, _FROM] = None,
    until: Annotated[Instant | None, _TO] = None,
) -> Response:
    """Your open wallet's statement, oldest first with running balances (default: the last
    30 days; at most 366). `Accept: text/csv` for CSV."""
    result = await service.statement(
        uow,
        user_id=caller.user_id,
        since=since,
        until=until,
        max_lines=request.app.state.settings.statement_max_lines,
    )
    if _wants_csv(request.headers.get("accept", "")):
        return Response(_csv(result), media_type="text/csv; charset=utf-8")
    return Response(result.model_dump_json(by_alias=True), media_type="application/json")


def _wants_csv(accept: str) -> bool:
    """`text/csv` is asked for with a higher weight than JSON (`*/*` and no header: JSON)."""
    weights = {"text/csv": 0.0, "json": 0.0}
    for item in accept.split(","):
        media, _, params = item.partition(";")
        media = media.strip().lower()
        q = 1.0
        for param in params.split(";"):
            name, _, value = param.partition("=")
            if name.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        kind = "text/csv" if media in ("text/csv", "text/*") else "json" if media in _JSON_MEDIA else None
        if kind:
            weights[kind] = max(weights[kind], q)
    return weights["text/csv"] > weights["json"]


_JSON_MEDIA = ("application/json", "application/*", "*/*")


def _csv(result: Statement) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(_CSV_COLUMNS)
    for line in result.lines:
        date = line.date.isoformat().replace("+00:00", "Z")
        writer.writerow((line.transaction_id, date, line.type, _cell(line.counterparty), line.amount, line.balance))
    return out.getvalue()


def _cell(text: str) -> str:
    """A name as a spreadsheet-safe cell: one starting like a formula gets a leading `'`
    (OWASP's CSV injection advice), so opening the file never runs it."""
    return f"'{text}" if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


@router.get(
    "/transaction/{transaction_id}/ledger",
    response_model=list[LedgerEntryRead],
    tags=["transaction"],
    responses=problem_responses(Unauthorized, TransactionNotFound),
)
async def ledger(
    transaction_id: Annotated[int, Path(ge=1, le=MAX_TRANSACTION_ID)],
    uow: UowDep,
    caller: UserDep,
    request: Request,
) -> list[LedgerEntryRead]:
    """The double-entry ledger lines of one of your transactions."""
    return await service.ledger_of(
        uow,
        user_id=caller.user_id,
        transaction_id=transaction_id,
        show_counterparty=request.app.state.settings.ledger_show_counterparty,
    )


MONEY_PATHS = {
    ("/transaction/deposit", "patch"),
    ("/transaction/withdraw", "patch"),
    ("/transaction/transfer", "patch"),
}


def require_idempotency_key_in_docs(app: FastAPI, operations: Collection[tuple[str, str]]) -> None:
    """Money movements need a key: document `Idempotency-Key` as required on each (path,
    method) of `operations`. (At run time the older `X-Idempotency-Key` is accepted instead,
    which one schema cannot say; a missing key is a 400 problem, not a validation error.)"""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        doc = build()
        for path, method in operations:
            for parameter in doc["paths"][path][method].get("parameters", []):
                if parameter["name"] == "Idempotency-Key":
                    parameter["required"] = True
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
