"""One class per failure of the wallet API, rendered as RFC 9457 problems by svckit."""

from __future__ import annotations

from svckit.problems import NotFound, ProblemError


class WalletNotFound(NotFound):
    code = "wallet_not_found"
    title = "Wallet not found"
    default_detail = "You have no open wallet."


class RecipientNotFound(NotFound):
    code = "recipient_not_found"
    title = "Recipient not found"
    default_detail = "The recipient wallet does not exist or is closed."


class TransactionNotFound(NotFound):
    code = "transaction_not_found"
    title = "Transaction not found"
    default_detail = "No such transaction among your wallets."


class WalletExists(ProblemError):
    status = 409
    code = "wallet_exists"
    title = "Wallet exists"
    default_detail = "You already have an open wallet."


class WalletNotEmpty(ProblemError):
    status = 409
    code = "wallet_not_empty"
    title = "Wallet not empty"
    default_detail = "Withdraw the balance before closing the wallet."


class InsufficientFunds(ProblemError):
    status = 422
    code = "insufficient_funds"
    title = "Insufficient funds"
    default_detail = "The amount exceeds the wallet's balance."


class CurrencyMismatch(ProblemError):
    status = 422
    code = "currency_mismatch"
    title = "Currency mismatch"


class SelfTransfer(ProblemError):
    status = 422
    code = "self_transfer"
    title = "Transfer to yourself"
    default_detail = "The recipient wallet is your own wallet."


class UnsupportedCurrency(ProblemError):
    status = 422
    code = "unsupported_currency"
    title = "Unsupported currency"


class IdempotencyKeyMissing(ProblemError):
    status = 400
    code = "idempotency_key_missing"
    title = "Idempotency key missing"
    default_detail = "Send an Idempotency-Key (or X-Idempotency-Key) header of 1 to 255 visible ASCII characters."


class IdempotencyKeyInvalid(IdempotencyKeyMissing):
    code = "idempotency_key_invalid"
    title = "Idempotency key invalid"


class IdempotencyKeyReused(ProblemError):
    status = 422
    code = "idempotency_key_reused"
    title = "Idempotency key reused"
    default_detail = "This idempotency key was used with a different request body."


class IdempotencyInProgress(ProblemError):
    status = 409
    code = "idempotency_in_progress"
    title = "Request in progress"
    default_detail = "A request with this idempotency key is still running; retry shortly."

    def __init__(self, retry_after_s: int = 1) -> None:
        super().__init__(headers={"Retry-After": str(retry_after_s)})


class WalletBusy(ProblemError):
    """A wallet stayed locked past the database's lock timeout (or a statement ran past its
    timeout): nothing was done and nothing was kept under the idempotency key, so the same
    request may be sent again."""

    status = 503
    code = "wallet_busy"
    title = "Wallet busy"
    default_detail = "The wallet is busy; nothing was done. Retry shortly (with the same idempotency key, if any)."

    def __init__(self, retry_after_s: int = 1) -> None:
        super().__init__(headers={"Retry-After": str(retry_after_s)})


class AuthUnavailable(ProblemError):
    status = 503
    code = "auth_unavailable"
    title = "Service unavailable"
    default_detail = "Could not reach the auth service to open the wallet; retry shortly."

    def __init__(self) -> None:
        super().__init__(headers={"Retry-After": "5"})


class UnknownUser(ProblemError):
    status = 401
    code = "unknown_user"
    title = "Unknown user"
    default_detail = "The token's user does not exist."

    def __init__(self) -> None:
        super().__init__(headers={"WWW-Authenticate": "Bearer"})


# --- holds, refunds, balances (contract: Extensions) -----------------------------------


class HoldNotFound(NotFound):
    code = "hold_not_found"
    title = "Hold not found"
    default_detail = "No such hold on your wallets."


class HoldNotActive(ProblemError):
    status = 409
    code = "hold_not_active"
    title = "Hold not active"
    default_detail = "The hold was captured, voided or has expired."


class CaptureExceedsHold(ProblemError):
    status = 422
    code = "capture_exceeds_hold"
    title = "Capture exceeds hold"
    default_detail = "The amount to capture exceeds the amount held."


class RecipientRequired(ProblemError):
    status = 422
    code = "recipient_required"
    title = "Recipient required"
    default_detail = "The hold names no recipient: send to_account_id."


class RecipientMismatch(ProblemError):
    """Not in the contract's list: a hold authorized for one recipient is never captured to
    another (README, "Life of a hold")."""

    status = 422
    code = "recipient_mismatch"
    title = "Recipient mismatch"
    default_detail = "The hold was placed for another recipient."


class RefundNotAllowed(ProblemError):
    status = 403
    code = "refund_not_allowed"
    title = "Refund not allowed"
    default_detail = "Only the recipient of a transfer may refund it."


class RefundExceedsTransfer(ProblemError):
    status = 422
    code = "refund_exceeds_transfer"
    title = "Refund exceeds transfer"
    default_detail = "The refunds of a transfer never total more than the transfer."


class NotRefundable(ProblemError):
    status = 422
    code = "not_refundable"
    title = "Not refundable"
    default_detail = "Only transfers can be refunded (not deposits, withdrawals or refunds)."


class BalanceTimeInvalid(ProblemError):
    status = 422
    code = "invalid_at"
    title = "Invalid time"
    default_detail = "`at` must lie between the wallet's opening and now."


class InvalidRange(ProblemError):
    """A statement's or a history filter's `from` after its `to`, or a statement range
    longer than the contract allows (366 days)."""

    status = 422
    code = "invalid_range"
    title = "Invalid date range"


class StatementTooLarge(ProblemError):
    """More lines in the range than one statement carries (WALLET_STATEMENT_MAX_LINES): the
    client asks for a narrower range (the detail says where the first lines end)."""

    status = 422
    code = "statement_too_large"
    title = "Statement too large"


class OffsetWithAfter(ProblemError):
    status = 422
    code = "offset_with_after"
    title = "Offset and after together"
    default_detail = "Page with `after` (the last id you saw) or with `offset`, not both."
