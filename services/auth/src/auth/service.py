"""Use cases of the auth service. Each opens and commits its own transaction."""

from __future__ import annotations

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from auth import outbox, repository
from auth.errors import AccountLocked, EmailTaken, InvalidCredentials, UserNotFound
from auth.lockout import Lockout
from auth.models import User
from auth.schemas import SignupRequest
from auth.security import PasswordHasher, TokenIssuer
from svckit.messages import Recipient, WelcomeEmail, new_email_id


def signup(session: Session, *, hasher: PasswordHasher, data: SignupRequest) -> User:
    # Hash before the transaction: bcrypt is slow and must not hold a database lock.
    password_hash = hasher.hash(data.password)
    try:
        with session.begin():
            if repository.get_user_by_email(session, data.email) is not None:
                raise EmailTaken()
            user = repository.add_user(
                session,
                User(
                    email=data.email,
                    first_name=data.first_name,
                    last_name=data.last_name,
                    password_hash=password_hash,
                ),
            )
            if user.id is None:  # the flush assigns it
                raise RuntimeError("user id not assigned")
            # The welcome email commits with the account, or not at all.
            # It carries the address and name, so the notifier needs no lookup back here.
            recipient = Recipient(email=user.email, first_name=user.first_name, last_name=user.last_name)
            outbox.stage(session, WelcomeEmail(email_id=new_email_id(), user_id=user.id, recipient=recipient))
    except IntegrityError as exc:  # a concurrent signup with the same email won the race
        raise EmailTaken() from exc
    return user


def login(
    session: Session,
    *,
    hasher: PasswordHasher,
    lockout: Lockout,
    issuer: TokenIssuer,
    email: str,
    password: str,
) -> str:
    email = email.strip().lower()
    # The attempt is counted before bcrypt runs, so parallel guesses cannot outrun the lock.
    attempt = lockout.reserve(email)
    if attempt.retry_after:
        raise AccountLocked(attempt.retry_after)
    try:
        with session.begin():
            user = repository.get_user_by_email(session, email)
        # One bcrypt check whether or not the email exists: same answer, same timing.
        ok = hasher.verify(password, user.password_hash if user else None)
    except BaseException:
        lockout.release(attempt)  # no verdict: the slot is given back, nothing counted
        raise
    if not ok or user is None or user.id is None:
        lockout.failed(attempt)
        raise InvalidCredentials()
    retry_after = lockout.succeeded(attempt)
    if retry_after:  # locked while this check ran: the lock wins
        raise AccountLocked(retry_after)
    return issuer.issue(user.id)


def get_profile(session: Session, *, requester_id: int, user_id: int) -> User:
    # Only your own profile; any other id is 404 whether it exists or not.
    if requester_id != user_id:
        raise UserNotFound()
    with session.begin():
        user = repository.get_user(session, user_id)
    if user is None:
        raise UserNotFound()
    return user


def lookup_users(session: Session, *, ids: list[int]) -> list[User]:
    with session.begin():
        return repository.get_users(session, ids)
