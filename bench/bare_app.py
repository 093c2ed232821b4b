"""The bare FastAPI ceiling of `make bench`: one route, no middleware, no database.

bench.py serves it with one uvicorn process (the stack's uvicorn flags) behind the stack's
own Traefik binary and static configuration, and drives it like the stack's trivial
endpoint, so "stack trivial / bare" is what the platform's layers cost on this machine.

    uvicorn --app-dir bench bare_app:app
"""

from __future__ import annotations

from fastapi import FastAPI

app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)


@app.get("/bare")
async def bare() -> dict[str, object]:
    return {"keys": [{"kty": "OKP", "crv": "Ed25519", "kid": "bench"}]}
