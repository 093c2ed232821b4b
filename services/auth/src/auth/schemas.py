"""Request and response bodies of the auth API (never table models)."""

from __future__ import annotations

import unicodedata
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, EmailStr, Field, StringConstraints

# Control (Cc: NUL, CR/LF), format (Cf: U+202E bidi override, U+200B zero width) and line or
# paragraph separators (Zl, Zp) are refused: names are shown to other users, in history and
# receipts, where such characters reorder, hide or break the text around them.
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})


def _printable_name(value: str) -> str:
    for char in value:
        if unicodedata.category(char) in _REFUSED_CATEGORIES:
            raise ValueError(f"must not contain control or format characters (U+{ord(char):04X})")
    return value


Name = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100), AfterValidator(_printable_name)
]


def _password_rules(value: str) -> str:
    if len(value) < 8:
        raise ValueError("must be at least 8 characters")
    # bcrypt only reads 72 bytes: a longer password would be silently truncated. Refuse it.
    if len(value.encode("utf-8")) > 72:
        raise ValueError("must be at most 72 bytes in UTF-8")
    return value


Password = Annotated[
    str,
    AfterValidator(_password_rules),
    Field(
        examples=["securepass123"],
        json_schema_extra={"minLength": 8, "maxLength": 72},
        description="8 to 72 characters, and at most 72 bytes in UTF-8 (bcrypt's limit; never truncated)",
    ),
]


class SignupRequest(BaseModel):
    first_name: Name = Field(examples=["Jane"])
    last_name: Name = Field(examples=["Doe"])
    email: Annotated[EmailStr, AfterValidator(str.lower)] = Field(examples=["jane@example.com"])
    password: Password


class UserRead(BaseModel):
    id: int
    first_name: str
    last_name: str
    email: str


class TokenResponse(BaseModel):
    access_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_in: int = Field(description="Seconds until the token expires")


class UserList(BaseModel):
    users: list[UserRead]
