"""FastAPI dependencies of the auth service (the shared ones come from svckit.deps)."""

from __future__ import annotations

import hmac
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
    expected = request.app.state.settings.service_token.get_secret_value()
    if token is None or not hmac.compare_digest(token.encode(), expected.encode()):
        raise Forbidden()
