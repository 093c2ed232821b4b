"""JSON log lines, each carrying the request id of the work it belongs to.

Written in the caller's thread, as they come. A QueueHandler and QueueListener (the line
formatted and written by a thread of its own) measured worse here (bench/plumbing.py):
about 12 µs of the request's time instead of 10, but some 30 µs of the process's CPU for
each line instead of 10, the hand-off between threads costing more than the write saved.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any

from pythonjsonlogger.json import JsonEncoder, JsonFormatter

from svckit.requestid import current_request_id


def _redacted(arg: Any) -> Any:
    """A Dramatiq message (or its worker-side proxy) as its actor and id: its str() is the
    whole call, the recipient's address and names included, which Dramatiq's worker logs
    on every failed attempt."""
    if hasattr(arg, "actor_name") and hasattr(arg, "message_id"):
        return f"{arg.actor_name}#{arg.message_id}"
    return arg


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", None):
            record.request_id = current_request_id()
        record.__dict__.pop("color_message", None)  # uvicorn's ANSI copy of the message
        if record.name.startswith("dramatiq") and isinstance(record.args, tuple):
            record.args = tuple(_redacted(a) for a in record.args)
        return True


class _JsonLines(JsonFormatter):
    """python-json-logger's output, field for field, built without its generic machinery
    (which measured about four times slower per line): the fixed fields, the exception,
    every extra attribute in the record's order, the time. A dict message, or an option
    this setup never passes, goes through python-json-logger itself."""

    def __init__(self, service: str) -> None:
        super().__init__(
            "{levelname}{name}{message}",
            style="{",
            rename_fields={"levelname": "level", "name": "logger"},
            static_fields={"service": service},
            timestamp="time",  # ISO 8601, UTC
        )
        self._service = service
        self._encode = JsonEncoder(ensure_ascii=True).encode  # built once, not once a line
        self._skip = frozenset(self._skip_fields)

    def format(self, record: logging.LogRecord) -> str:
        if isinstance(record.msg, dict):
            return super().format(record)
        record.message = message = record.getMessage()
        data: dict[str, Any] = {
            "level": record.levelname,
            "logger": record.name,
            "message": message,
            "service": self._service,
        }
        if record.exc_info:
            data["exc_info"] = self.formatException(record.exc_info)
        if not data.get("exc_info") and record.exc_text:
            data["exc_info"] = record.exc_text
        if record.stack_info:
            data["stack_info"] = self.formatStack(record.stack_info)
        skip, rename = self._skip, self.rename_fields
        for key, value in record.__dict__.items():
            if key not in skip and not (isinstance(key, str) and key.startswith("_")):
                data[rename.get(key, key)] = value
        data["time"] = datetime.fromtimestamp(record.created, tz=UTC).isoformat()
        return self.prefix + self._encode(data)


def configure_logging(service: str, level: str = "INFO") -> None:
    """Route every logger (ours, uvicorn's, alembic's) through one JSON handler on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonLines(service))
    handler.addFilter(_RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
    # Our middleware writes the access line (with the request id); uvicorn's would repeat it.
    logging.getLogger("uvicorn.access").disabled = True
