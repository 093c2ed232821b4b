"""A local stand-in for Brevo's transactional email API, for tests (the only fake).

A real HTTP server that speaks `POST /v3/smtp/email` as Brevo does: it checks the
`api-key` header and the body's shape, answers 201 with a messageId, refuses a repeated
`headers.idempotencyKey` with 400 duplicate_parameter, and records every email it
accepted. It can be told to misbehave for the next N calls:

    POST /_stub/fail {"mode": "500" | "429" | "400" | "slow", "count": N, "delay_s": 3}
    GET  /_stub/emails   -> {"emails": [accepted bodies], "calls": N, "duplicates": N, "connections": N, ...}
    GET  /_stub/received -> {"received": [{"key", "at"}], "calls": N, "connections": N}  (no bodies: cheap to poll)
    POST /_stub/reset

It speaks HTTP/1.1 with keep-alive, as Brevo does, and counts the TCP connections it
accepted (`connections`): a client that opens one per email shows as many as its calls.

"slow" records the email first and answers after `delay_s`: Brevo has it, but the
caller may die (or time out) before it hears so.

    python tests/tools/brevo_stub.py --port 18700 --api-key test-key
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class State:
    def __init__(self, api_key: str) -> None:
        self.api_key = api_key
        self.lock = threading.Lock()
        self.emails: list[dict[str, Any]] = []
        self.keys: set[str] = set()
        self.failures: list[dict[str, Any]] = []
        self.calls = 0
        self.duplicates = 0
        self.received: list[dict[str, Any]] = []  # when each accepted email arrived
        self.connections = 0  # TCP connections accepted (since the last reset)


def _missing(body: dict[str, Any]) -> str | None:
    sender = body.get("sender")
    if not isinstance(sender, dict) or not sender.get("email"):
        return "sender.email"
    to = body.get("to")
    if not isinstance(to, list) or not to or not all(isinstance(t, dict) and t.get("email") for t in to):
        return "to"
    if not body.get("subject") and not body.get("templateId"):
        return "subject"
    if not (body.get("htmlContent") or body.get("textContent") or body.get("templateId")):
        return "htmlContent"
    return None


def make_handler(state: State) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: every answer carries its content-length
        raw_body = b""
        disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall

        def setup(self) -> None:
            super().setup()
            with state.lock:
                state.connections += 1

        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def _json(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            # The caller may have given up (timed out, or was killed), as with the real Brevo.
            try:
                self._write(status, data, headers)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

        def _write(self, status: int, data: bytes, headers: dict[str, str] | None) -> None:
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _read(self) -> bytes:
            """The request's body, read in full before any answer (the connection stays in step)."""
            length = int(self.headers.get("content-length") or 0)
            return self.rfile.read(length) if length else b""

        def _body(self) -> Any:
            return json.loads(self.raw_body or b"{}")

        def do_GET(self) -> None:
            if self.path == "/_stub/emails":
                with state.lock:
                    self._json(
                        200,
                        {
                            "emails": list(state.emails),
                            "calls": state.calls,
                            "duplicates": state.duplicates,
                            "pending_failures": len(state.failures),
                            "received": list(state.received),
                            "connections": state.connections,
                        },
                    )
            elif self.path == "/_stub/received":
                with state.lock:
                    self._json(
                        200, {"received": list(state.received), "calls": state.calls, "connections": state.connections}
                    )
            else:
                self._json(404, {"code": "document_not_found", "message": "not found"})

        def do_POST(self) -> None:
            self.raw_body = self._read()
            if self.path == "/_stub/fail":
                spec = self._body()
                with state.lock:
                    state.failures += [spec] * int(spec.get("count", 1))
                self._json(200, {"queued": len(state.failures)})
            elif self.path == "/_stub/reset":
                with state.lock:
                    state.emails.clear()
                    state.keys.clear()
                    state.failures.clear()
                    state.calls = 0
                    state.duplicates = 0
                    state.received.clear()
                    state.connections = 0
                self._json(200, {})
            elif self.path == "/v3/smtp/email":
                self._send_email()
            else:
                self._json(404, {"code": "document_not_found", "message": "not found"})

        def _send_email(self) -> None:
            with state.lock:
                state.calls += 1
                failure = state.failures.pop(0) if state.failures else None
            if self.headers.get("api-key") != state.api_key:
                self._json(401, {"code": "unauthorized", "message": "Key not found"})
                return
            try:
                body = self._body()
            except ValueError:
                self._json(400, {"code": "invalid_parameter", "message": "body is not JSON"})
                return
            missing = _missing(body) if isinstance(body, dict) else "body"
            if missing:
                self._json(400, {"code": "missing_parameter", "message": f"{missing} is missing"})
                return
            mode = (failure or {}).get("mode")
            if mode == "500":
                self._json(500, {"code": "internal_error", "message": "try again"})
                return
            if mode == "429":
                self._json(
                    429,
                    {"code": "too_many_requests", "message": "slow down"},
                    {
                        "x-sib-ratelimit-limit": "1000",
                        "x-sib-ratelimit-remaining": "0",
                        "x-sib-ratelimit-reset": str(failure.get("reset", 1)),
                    },
                )
                return
            if mode == "400":
                self._json(400, {"code": "invalid_parameter", "message": "sender is not valid"})
                return
            key = (body.get("headers") or {}).get("idempotencyKey")
            with state.lock:
                if key and key in state.keys:
                    duplicate = True
                    state.duplicates += 1
                else:
                    duplicate = False
                    if key:
                        state.keys.add(key)
                    state.emails.append(body)
                    state.received.append({"key": key, "at": time.time()})
            if duplicate:
                self._json(400, {"code": "duplicate_parameter", "message": "idempotencyKey already used"})
                return
            if mode == "slow":
                time.sleep(float(failure.get("delay_s", 3)))
            self._json(201, {"messageId": f"<{uuid.uuid4().hex}@stub.brevo>"})

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--api-key", required=True)
    args = parser.parse_args()
    server = ThreadingHTTPServer((args.host, args.port), make_handler(State(args.api_key)))
    print(f"brevo stub on http://{args.host}:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
