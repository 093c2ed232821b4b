"""Money is an integer count of the currency's minor unit, end to end. No float, no Decimal."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, StrictInt, StringConstraints

MAX_AMOUNT = 10**12

# StrictInt refuses "200", 2.0 and true: a payment API must not guess what the client meant.
Amount = Annotated[StrictInt, Field(ge=1, le=MAX_AMOUNT, description="Minor units (cents for USD)")]
CurrencyCode = Annotated[
    str, StringConstraints(pattern=r"^[A-Z]{3}$"), Field(description="ISO 4217 code", examples=["USD"])
]
