"""FastAPI dependencies: the database session, the caller, the idempotency key."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Request
from fastapi.security import OAuth2PasswordBearer
from sqlmodel import Session

from svckit.jwt import Claims, verify_bearer
from wallet.idempotency import parse_key

oauth2 = OAuth2PasswordBearer(tokenUrl="token", auto_error=False)


def get_session(request: Request) -> Iterator[Session]:
    # No commit here: services commit before they return.
    with Session(request.app.state.engine) as session:
        yield session


def current_user(
    request: Request,
    _: Annotated[str | None, Depends(oauth2)],
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Claims:
    return verify_bearer(request.app.state.verifier, authorization)


def idempotency_key(
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            description="Required (or its older name X-Idempotency-Key): 1 to 255 visible ASCII characters",
            json_schema_extra={"pattern": "^[!-~]{1,255}$"},
        ),
    ] = None,
    x_idempotency_key: Annotated[
        str | None,
        Header(alias="X-Idempotency-Key", description="The same key under its older name; send one of the two"),
    ] = None,
) -> str:
    return parse_key(idempotency_key, x_idempotency_key)


SessionDep = Annotated[Session, Depends(get_session)]
UserDep = Annotated[Claims, Depends(current_user)]
KeyDep = Annotated[str, Depends(idempotency_key)]
