"""`wallet-relay`: the outbox relay (wallet.outbox, svckit.outbox.relay_main) and its subcommands.

`wallet-relay alive` is the relay's liveness probe: it is answered before anything heavy
is imported (svckit.heartbeat is standard library only), so a probe takes milliseconds
where importing the relay takes seconds on a busy node.
"""

from __future__ import annotations

import sys

from svckit import heartbeat

ENV_PREFIX = "WALLET_"  # wallet.config.Settings' env_prefix (a test holds them together)


def main() -> None:
    if sys.argv[1:2] == ["alive"]:
        sys.exit(heartbeat.alive_main("wallet", ENV_PREFIX, sys.argv[2:]))
    from wallet.outbox import main as relay

    relay()
