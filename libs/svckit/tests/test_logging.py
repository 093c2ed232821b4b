"""The JSON log lines keep personal data of queued messages out."""

from __future__ import annotations

import json
import logging
from typing import Any

from dramatiq import Message
from dramatiq.broker import MessageProxy

from svckit.logging import configure_logging


def line(logger: str, msg: str, *args: Any) -> dict[str, Any]:
    """What the service's handler (configure_logging's) writes for this record."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    configure_logging("test")
    handler = root.handlers[0]
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    record = logging.LogRecord(logger, logging.ERROR, __file__, 1, msg, args, None)
    assert handler.filter(record)
    return json.loads(handler.format(record))  # type: ignore[no-any-return]


def test_a_failed_message_is_logged_by_actor_and_id_not_by_its_contents() -> None:
    message = Message(
        queue_name="notifier",
        actor_name="send_receipt",
        args=(),
        kwargs={"message": {"recipient": {"email": "victim.secret@example.com", "first_name": "Vic"}}},
        options={},
    )
    worker = "dramatiq.worker.WorkerThread"
    failed = line(worker, "Failed to process message %s with unhandled exception.", MessageProxy(message))
    assert failed["message"] == f"Failed to process message send_receipt#{message.message_id} with unhandled exception."
    skipped = line(worker, "Message %s was skipped.", message)
    assert "victim" not in skipped["message"]
    assert message.message_id in skipped["message"]
    assert line("notifier.actors", "sent to %s", "someone@example.com")["message"] == "sent to someone@example.com"
