"""One API reference for the whole platform, served at the gateway's /docs and /redoc.

Each service publishes its own OpenAPI document internally (public routes only); this small
app fetches them (DOCS_SOURCES, comma-separated URLs), merges paths and components, and
serves Swagger UI and ReDoc with assets from the `fastapi-offline` wheel (no CDN).

It also answers the gateway's own refusals as problem documents (gateway/dynamic/routes.yml
rewrites the path to these; none is routed from outside): `/__not-found` (any unknown path
is a 404 problem), `/__unauthorized` (a money call whose Authorization is not a well-formed
bearer token, refused before it reaches the wallet), `/__payload-too-large` (the page of
the gateway's 413) and `/__gateway/{status}` (the pages of the gateway's own 429, 500, 502,
503 and 504: its rate limiter, its limiter's Redis down, a backend down or too slow). Every
one carries an `X-Request-ID` (the client's, else a new one) and is logged here with it, so
the gateway's access log (which records the response's id) joins this log.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from importlib.resources import files
from typing import Any

import httpx
from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from svckit.app import base_app
from svckit.bodylimit import DEFAULT_MAX_BODY_BYTES
from svckit.problems import Unauthorized, problem_response

ASSETS = "/docs-assets"
# The gateway's own answers (gateway/dynamic/routes.yml, the errors middlewares): a stable
# code each; every one but the 500 says when to try again. Traefik drops the limiter's own
# Retry-After when it swaps the page in; its period is 1 s, so the wait is at most 1 s.
RETRY_AFTER_S = "1"
GATEWAY_PROBLEMS: dict[int, tuple[str, str, str, bool]] = {
    429: ("rate_limited", "Too many requests", "Too many requests; slow down and retry later.", True),
    500: ("gateway_error", "Gateway error", "The gateway could not handle the request.", False),
    502: ("upstream_unavailable", "Bad gateway", "The service is unavailable; retry later.", True),
    503: ("service_unavailable", "Service unavailable", "The service is unavailable; retry later.", True),
    504: ("upstream_unavailable", "Gateway timeout", "The service did not answer in time; retry later.", True),
}
ANY_METHOD = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
CACHE_S = 30.0
log = logging.getLogger("svckit.docs")


def merge_openapi(documents: list[dict[str, Any]], *, title: str, version: str) -> dict[str, Any]:
    merged: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": {},
        "components": {},
    }
    for doc in documents:
        for path, item in doc.get("paths", {}).items():
            merged["paths"].setdefault(path, {}).update(item)
        for kind, entries in doc.get("components", {}).items():
            target = merged["components"].setdefault(kind, {})
            for name, schema in entries.items():
                if name in target and target[name] != schema:
                    log.warning("component %s/%s differs between services; keeping the first", kind, name)
                    continue
                target.setdefault(name, schema)
    merged["paths"] = dict(sorted(merged["paths"].items()))
    return merged


def create_app() -> FastAPI:
    sources = [s for s in os.environ.get("DOCS_SOURCES", "").split(",") if s]
    title = "Wallet platform API"
    max_body_bytes = int(os.environ.get("DOCS_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES))
    app = base_app(
        "docs", log_level=os.environ.get("DOCS_LOG_LEVEL", "INFO"), max_body_bytes=max_body_bytes, openapi_url=None
    )
    assets = files("fastapi_offline") / "static"
    app.mount(ASSETS, StaticFiles(directory=str(assets)), name="docs-assets")
    cache: dict[str, Any] = {"at": float("-inf"), "doc": None}
    lock = threading.Lock()
    client = httpx.Client(timeout=httpx.Timeout(3.0, connect=1.0))

    def document() -> dict[str, Any]:
        with lock:
            if cache["doc"] is not None and time.monotonic() - cache["at"] < CACHE_S:
                return dict(cache["doc"])
            docs = []
            for url in sources:
                try:
                    response = client.get(url)
                    response.raise_for_status()
                    docs.append(response.json())
                except (httpx.HTTPError, ValueError) as exc:
                    log.warning("docs source %s unavailable: %s", url, type(exc).__name__)
            doc = merge_openapi(docs, title=title, version="1")
            if len(docs) == len(sources):  # cache only a complete document
                cache.update(at=time.monotonic(), doc=doc)
            return doc

    @app.get("/openapi.json", include_in_schema=False)
    def openapi() -> JSONResponse:
        return JSONResponse(document())

    @app.get("/docs", include_in_schema=False)
    def swagger() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title=title,
            swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS}/favicon.png",
        )

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url="/openapi.json",
            title=title,
            redoc_js_url=f"{ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{ASSETS}/favicon.png",
            with_google_fonts=False,
        )

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.api_route("/__unauthorized", methods=ANY_METHOD, include_in_schema=False)
    def unauthorized() -> None:
        raise Unauthorized()

    # The gateway's limit (GATEWAY_MAX_BODY_BYTES) is its own; the detail names no number.
    @app.api_route("/__payload-too-large", methods=ANY_METHOD, include_in_schema=False)
    def payload_too_large() -> JSONResponse:
        return problem_response(413, "payload_too_large", "Payload too large", "The request body is too large.")

    @app.api_route("/__gateway/{status}", methods=ANY_METHOD, include_in_schema=False)
    def gateway_problem(status: int) -> JSONResponse:
        code, title, detail, retry = GATEWAY_PROBLEMS.get(status, GATEWAY_PROBLEMS[500])
        status = status if status in GATEWAY_PROBLEMS else 500
        headers = {"Retry-After": RETRY_AFTER_S} if retry else None
        return problem_response(status, code, title, detail, headers=headers)

    return app
