"""`wait-for-schema`: exit 0 once the database's schema is at this image's migration head.

Kubernetes runs it as an initContainer of each Deployment that uses a database, in the
service's own image and with the service's own URL (`*_DATABASE_URL`, the app role), so
a new image never serves before the migration Job of its release has finished:

    auth-migrations wait            wallet-migrations wait --timeout 600
    python -m svckit.schema_wait wait -c services/wallet/alembic.ini --url-env WALLET_DATABASE_URL

The head revision(s) come from the image's migration scripts (alembic.ini's
`script_location`; no database needed), the database's from its `alembic_version`, which
every migration run grants the app role SELECT on (svckit.migrate.apply_grants). What it
sees, and what it does:

- **at the image's head**: exit 0 at once.
- **behind** (a revision the image knows, none yet, `alembic_version` missing or not
  readable: permission denied until this release's migrations have granted it, or the
  database unreachable): poll every `--interval` seconds, print "database at X, image
  needs Y" when that changes and every few seconds, and exit 1 after `--timeout` seconds
  (0: look once), saying what it saw last.
- **ahead** (a revision this image does not know): a newer release's migrations have
  run. That is what a rollback meets (`kubectl rollout undo` starts the previous image on
  the newer schema), and what every rolling update already does: the old pods keep
  serving on the new schema until they are replaced. Both work only if each release's
  migrations stay backward-compatible with the previous release's code, which a rolling
  update requires anyway; refusing here would turn a rollback into an outage, and the
  newer schema often cannot be downgraded (wallet 0004). So it prints a warning and exits
  0. `--strict` exits 1 at once instead, for a release whose migrations are known to
  break the previous code (then roll back the schema first, with the newer image).

Exit codes: 0 ready, 1 timed out (or ahead with `--strict`), 2 no usable alembic.ini.
The URL is never printed with its password, and never taken on the command line.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from svckit.db import make_engine

AT_HEAD, BEHIND, AHEAD = "at head", "behind", "ahead"
LOG_EVERY_S = 10.0


@dataclass(frozen=True)
class Image:
    """What the image's migration scripts say: their head(s), and every revision they know."""

    heads: frozenset[str]
    known: frozenset[str]

    @classmethod
    def from_ini(cls, ini: str | Path) -> Image:
        path = Path(ini)
        if not path.is_file():
            raise FileNotFoundError(f"no alembic.ini at {path.resolve()}")
        script = ScriptDirectory.from_config(Config(str(path)))
        return cls(frozenset(script.get_heads()), frozenset(s.revision for s in script.walk_revisions()))

    def verdict(self, revisions: frozenset[str]) -> str:
        if revisions == self.heads:
            return AT_HEAD
        return AHEAD if revisions - self.known else BEHIND


@dataclass(frozen=True)
class Seen:
    revisions: frozenset[str]  # empty: no alembic_version (yet), or no revision in it
    error: str = ""  # why it could not be read, if it could not


def database_revisions(engine: Engine) -> Seen:
    """The revisions in the database's `alembic_version`, or why they could not be read."""
    url = engine.url
    file = url.database if url.get_backend_name() == "sqlite" and url.database != ":memory:" else None
    if file and not Path(file).exists():  # connecting would create an empty file
        return Seen(frozenset(), "no database file yet")
    try:
        with engine.connect() as conn:
            return Seen(frozenset(MigrationContext.configure(conn).get_current_heads()))
    except DBAPIError as exc:
        first = str(exc.orig).strip().splitlines()
        return Seen(frozenset(), first[0] if first else type(exc.orig).__name__)
    except SQLAlchemyError as exc:
        return Seen(frozenset(), str(exc).strip().splitlines()[0])


def _names(revisions: frozenset[str]) -> str:
    return ", ".join(sorted(revisions)) or "no revision"


def wait_for_schema(
    image: Image,
    engine: Engine,
    *,
    timeout_s: float,
    interval_s: float = 2.0,
    strict: bool = False,
    log_every_s: float = LOG_EVERY_S,
    say: Callable[[str], None] = print,
) -> int:
    """Poll until the database is at the image's head: the exit code (see the module)."""
    needs = _names(image.heads)
    deadline = time.monotonic() + timeout_s
    said, said_at = "", float("-inf")
    while True:
        seen = database_revisions(engine)
        verdict = image.verdict(seen.revisions) if not seen.error else BEHIND
        if verdict == AT_HEAD:
            say(f"database at {needs}: this image's head, ready")
            return 0
        if verdict == AHEAD:
            unknown = _names(seen.revisions - image.known)
            if strict:
                say(
                    f"database at {_names(seen.revisions)}, which this image does not know ({unknown}): refused (--strict)"
                )
                return 1
            say(
                f"WARNING: database at {_names(seen.revisions)}, newer than this image (it needs {needs} and does "
                f"not know {unknown}): starting anyway, as on a rollback; the newer migrations must be "
                "backward-compatible with this image's code (--strict refuses)"
            )
            return 0
        line = f"database at {_names(seen.revisions)}, image needs {needs}"
        if seen.error:
            line += f" ({seen.error})"
        now = time.monotonic()
        if now >= deadline:
            say(
                f"timed out after {timeout_s:g} s: {line}; has this release's migration Job "
                "(alembic upgrade head, as the owner role) run and succeeded?"
            )
            return 1
        if line != said or now - said_at >= log_every_s:
            say(line)
            said, said_at = line, now
        time.sleep(max(0.0, min(interval_s, deadline - now)))


def main(
    argv: list[str] | None = None,
    *,
    prog: str = "python -m svckit.schema_wait",
    ini: str | None = None,
    database_url: Callable[[], str] | None = None,
) -> int:
    """The command line; a service passes its alembic.ini (relative to the image's WORKDIR)
    and its own database URL setting (`*-migrations wait`)."""
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    wait = commands.add_parser("wait", help="exit 0 once the database is at this image's migration head")
    wait.add_argument("-c", "--config", default=ini, required=ini is None, help=f"the image's alembic.ini ({ini})")
    wait.add_argument("--timeout", type=float, default=600.0, help="seconds before giving up with exit 1 (600)")
    wait.add_argument("--interval", type=float, default=2.0, help="seconds between two looks (2)")
    wait.add_argument("--strict", action="store_true", help="exit 1 when the database is ahead of the image")
    if database_url is None:
        wait.add_argument("--url-env", required=True, help="the environment variable holding the database URL")
    args = parser.parse_args(argv)

    def say(line: str) -> None:
        print(f"{prog.split()[-1]} wait: {line}", flush=True)

    try:
        image = Image.from_ini(args.config)
    except (FileNotFoundError, CommandError) as exc:
        say(f"{exc} (run from the image's WORKDIR, /app, or pass -c)")
        return 2
    if database_url is None:
        url = os.environ.get(args.url_env, "")
        if not url:
            say(f"{args.url_env} is not set")
            return 2
    else:
        url = database_url()
    say(f"image needs {_names(image.heads)}; database {make_url(url).render_as_string(hide_password=True)}")
    engine = make_engine(url, pool_size=1, max_overflow=0)
    try:
        return wait_for_schema(
            image, engine, timeout_s=args.timeout, interval_s=args.interval, strict=args.strict, say=say
        )
    finally:
        engine.dispose()


if __name__ == "__main__":
    sys.exit(main())
