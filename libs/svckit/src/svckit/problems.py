"""RFC 9457 problem details: one exception class per failure, rendered by shared handlers."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

PROBLEM_JSON = "application/problem+json"
TYPE_BASE = "https://docs.wallet.example/problems/"

log = logging.getLogger("svckit.problems")


class FieldError(BaseModel):
    field: str
    message: str


class Problem(BaseModel):
    """The body of every error response (documented in OpenAPI)."""

    type: str
    title: str
    status: int
    detail: str
    code: str
    errors: list[FieldError] | None = None


class ProblemError(Exception):
    """Base of every business failure. Subclasses set status, code and title."""

    status: ClassVar[int] = 400
    code: ClassVar[str] = "bad_request"
    title: ClassVar[str] = "Bad request"
    default_detail: ClassVar[str] = ""

    def __init__(self, detail: str | None = None, *, headers: dict[str, str] | None = None) -> None:
        self.detail = detail or self.default_detail or self.title
        self.headers = headers or {}
        super().__init__(self.detail)

    def body(self) -> dict[str, Any]:
        return problem_body(self.status, self.code, self.title, self.detail)


class Unauthorized(ProblemError):
    status = 401
    code = "unauthorized"
    title = "Unauthorized"
    default_detail = "Missing, malformed, expired or invalid bearer token."

    def __init__(self, detail: str | None = None) -> None:
        super().__init__(detail, headers={"WWW-Authenticate": "Bearer"})


class NotFound(ProblemError):
    status = 404
    code = "not_found"
    title = "Not found"


def problem_body(status: int, code: str, title: str, detail: str, **extra: Any) -> dict[str, Any]:
    return {"type": TYPE_BASE + code, "title": title, "status": status, "detail": detail, "code": code, **extra}


def problem_response(
    status: int,
    code: str,
    title: str,
    detail: str,
    *,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> JSONResponse:
    body = problem_body(status, code, title, detail, **(extra or {}))
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_JSON)


def problem_responses(*errors: type[ProblemError]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries for the given problem classes (and the 422)."""
    out: dict[int | str, dict[str, Any]] = {}
    for err in errors:
        entry = out.setdefault(err.status, {"model": Problem, "description": ""})
        entry["description"] = ", ".join(filter(None, [entry["description"], err.code]))
    return out


def _field_name(loc: tuple[Any, ...]) -> str:
    # ("body", "amount") -> "amount"; ("query", "limit") -> "limit"; keep nested paths dotted.
    parts = [str(p) for p in loc[1:]] if len(loc) > 1 else [str(p) for p in loc]
    return ".".join(parts) or "body"


async def _problem_error(_: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, ProblemError):  # registered for ProblemError only
        raise exc
    return problem_response(exc.status, exc.code, exc.title, exc.detail, headers=exc.headers)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, RequestValidationError):
        raise exc
    errors = [
        {"field": _field_name(tuple(e.get("loc", ()))), "message": str(e.get("msg", "invalid"))} for e in exc.errors()
    ]
    fields = ", ".join(sorted({e["field"] for e in errors}))
    return problem_response(
        422,
        "validation_error",
        "Validation error",
        f"The request is invalid: {fields}.",
        extra={"errors": errors},
    )


_HTTP_CODES = {
    400: ("bad_request", "Bad request"),
    401: ("unauthorized", "Unauthorized"),
    403: ("forbidden", "Forbidden"),
    404: ("not_found", "Not found"),
    405: ("method_not_allowed", "Method not allowed"),
    413: ("payload_too_large", "Payload too large"),
    415: ("unsupported_media_type", "Unsupported media type"),
}


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    # Framework-raised errors (unknown route, wrong method): same problem shape.
    if not isinstance(exc, StarletteHTTPException):
        raise exc
    if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
        # A body that is not even text (invalid UTF-8): a validation error like any other.
        return problem_response(
            422,
            "validation_error",
            "Validation error",
            "The request body could not be parsed.",
            extra={"errors": [{"field": "body", "message": "malformed body"}]},
        )
    code, title = _HTTP_CODES.get(exc.status_code, ("http_error", "HTTP error"))
    detail = exc.detail if isinstance(exc.detail, str) and exc.status_code != 500 else title
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = ", ".join(_allowed_methods(request))
    return problem_response(exc.status_code, code, title, detail, headers=headers)


def _allowed_methods(request: Request) -> list[str]:
    """Every method any route serves at this path (one path may have several routes)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        regex = getattr(route, "path_regex", None)
        if regex is not None and regex.match(request.url.path):
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


def internal_error() -> JSONResponse:
    """The only thing a client learns of a bug: no stack trace, SQL or secret."""
    return problem_response(500, "internal_error", "Internal server error", "An unexpected error occurred.")


def install_problem_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ProblemError, _problem_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    # Unhandled exceptions are caught by svckit.requestid.RequestMiddleware, so the 500 keeps its request id.


def document_problems(app: FastAPI) -> None:
    """Make the OpenAPI document say what the API does: every error is
    `application/problem+json` with the Problem schema, including validation errors (422)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        doc = build()
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        for name, schema in (
            Problem.model_json_schema(ref_template="#/components/schemas/{model}").get("$defs", {}).items()
        ):
            schemas.setdefault(name, schema)
        problem = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
        problem.pop("$defs", None)
        schemas["Problem"] = problem
        ref = {"$ref": "#/components/schemas/Problem"}
        for item in doc.get("paths", {}).values():
            for operation in item.values():
                for status, response in operation.get("responses", {}).items():
                    if status.isdigit() and int(status) >= 400:
                        response["content"] = {PROBLEM_JSON: {"schema": ref}}
                        if status == "422":
                            # Keep the business rules' codes (problem_responses lists them).
                            codes = response.get("description", "")
                            rules = f": {codes}" if codes and codes != "Validation Error" else ""
                            response["description"] = (
                                f"Validation error (lists the offending fields), or a business rule{rules}"
                            )
        for unused in ("HTTPValidationError", "ValidationError"):
            schemas.pop(unused, None)
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
