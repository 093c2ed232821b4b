"""HTTP routes of holds, refunds and balances (contract: Extensions): parse, call one
service function, return a schema. Included after wallet.routes, so that its fixed paths
(`/transaction/history`) match before `/transaction/{transaction_id}`."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response
from pydantic import AwareDatetime
from starlette.convertors import Convertor, register_url_convertor

from svckit.problems import Unauthorized, problem_responses
from wallet import holds, refunds
from wallet.deps import KeyDep, UowDep, UserDep
from wallet.errors import (
    BalanceTimeInvalid,
    CaptureExceedsHold,
    CurrencyMismatch,
    HoldNotActive,
    HoldNotFound,
    InsufficientFunds,
    NotRefundable,
    RecipientMismatch,
    RecipientNotFound,
    RecipientRequired,
    RefundExceedsTransfer,
    RefundNotAllowed,
    SelfTransfer,
    TransactionNotFound,
    WalletNotFound,
)
from wallet.routes import _IDEMPOTENT, _REPLAY_HEADERS, MAX_TRANSACTION_ID
from wallet.schemas import (
    BalanceRead,
    CaptureIn,
    HoldIn,
    HoldList,
    HoldRead,
    HoldStatus,
    RefundIn,
    RefundResult,
    TransactionRead,
)
from wallet.service import check_currency

router = APIRouter()


class _TransactionSegment(Convertor[str]):
    """`/transaction/{id}` takes any segment but the fixed paths of wallet.routes, so that a
    GET of /transaction/deposit stays a 405 (not this route's 422); any other non-number is
    still the path's 422."""

    regex = "(?!(?:deposit|withdraw|transfer|history)$)[^/]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return str(value)


register_url_convertor("transaction_segment", _TransactionSegment())

HoldId = Annotated[int, Path(ge=1, le=2**63 - 1)]
TransactionId = Annotated[int, Path(ge=1, le=MAX_TRANSACTION_ID)]
_RECIPIENT = (RecipientNotFound, CurrencyMismatch, SelfTransfer)


def _replayable(status: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"headers": _REPLAY_HEADERS}}


@router.post(
    "/holds",
    status_code=201,
    response_model=HoldRead,
    tags=["holds"],
    responses={
        **problem_responses(*_IDEMPOTENT, WalletNotFound, InsufficientFunds, *_RECIPIENT),
        **_replayable(201),
    },
)
async def create_hold(body: HoldIn, uow: UowDep, caller: UserDep, key: KeyDep, request: Request) -> Response:
    """Reserve money on your wallet without moving it (capture or void it later). Idempotent."""
    check_currency(body.currency, request.app.state.settings.currency_set)
    answer = await holds.create_hold(
        uow,
        user_id=caller.user_id,
        key=key,
        amount=body.amount,
        currency=body.currency,
        to_wallet_id=body.to_account_id,
        expires_in_s=body.expires_in_s,
    )
    return answer.response()


@router.get("/holds", response_model=HoldList, tags=["holds"], responses=problem_responses(Unauthorized))
async def list_holds(
    uow: UowDep,
    caller: UserDep,
    status: Annotated[HoldStatus | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=100, description="holds per page (extension)")] = 100,
    after: Annotated[
        int | None, Query(ge=1, le=MAX_TRANSACTION_ID, description="a hold id: the page of holds older than it")
    ] = None,
) -> HoldList:
    """Your holds, newest first, optionally of one status: at most `limit` (100) per page;
    `after` (the last id of a page) gives the next one."""
    return await holds.list_holds(uow, user_id=caller.user_id, status=status, limit=limit, after=after)


@router.get(
    "/holds/{hold_id}", response_model=HoldRead, tags=["holds"], responses=problem_responses(Unauthorized, HoldNotFound)
)
async def get_hold(hold_id: HoldId, uow: UowDep, caller: UserDep) -> HoldRead:
    """One of your holds."""
    return await holds.get_hold(uow, user_id=caller.user_id, hold_id=hold_id)


@router.post(
    "/holds/{hold_id}/capture",
    response_model=HoldRead,
    tags=["holds"],
    responses={
        **problem_responses(
            *_IDEMPOTENT,
            HoldNotFound,
            HoldNotActive,
            CaptureExceedsHold,
            RecipientRequired,
            RecipientMismatch,
            WalletNotFound,
            *_RECIPIENT,
        ),
        **_replayable(200),
    },
)
async def capture_hold(hold_id: HoldId, body: CaptureIn, uow: UowDep, caller: UserDep, key: KeyDep) -> Response:
    """Move (part of) a hold to its recipient as a transfer; the rest is released. Idempotent."""
    answer = await holds.capture_hold(
        uow, user_id=caller.user_id, key=key, hold_id=hold_id, amount=body.amount, to_wallet_id=body.to_account_id
    )
    return answer.response()


@router.post(
    "/holds/{hold_id}/void",
    response_model=HoldRead,
    tags=["holds"],
    responses={**problem_responses(*_IDEMPOTENT, HoldNotFound, HoldNotActive, WalletNotFound), **_replayable(200)},
)
async def void_hold(hold_id: HoldId, uow: UowDep, caller: UserDep, key: KeyDep) -> Response:
    """Release a hold entirely. Idempotent."""
    answer = await holds.void_hold(uow, user_id=caller.user_id, key=key, hold_id=hold_id)
    return answer.response()


@router.post(
    "/transaction/{transaction_id}/refund",
    response_model=RefundResult,
    tags=["transaction"],
    responses={
        **problem_responses(
            *_IDEMPOTENT,
            TransactionNotFound,
            RefundNotAllowed,
            NotRefundable,
            RefundExceedsTransfer,
            InsufficientFunds,
            WalletNotFound,
            RecipientNotFound,
        ),
        **_replayable(200),
    },
)
async def refund(
    transaction_id: TransactionId, uow: UowDep, caller: UserDep, key: KeyDep, body: RefundIn | None = None
) -> Response:
    """Send (part of) a transfer you received back to its sender, as a transfer. Idempotent."""
    amount = body.amount if body else None
    answer = await refunds.refund(uow, user_id=caller.user_id, key=key, transaction_id=transaction_id, amount=amount)
    return answer.response()


@router.get(
    "/transaction/{transaction_id:transaction_segment}",
    response_model=TransactionRead,
    tags=["transaction"],
    responses=problem_responses(Unauthorized, TransactionNotFound),
)
async def transaction_detail(transaction_id: TransactionId, uow: UowDep, caller: UserDep) -> TransactionRead:
    """One of your transactions, with what was refunded of it and what it refunds."""
    return await refunds.transaction_detail(uow, user_id=caller.user_id, transaction_id=transaction_id)


@router.get(
    "/wallet/balance",
    response_model=BalanceRead,
    tags=["wallet"],
    responses=problem_responses(Unauthorized, WalletNotFound, BalanceTimeInvalid),
)
async def balance(
    uow: UowDep,
    caller: UserDep,
    at: Annotated[AwareDatetime | None, Query(description="ISO 8601 with an offset; default now")] = None,
) -> BalanceRead:
    """Your open wallet's balance, held and available amounts now, or its balance at `at`."""
    return await holds.balance(uow, user_id=caller.user_id, at=at)


MONEY_PATHS = {
    ("/holds", "post"),
    ("/holds/{hold_id}/capture", "post"),
    ("/holds/{hold_id}/void", "post"),
    ("/transaction/{transaction_id}/refund", "post"),
}
