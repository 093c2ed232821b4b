"""FastAPI dependencies of the wallet service: the unit of work and the idempotency key
(the caller comes from svckit.deps)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from svckit.deps import UserDep
from wallet.idempotency import parse_key
from wallet.uow import UnitOfWork

__all__ = ["KeyDep", "UowDep", "UserDep"]


async def unit_of_work(request: Request) -> UnitOfWork:
    return request.app.state.uow  # type: ignore[no-any-return]


async def idempotency_key(  # async: pure parsing, no worker-thread hop
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
        # Out of the schema: one OpenAPI cannot say "one of the two is required", and a fuzzer
        # that drops the required one while sending this calls the accepted request a bug.
        Header(alias="X-Idempotency-Key", include_in_schema=False),
    ] = None,
) -> str:
    return parse_key(idempotency_key, x_idempotency_key)


KeyDep = Annotated[str, Depends(idempotency_key)]
UowDep = Annotated[UnitOfWork, Depends(unit_of_work)]
