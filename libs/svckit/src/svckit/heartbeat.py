"""Liveness for a loop with no HTTP port to probe (the outbox relays): the loop touches a
file after each round, and `<service>-relay alive` checks how long ago that was.

Standard library only, on purpose: a probe starts a fresh interpreter every few seconds,
and importing the relay itself (SQLAlchemy, Dramatiq, the models) takes seconds on a busy
node, past an exec probe's default one-second timeout. Nothing here connects anywhere: a
relay whose database or Redis is down still completes its rounds (each one logs its error
and sleeps), and restarting it would not bring them back; a relay stuck inside a round
(a connection that hangs without an error, a deadlocked thread) stops touching the file.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger("svckit.heartbeat")

# How old the file may be before `alive` fails. A healthy round takes milliseconds (one
# batch of at most 100 rows, a few indexed statements, a Redis pipeline) plus the 0.2 s
# idle sleep. A failing round ends at its first bounded wait, and the loop touches the
# file after it anyway: Postgres connect 5 s, lock 2 s, statement 10 s
# (BaseServiceSettings.db_*), a Redis call 2 s (the relay's client). A round slow without
# failing runs about eight statements (claim and stamp, reconcile's select and updates,
# the dead-letter recheck, two counts): only a database answering each near its 10 s
# limit comes close to 60 s, and a restart then costs nothing (delivery is at least
# once). Past that the round is stuck: a connection to a vanished peer (TCP keepalive
# notices after 30 + 3 x 10 s, a pending write only after minutes of retransmits) or a
# deadlocked thread. Probes add their own period x failureThreshold on top.
DEFAULT_MAX_AGE_S = 60.0


def default_path(service: str) -> str:
    # /tmp is the writable emptyDir of the Kubernetes pods (read-only root filesystem).
    return f"/tmp/{service}-relay.alive"  # noqa: S108  # nosec B108 - a marker file, no secret, never read back as data


def path_for(service: str, configured: str = "") -> str:
    """The heartbeat file: the setting (`<PREFIX>RELAY_HEARTBEAT_FILE`) or the default."""
    return configured or default_path(service)


def path_from_env(service: str, env_prefix: str, environ: Mapping[str, str] | None = None) -> str:
    """`<PREFIX>RELAY_HEARTBEAT_FILE` read as BaseServiceSettings.relay_heartbeat_file reads
    it (names case-insensitive), without importing pydantic."""
    wanted = f"{env_prefix}relay_heartbeat_file".lower()
    environ = os.environ if environ is None else environ
    configured = next((value for name, value in environ.items() if name.lower() == wanted), "")
    return path_for(service, configured)


class Heartbeat:
    """Touches `path` after each round of a loop. A failure to is logged (once until it
    works again), never raised: the probe then reports the relay dead, which is the truth
    as far as anyone can see."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._failing = False

    def beat(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.touch()
        except OSError as exc:
            if not self._failing:
                log.warning("cannot touch the heartbeat file %s: %s", self.path, exc)
            self._failing = True
        else:
            self._failing = False


def check(path: str | os.PathLike[str], max_age_s: float = DEFAULT_MAX_AGE_S) -> tuple[bool, str]:
    """Whether `path` was touched within `max_age_s`, and a one-line reason."""
    try:
        mtime = os.stat(path).st_mtime
    except FileNotFoundError:
        return False, f"{path} does not exist: the loop has not completed a round"
    except OSError as exc:
        return False, f"cannot read {path}: {exc.strerror}"
    age = time.time() - mtime
    if age > max_age_s:
        return False, f"last round {age:.0f}s ago, over {max_age_s:g}s: the loop is stuck"
    return True, f"last round {max(age, 0.0):.1f}s ago"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-age",
        type=float,
        default=DEFAULT_MAX_AGE_S,
        metavar="SECONDS",
        help=f"the longest a round may take (default {DEFAULT_MAX_AGE_S:g})",
    )


def alive(path: str, max_age_s: float) -> int:
    """The `alive` subcommand's answer: 0 (and the age on stdout) or 1 (and why on stderr)."""
    ok, reason = check(path, max_age_s)
    print(reason, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def alive_main(service: str, env_prefix: str, argv: list[str]) -> int:
    """`<service>-relay alive [--max-age SECONDS]` without the relay's imports."""
    parser = argparse.ArgumentParser(
        prog=f"{service}-relay alive", description="Exit 0 if the relay loop completed a round recently, else 1."
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    return alive(path_from_env(service, env_prefix), args.max_age)
