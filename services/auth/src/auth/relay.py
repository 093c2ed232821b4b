"""`auth-relay`: the outbox relay (auth.outbox, svckit.outbox.relay_main) and its subcommands.

`auth-relay alive` is the relay's liveness probe: it is answered before anything heavy
is imported (svckit.heartbeat is standard library only), so a probe takes milliseconds
where importing the relay takes seconds on a busy node.
"""

from __future__ import annotations

import sys

from svckit import heartbeat

ENV_PREFIX = "AUTH_"  # auth.config.Settings' env_prefix (a test holds them together)


def main() -> None:
    if sys.argv[1:2] == ["alive"]:
        sys.exit(heartbeat.alive_main("auth", ENV_PREFIX, sys.argv[2:]))
    from auth.outbox import main as relay

    relay()
