"""Entry point of the workers: `dramatiq notifier.worker` (broker first, then the actors)."""

from notifier.broker import setup_broker
from notifier.config import get_settings
from svckit.logging import configure_logging

configure_logging("notifier", get_settings().log_level)
get_settings().require_service_token()  # a worker with a guessable credential does not start
broker = setup_broker()

import notifier.actors  # noqa: E402, F401  (registers the actors on the broker above)
