from __future__ import annotations

from svckit.problems import NotFound, ProblemError, Unauthorized


class EmailTaken(ProblemError):
    status = 409
    code = "email_taken"
    title = "Email already registered"
    default_detail = "An account with this email already exists."


class InvalidCredentials(Unauthorized):
    code = "invalid_credentials"
    title = "Invalid credentials"
    default_detail = "Incorrect email or password."


class AccountLocked(ProblemError):
    status = 429
    code = "account_locked"
    title = "Account locked"

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(
            f"Too many failed logins; try again in {retry_after_s} second{'' if retry_after_s == 1 else 's'}.",
            headers={"Retry-After": str(retry_after_s)},
        )


class UserNotFound(NotFound):
    code = "user_not_found"
    title = "User not found"
    default_detail = "No such user."


class Forbidden(ProblemError):
    status = 403
    code = "forbidden"
    title = "Forbidden"
    default_detail = "A valid service credential is required."
