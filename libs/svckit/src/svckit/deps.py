"""FastAPI dependencies every service shares: its database session and the caller's identity.

They read `app.state.engine` and `app.state.verifier`, which each service's lifespan sets.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Request
from fastapi.security import OAuth2PasswordBearer
from sqlmodel import Session

from svckit.jwt import Claims, verify_bearer

# Declared for OpenAPI (Swagger's "Authorize" logs in through /token); we check it ourselves.
oauth2 = OAuth2PasswordBearer(tokenUrl="token", auto_error=False)


def get_session(request: Request) -> Iterator[Session]:
    # No commit here: services commit before they return (a yield dependency's exit runs
    # after the response is sent, so a failed commit there could follow a 200).
    with Session(request.app.state.engine) as session:
        yield session


def current_user(
    request: Request,
    _: Annotated[str | None, Depends(oauth2)],
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Claims:
    return verify_bearer(request.app.state.verifier, authorization)


SessionDep = Annotated[Session, Depends(get_session)]
UserDep = Annotated[Claims, Depends(current_user)]
