"""What each layer of our per-request plumbing costs, in-process: no sockets, no gateway.

Drives each ASGI app directly (scope, receive and send built here, the headers Traefik
adds) with GET requests to a trivial route, one configuration per fresh interpreter (the
multiprocess metrics mode is chosen at prometheus_client's import, logging is global):

  router          FastAPI's router behind only the AsyncExitStackMiddleware it needs
  bare            a one-route FastAPI app (async def route)
  bare-sync       the same with a `def` route (run in the thread pool, like /jwks.json)
  +bodylimit      bare + svckit's BodyLimitMiddleware
  +metrics        bare + MetricsMiddleware
  +requestid      bare + RequestIdMiddleware (which writes the access log line)
  +problems       bare + the problem handlers (nothing per request unless an error)
  base_app        the full svckit stack (base_app) around the same route
  auth-jwks       the real auth app (create_app: SQLite, a temp keys dir, no Redis) and
                  its GET /.well-known/jwks.json

each with logs at INFO to /dev/null ("null"), to a file ("file"), or not at all ("off":
level WARNING, so the access line is dropped before it is built), and with or without
PROMETHEUS_MULTIPROC_DIR ("mp": file-backed metric values). stderr (fd 2) is pointed at
the sink, so the services' own logging setup is measured as it runs.

Two figures per configuration, both µs per request, the best of --rounds rounds:
  wall  what the request waits on the event loop (the request path);
  cpu   the process's CPU time (every thread) including draining queued log lines: what
        the request costs the machine, so work moved off the request path still counts.

    .venv/bin/python bench/plumbing.py [--requests 20000] [--rounds 5] [--only base_app,bare]
    mkdir /tmp/main && git archive main | tar -x -C /tmp/main
    .venv/bin/python bench/plumbing.py --baseline /tmp/main     # before/after, interleaved
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import logging.handlers
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# name, builder, log sink, multiprocess metrics
CONFIGS: list[tuple[str, str, str, bool]] = [
    ("router", "router", "off", False),
    ("bare", "bare", "off", False),
    ("bare-sync", "bare-sync", "off", False),
    ("+bodylimit", "bodylimit", "off", False),
    ("+metrics", "metrics", "off", False),
    ("+metrics mp", "metrics", "off", True),
    ("+requestid log off", "requestid", "off", False),
    ("+requestid log null", "requestid", "null", False),
    ("+requestid log file", "requestid", "file", False),
    ("+problems", "problems", "off", False),
    ("base_app log off", "base_app", "off", False),
    ("base_app log null", "base_app", "null", False),
    ("base_app log file", "base_app", "file", False),
    ("base_app log null mp", "base_app", "null", True),
    ("auth-jwks log null", "auth", "null", False),
    ("auth-jwks log file", "auth", "file", False),
    ("auth-jwks log null mp", "auth", "null", True),
]

# What Traefik forwards for a plain GET (the headers scanned by every middleware).
HEADERS = [
    (b"host", b"127.0.0.1:8000"),
    (b"user-agent", b"wrk"),
    (b"accept", b"*/*"),
    (b"accept-encoding", b"gzip"),
    (b"x-forwarded-for", b"10.0.0.7"),
    (b"x-forwarded-host", b"127.0.0.1:8000"),
    (b"x-forwarded-port", b"8000"),
    (b"x-forwarded-proto", b"http"),
    (b"x-forwarded-server", b"gateway"),
    (b"x-real-ip", b"10.0.0.7"),
]


def scope_for(path: str) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": HEADERS,
        "client": ("10.0.0.7", 51000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }


def build(builder: str, workdir: Path) -> tuple[Any, str, Any]:
    """(the ASGI app, the path to GET, the app whose lifespan to run or None)."""
    from fastapi import FastAPI

    def route(app: FastAPI, sync: bool = False) -> FastAPI:
        if sync:

            @app.get("/ping")
            def ping_sync() -> dict[str, str]:
                return {"status": "ok"}
        else:

            @app.get("/ping")
            async def ping() -> dict[str, str]:
                return {"status": "ok"}

        return app

    def bare() -> FastAPI:
        return FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    if builder == "router":
        from fastapi.middleware.asyncexitstack import AsyncExitStackMiddleware

        app = route(bare())
        return AsyncExitStackMiddleware(app.router), "/ping", None  # the one the router needs
    if builder in ("bare", "bare-sync"):
        return route(bare(), sync=builder == "bare-sync"), "/ping", None
    if builder == "bodylimit":
        from svckit.bodylimit import BodyLimitMiddleware

        app = route(bare())
        app.add_middleware(BodyLimitMiddleware)
        return app, "/ping", None
    if builder == "metrics":
        from svckit.metrics import MetricsMiddleware

        app = route(bare())
        app.add_middleware(MetricsMiddleware, service="bench")
        return app, "/ping", None
    if builder == "requestid":  # request id, access log, 500 fallback (no metrics)
        from svckit import requestid

        app = route(bare())
        app.add_middleware(getattr(requestid, "RequestMiddleware", None) or requestid.RequestIdMiddleware)
        return app, "/ping", None
    if builder == "problems":
        from svckit.problems import document_problems, install_problem_handlers

        app = route(bare())
        install_problem_handlers(app)
        document_problems(app)
        return app, "/ping", None
    if builder == "base_app":
        from svckit.app import base_app

        return route(base_app("bench", log_level="INFO")), "/ping", None
    if builder == "auth":
        from auth.config import Settings
        from auth.main import create_app

        settings = Settings(
            database_url=f"sqlite:///{workdir / 'auth.db'}",
            keys_dir=str(workdir / "keys"),
            redis_url="redis://127.0.0.1:1/0",  # never called by this route
            service_token=secrets.token_urlsafe(32),
            metrics_port=0,
        )
        app = create_app(settings)
        return app, "/.well-known/jwks.json", app
    raise SystemExit(f"unknown builder {builder}")


def drain_logs() -> None:
    """Wait until every queued log line is written (a QueueHandler's listener)."""
    from svckit import logging as svclogging

    if hasattr(svclogging, "flush_logs"):
        svclogging.flush_logs()
        return
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.handlers.QueueHandler):
            queue = handler.queue
            if hasattr(queue, "join"):
                queue.join()
        else:
            handler.flush()


async def drive(app: Any, path: str, lifespan_app: Any, requests: int, rounds: int, warmup: int) -> dict[str, Any]:
    base = scope_for(path)
    request = {"type": "http.request", "body": b"", "more_body": False}
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return request

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    async def one_round(n: int) -> tuple[float, float]:
        drain_logs()
        c0, t0 = time.process_time(), time.perf_counter()
        for _ in range(n):
            await app(dict(base, state={}), receive, send)
        t1 = time.perf_counter()
        drain_logs()
        c1 = time.process_time()
        return (t1 - t0) / n * 1e6, (c1 - c0) / n * 1e6

    async def run() -> dict[str, Any]:
        await one_round(warmup)
        results = [await one_round(requests // rounds) for _ in range(rounds)]
        walls, cpus = [r[0] for r in results], [r[1] for r in results]
        bad = [s for s in statuses if s != 200]
        if bad:
            raise SystemExit(f"{len(bad)} responses were not 200: {sorted(set(bad))}")
        return {
            "wall": min(walls),
            "wall_median": statistics.median(walls),
            "cpu": min(cpus),
            "cpu_median": statistics.median(cpus),
        }

    if lifespan_app is None:
        return await run()
    async with lifespan_app.router.lifespan_context(lifespan_app):
        return await run()


def child(builder: str, sink: str, requests: int, rounds: int, warmup: int) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="bench-plumbing-"))
    real_stderr = os.dup(2)
    target = {"off": os.devnull, "null": os.devnull, "file": str(workdir / "log.jsonl")}[sink]
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(fd, 2)  # the services log to stderr: point it at the sink
    os.close(fd)
    try:
        app, path, lifespan_app = build(builder, workdir)
        if builder in ("router", "bare", "bare-sync", "bodylimit", "metrics", "requestid", "problems"):
            from svckit.logging import configure_logging

            configure_logging("bench", "INFO")  # what base_app does
        if sink == "off":
            logging.getLogger().setLevel(logging.WARNING)
        try:
            import uvloop

            runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
        except ImportError:
            runner = asyncio.Runner()
        with runner:
            result = runner.run(drive(app, path, lifespan_app, requests, rounds, warmup))
        drain_logs()
        if sink == "file":
            lines = (workdir / "log.jsonl").read_text().count("\n")
            result["log_lines"] = lines
    finally:
        os.dup2(real_stderr, 2)
    print(json.dumps(result))


def run_child(builder: str, sink: str, mp: bool, args: argparse.Namespace, tree: str | None) -> dict[str, Any] | str:
    env = dict(os.environ)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    if tree:  # another checkout's svckit and auth shadow the installed (editable) ones
        paths = [str(Path(tree) / "libs/svckit/src"), str(Path(tree) / "services/auth/src")]
        env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    with tempfile.TemporaryDirectory(prefix="bench-prom-") as prom:
        if mp:
            env["PROMETHEUS_MULTIPROC_DIR"] = prom
        command = [sys.executable, __file__, "--child", builder, sink]
        command += ["--requests", str(args.requests), "--rounds", str(args.rounds), "--warmup", str(args.warmup)]
        out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["?"])[-1]
        return f"n/a ({last[:60]})"
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def parent(args: argparse.Namespace) -> None:
    only = set(args.only.split(",")) if args.only else None
    trees: list[tuple[str, str | None]] = [("", None)]
    if args.baseline:
        trees = [("before ", args.baseline), ("after ", None)]
    rows: dict[str, dict[str, dict[str, Any]]] = {label: {} for label, _ in trees}
    print(f"{args.requests} GET requests per configuration ({args.rounds} rounds, best round), µs/request")
    if args.baseline:
        print(f"before: {args.baseline}; after: this checkout (each configuration run before, then after)")
    head = "".join(f"{label + 'wall':>12}{label + 'cpu':>12}" for label, _ in trees)
    print(f"{'configuration':<24}{head}  layer (Δ wall/cpu vs)")
    for name, builder, sink, mp in CONFIGS:
        if only and name not in only and builder not in only:
            continue
        line = f"{name:<24}"
        deltas = []
        for label, tree in trees:
            row = run_child(builder, sink, mp, args, tree)
            if isinstance(row, str):
                line += f"{row:>24}"[:24]
                continue
            rows[label][name] = row
            line += f"{row['wall']:>12.1f}{row['cpu']:>12.1f}"
            ref = reference(name, rows[label])
            if ref:
                base = rows[label][ref]
                deltas.append(f"{label}{row['wall'] - base['wall']:+.1f}/{row['cpu'] - base['cpu']:+.1f}")
        ref_name = reference(name, next(iter(rows.values())) | rows[trees[-1][0]])
        print(f"{line}  {' '.join(deltas)}{' vs ' + ref_name if ref_name and deltas else ''}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


def reference(name: str, rows: dict[str, dict[str, Any]]) -> str | None:
    """What a configuration's difference is measured against (its layer's cost)."""
    refs: dict[str, str] = {
        "bare": "router",
        "bare-sync": "bare",
        "+metrics mp": "+metrics",
        "+requestid log null": "+requestid log off",
        "+requestid log file": "+requestid log null",
        "base_app log null": "base_app log off",
        "base_app log file": "base_app log null",
        "base_app log null mp": "base_app log null",
        "auth-jwks log null": "base_app log null",
        "auth-jwks log file": "auth-jwks log null",
        "auth-jwks log null mp": "auth-jwks log null",
    }
    ref = refs.get(name, "bare" if name != "router" else None)
    return ref if ref in rows else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=20_000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2_000)
    p.add_argument("--only", default="", help="comma-separated configuration or builder names")
    p.add_argument("--json", default="", help="also write the figures to this file")
    p.add_argument(
        "--baseline", default="", help="another checkout (git archive main) to measure first, for a before/after table"
    )
    p.add_argument("--child", nargs=2, metavar=("BUILDER", "SINK"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.requests, args.rounds, args.warmup)
    else:
        parent(args)


if __name__ == "__main__":
    main()
