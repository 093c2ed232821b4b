"""End-to-end: start the real stack with the same launcher as `make run`, on free ports,
and talk to it only over HTTP through the gateway (GATEWAY_URL).

If GATEWAY_URL is set, the tests use that running stack instead of starting one; with it,
BREVO_STUB_URL names a Brevo stand-in that stack's notifier sends to (else one starts here),
and STACK_EXEC a command prefix with `{service}` (e.g. `docker-compose ... exec -T {service}`)
that runs the platform's commands inside that stack (`make test-compose` sets all three).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[2]
# Which container of an external stack (STACK_EXEC) runs each of the platform's commands.
COMMAND_SERVICE = {
    "wallet-audit": "wallet",
    "notifier-dlq": "notifier",
    "auth-relay": "auth-relay",
    "wallet-relay": "wallet-relay",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Stack:
    url: str
    var: Path
    process: subprocess.Popen[bytes] | None
    stack_id: str | None
    wallet_database_url: str = ""
    redis_url: str = ""
    env: dict[str, str] | None = None
    ports: dict[str, int] | None = None
    exec_prefix: str | None = None

    def command(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run one of the platform's commands (`notifier-dlq`, ...) with this stack's settings."""
        env = {**os.environ, **(self.env or {})}
        argv = [str(Path(sys.executable).parent / args[0]), *args[1:]]
        if self.exec_prefix is not None:
            argv = [*shlex.split(self.exec_prefix.format(service=COMMAND_SERVICE[args[0]])), *args]
        return subprocess.run(
            argv,
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30) -> int:
        assert self.process is not None
        self.process.send_signal(sig)
        return self.process.wait(timeout)


def start_stack(var: Path, **env: str) -> Stack:
    port = free_port()
    full_env = {
        **os.environ,
        "VAR_DIR": str(var),
        "GATEWAY_PORT": str(port),
        "STACK_PORTS": "auto",
        "AUTH_BCRYPT_ROUNDS": "4",  # real bcrypt, test cost
        "WALLET_REPLICAS": "2",  # so idempotency locks are exercised across processes
        **env,
    }
    full_env.pop("REDIS_URL", None) if "REDIS_URL" not in env else None
    log = var.parent / f"{var.name}-launcher.log"
    with log.open("wb") as out:  # the launcher writes to its own copy of the file
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "deploy" / "local" / "stack.py")],
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    stack_file = var / "run" / "stack.json"
    deadline = time.monotonic() + 90
    try:
        while not stack_file.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log.read_bytes()[-3000:].decode(errors="replace")
                raise RuntimeError(f"stack did not start; see {log}:\n{tail}")
            time.sleep(0.2)
        state = json.loads(stack_file.read_text())
        wallet_db = full_env.get("WALLET_DATABASE_URL", f"sqlite:///{var}/data/wallet.db")
        return Stack(
            url=state["gateway_url"],
            var=var,
            process=process,
            stack_id=state["stack_id"],
            wallet_database_url=wallet_db,
            redis_url=state["redis_url"],
            env={**state["env"], **env},
            ports={**state["ports"], **{f"wallet{i + 1}": p for i, p in enumerate(state["wallet_ports"])}},
        )
    except BaseException:  # whatever failed after the launch, leave none of its processes running
        try:
            _stop_launcher(process, var)
        except Exception as exc:  # the launch's own failure is the one to report
            print(f"stopping the stack's processes failed: {exc!r}", file=sys.stderr)
        raise


def _stop_launcher(process: subprocess.Popen[bytes], var: Path) -> None:
    """Ctrl-C to the launcher, which stops every process it started. If it hangs it is
    killed, and then (as when it had died already) whatever it left: honcho starts each
    process in a session of its own, named on its command line by the stack's VAR_DIR."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
            return
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    marker = f"{var}/".encode()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if marker in (proc / "cmdline").read_bytes() and int(proc.name) != os.getpid():
                os.killpg(int(proc.name), signal.SIGKILL)  # a session leader: its group with it
        except (OSError, ValueError):  # gone meanwhile, or not a group leader
            continue


def _admin() -> Engine:
    url = make_url(os.environ["TEST_DATABASE_URL"]).set(database="postgres")
    return create_engine(url, isolation_level="AUTOCOMMIT")


def _drop(conn: Connection, name: str) -> None:
    conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    for role in (f"{name}_app", f"{name}_owner"):  # cluster-wide: named after their database
        conn.execute(text(f'DROP ROLE IF EXISTS "{role}"'))


def drop_databases(env: dict[str, str]) -> None:
    """Drop what postgres_stack_env made: the databases, then their roles."""
    admin = _admin()
    with admin.connect() as conn:
        for name in {make_url(v).database for k, v in env.items() if k.endswith("_DATABASE_URL")}:
            _drop(conn, str(name))
    admin.dispose()


def postgres_stack_env(tag: str) -> dict[str, str] | None:
    """Fresh auth and wallet databases on TEST_DATABASE_URL's server, or None without one.
    As in production (deploy/README.md, "Database roles"): each is owned by `<db>_owner`, who
    runs the migrations, and the services connect as `<db>_app`, granted what they need."""
    base = os.environ.get("TEST_DATABASE_URL")
    if not base:
        return None
    url = make_url(base)
    env = {}
    admin = _admin()
    with admin.connect() as conn:
        for service in ("auth", "wallet"):
            name = f"{url.database}_{tag}_{service}"
            owner, app = f"{name}_owner", f"{name}_app"
            _drop(conn, name)
            for role in (owner, app):
                conn.execute(text(f"CREATE ROLE \"{role}\" LOGIN PASSWORD '{role}'"))
            conn.execute(text(f'CREATE DATABASE "{name}" OWNER "{owner}"'))
            conn.execute(text(f'REVOKE ALL ON DATABASE "{name}" FROM PUBLIC'))
            conn.execute(text(f'GRANT CONNECT ON DATABASE "{name}" TO "{app}"'))
            prefix = service.upper()
            for key, role in ((f"{prefix}_DATABASE_URL", app), (f"{prefix}_MIGRATION_DATABASE_URL", owner)):
                env[key] = url.set(database=name, username=role, password=role).render_as_string(hide_password=False)
    admin.dispose()
    return env


class BrevoStub:
    """Client of tests/tools/brevo_stub.py, the stand-in for Brevo's API."""

    API_KEY = "e2e-brevo-key"

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=10)

    def state(self) -> dict[str, object]:
        return dict(self.http.get("/_stub/emails").json())

    def emails_to(self, address: str) -> list[dict[str, object]]:
        emails = self.state()["emails"]
        assert isinstance(emails, list)
        return [e for e in emails if e["to"][0]["email"] == address]

    def fail(self, mode: str, count: int = 1, **extra: object) -> None:
        self.http.post("/_stub/fail", json={"mode": mode, "count": count, **extra}).raise_for_status()

    def wait_for(self, address: str, count: int, timeout: float = 30) -> list[dict[str, object]]:
        """Wait until `count` emails reached `address`, then a little longer to catch extras."""
        deadline = time.monotonic() + timeout
        while len(self.emails_to(address)) < count and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)  # a duplicate would show up by now
        return self.emails_to(address)


@pytest.fixture(scope="session")
def brevo() -> Iterator[BrevoStub]:
    if os.environ.get("GATEWAY_URL") and os.environ.get("BREVO_STUB_URL"):
        yield BrevoStub(os.environ["BREVO_STUB_URL"])
        return
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "tests" / "tools" / "brevo_stub.py"),
            "--port",
            str(port),
            "--api-key",
            BrevoStub.API_KEY,
        ],
        stdout=subprocess.DEVNULL,
    )
    stub = BrevoStub(f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + 10
    while True:
        try:
            stub.state()
            break
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    yield stub
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, brevo: BrevoStub) -> Iterator[Stack]:
    if os.environ.get("GATEWAY_URL"):
        exec_prefix = os.environ.get("STACK_EXEC") or None
        yield Stack(
            url=os.environ["GATEWAY_URL"],
            var=Path(),
            process=None,
            stack_id=None,
            env={} if exec_prefix else None,
            exec_prefix=exec_prefix,
        )
        return
    var = tmp_path_factory.mktemp("stack") / "var"
    s = start_stack(
        var,
        NOTIFIER_BREVO_API_KEY=BrevoStub.API_KEY,
        NOTIFIER_BREVO_BASE_URL=brevo.url,
        NOTIFIER_BREVO_TIMEOUT_S="10",
        NOTIFIER_MIN_BACKOFF_MS="200",  # fast retries, so failure tests finish in seconds
        NOTIFIER_MAX_BACKOFF_MS="2000",
        NOTIFIER_HEARTBEAT_TIMEOUT_MS="3000",  # a killed worker's message comes back quickly
    )
    yield s
    s.stop()


@pytest.fixture(scope="session")
def gateway_url(stack: Stack) -> str:
    return stack.url


@pytest.fixture
def api(gateway_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway_url, timeout=10) as client:
        yield client
