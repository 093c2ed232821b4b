"""FastAPI dependencies every service shares: its database session and the caller's identity.

They read `app.state.engine` and `app.state.verifier`, which each service's lifespan sets.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import OAuth2PasswordBearer
from sqlmodel import Session

from svckit.jwt import Claims, remembered_bearer, verify_bearer

# Declared for OpenAPI (Swagger's "Authorize" logs in through /token); we check it ourselves.
oauth2 = OAuth2PasswordBearer(tokenUrl="token", auto_error=False)


# Both dependencies are `async def` although the routes are sync: neither blocks (a Session
# connects lazily, in the route's thread), and FastAPI runs every sync dependency in a
# worker thread of its own; those hops cost more than the rest of a cheap request.


async def get_session(request: Request) -> Session:
    # Not a `yield` dependency: FastAPI wraps those in a cancel scope and an exit stack
    # that cost a third of a cheap request. Nothing needs closing: with autobegin off,
    # a service can only touch the session inside `with session.begin()`, which commits
    # (or rolls back) and hands the connection back to the pool on the way out. No
    # commit happens here either: services commit before they return. Objects keep their
    # loaded values after the commit (nothing may reload them without a transaction).
    return Session(request.app.state.engine, autobegin=False, expire_on_commit=False)


async def current_user(request: Request, _: Annotated[str | None, Depends(oauth2)]) -> Claims:
    verifier = request.app.state.verifier
    # Two Authorization headers: neither is trusted (the gateway keys its limit on the first).
    values = request.headers.getlist("authorization")
    authorization = values[0] if len(values) == 1 else None
    claims = remembered_bearer(verifier, authorization)
    if claims is None:  # a first sight of this token; checking it may fetch the JWKS
        claims = await run_in_threadpool(verify_bearer, verifier, authorization)
    return claims


SessionDep = Annotated[Session, Depends(get_session)]
UserDep = Annotated[Claims, Depends(current_user)]
