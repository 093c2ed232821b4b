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

# ISO 4217 minor-unit exponents that are not 2 (the default).
_EXPONENTS = {"JPY": 0, "KRW": 0, "ISK": 0, "CLP": 0, "VND": 0, "KWD": 3, "BHD": 3, "JOD": 3, "OMR": 3, "TND": 3}


def format_amount(amount: int, currency: str) -> str:
    """`12345, "USD"` -> "123.45 USD", by integer arithmetic only (no float, no Decimal)."""
    exponent = _EXPONENTS.get(currency, 2)
    sign = "-" if amount < 0 else ""
    units, minor = divmod(abs(amount), 10**exponent)
    grouped = f"{units:,}"
    return f"{sign}{grouped}.{minor:0{exponent}d} {currency}" if exponent else f"{sign}{grouped} {currency}"


# Ids are 32-bit INTEGER primary keys on both databases: a larger number can name nothing,
# and must be a validation error rather than a database overflow.
MAX_ID = 2**31 - 1
Id = Annotated[StrictInt, Field(ge=1, le=MAX_ID)]
