"""FastAPI dependencies of the auth service (the shared ones come from svckit.deps)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Header, Request

from auth.errors import Forbidden
from svckit.deps import SessionDep, UserDep
from svckit.http import SERVICE_TOKEN_HEADER

__all__ = ["SessionDep", "UserDep", "service_caller"]


def service_caller(
    request: Request,
    token: Annotated[str | None, Header(alias=SERVICE_TOKEN_HEADER, include_in_schema=False)] = None,
) -> None:
    if not request.app.state.settings.accepts_service_token(token):
        raise Forbidden()
