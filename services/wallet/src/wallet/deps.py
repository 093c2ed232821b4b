"""FastAPI dependencies of the wallet service: the idempotency key (the session and the
caller come from svckit.deps)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header

from svckit.deps import SessionDep, UserDep
from wallet.idempotency import parse_key

__all__ = ["KeyDep", "SessionDep", "UserDep"]


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
        Header(alias="X-Idempotency-Key", description="The same key under its older name; send one of the two"),
    ] = None,
) -> str:
    return parse_key(idempotency_key, x_idempotency_key)


KeyDep = Annotated[str, Depends(idempotency_key)]
