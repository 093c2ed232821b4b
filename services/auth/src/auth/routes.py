"""HTTP routes of the auth service: parse, call one service function, return a schema."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.security import OAuth2PasswordRequestForm

from auth import service
from auth.deps import SessionDep, UserDep, service_caller
from auth.errors import AccountLocked, EmailTaken, InvalidCredentials, UserNotFound
from auth.models import User
from auth.ratelimit import RateLimited
from auth.schemas import SignupRequest, TokenResponse, UserList, UserRead
from svckit.money import MAX_ID
from svckit.problems import Unauthorized, problem_responses

router = APIRouter()
internal = APIRouter(prefix="/internal", include_in_schema=False, dependencies=[Depends(service_caller)])


def _read(user: User) -> UserRead:
    return UserRead.model_validate(user, from_attributes=True)


@router.post(
    "/signup",
    status_code=201,
    response_model=UserRead,
    tags=["auth"],
    responses=problem_responses(EmailTaken),
)
def signup(body: SignupRequest, session: SessionDep, request: Request) -> UserRead:
    """Create an account. A welcome email follows asynchronously."""
    return _read(service.signup(session, hasher=request.app.state.hasher, data=body))


def _token_rate(request: Request) -> None:
    request.app.state.token_rate.check(request)


@router.post(
    "/token",
    response_model=TokenResponse,
    tags=["auth"],
    responses=problem_responses(InvalidCredentials, AccountLocked, RateLimited),
    dependencies=[Depends(_token_rate)],  # before the password check
)
def token(
    form: Annotated[OAuth2PasswordRequestForm, Depends()],
    session: SessionDep,
    request: Request,
    response: Response,
) -> TokenResponse:
    """Log in with email and password (OAuth2 password flow); returns a bearer token."""
    state = request.app.state
    access_token = service.login(
        session,
        hasher=state.hasher,
        lockout=state.lockout,
        issuer=state.issuer,
        email=form.username,
        password=form.password,
    )
    response.headers["Cache-Control"] = "no-store"  # RFC 6749 section 5.1
    return TokenResponse(access_token=access_token, expires_in=state.issuer.ttl_s)


@router.get(
    "/users/{user_id}",
    response_model=UserRead,
    tags=["users"],
    responses=problem_responses(Unauthorized, UserNotFound),
)
def get_user(user_id: Annotated[int, Path(ge=1, le=MAX_ID)], session: SessionDep, caller: UserDep) -> UserRead:
    """Your own profile. Any other id answers 404, whether it exists or not."""
    return _read(service.get_profile(session, requester_id=caller.user_id, user_id=user_id))


@router.get("/.well-known/jwks.json", tags=["auth"])
async def jwks(request: Request, response: Response) -> dict[str, Any]:
    """Public keys that verify access tokens (JWKS)."""
    # On the event loop, not a worker thread (a hop that cost more than the route): the
    # key ring stats its folder and re-reads it only when it changed (microseconds).
    response.headers["Cache-Control"] = "public, max-age=60"
    result: dict[str, Any] = request.app.state.keys.jwks()
    return result


@internal.get("/users", response_model=UserList)
def lookup_users(session: SessionDep, ids: Annotated[list[int], Query(min_length=1, max_length=100)]) -> UserList:
    """Several users by id, for other services (service credential required)."""
    return UserList(users=[_read(u) for u in service.lookup_users(session, ids=ids)])
