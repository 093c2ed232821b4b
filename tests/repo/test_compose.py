"""docker-compose.yml only names things that exist: files, Dockerfiles, commands, variables.

(No Docker engine runs here, so the file is validated against the compose spec in
`make check-compose` and checked against the repository here.)
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
ENV_EXAMPLE = (ROOT / "deploy" / ".env.example").read_text()


def console_scripts() -> set[str]:
    names = {"alembic", "uvicorn", "dramatiq", "redis-server", "traefik", "sh", "python"}
    for pyproject in ROOT.glob("services/*/pyproject.toml"):
        names |= set(tomllib.loads(pyproject.read_text())["project"].get("scripts", {}))
    return names


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_builds_and_bind_mounts_point_at_real_files(name: str) -> None:
    service = SERVICES[name]
    if "build" in service:
        assert (ROOT / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
    for volume in service.get("volumes", []):
        source = volume.split(":", 1)[0]
        if source.startswith("."):
            assert (ROOT / source).exists(), f"{name} mounts missing {source}"
        else:
            assert source in COMPOSE["volumes"], f"{name} uses undeclared volume {source}"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_commands_exist(name: str) -> None:
    command = SERVICES[name].get("command")
    if isinstance(command, list) and not command[0].startswith("-"):
        assert command[0] in console_scripts(), f"{name} runs unknown command {command[0]}"
    for arg in command or []:
        if isinstance(arg, str) and arg.startswith("services/"):
            assert (ROOT / arg).exists(), f"{name} names missing {arg}"


def test_every_interpolated_variable_is_documented_in_the_env_example() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    variables = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", text))
    documented = set(re.findall(r"^([A-Z_][A-Z0-9_]*)=", ENV_EXAMPLE, re.M))
    assert variables <= documented, f"undocumented: {sorted(variables - documented)}"


def test_dependencies_and_internal_urls_name_real_services() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    for name, service in SERVICES.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in SERVICES, f"{name} depends on unknown {dependency}"
    for host in set(re.findall(r"(?:http|redis)://([a-z-]+):", text)) | set(re.findall(r"@([a-z-]+):5432", text)):
        assert host in SERVICES, f"a URL names unknown service {host}"


def test_only_the_gateway_is_published_and_services_see_their_variables() -> None:
    assert [n for n, s in SERVICES.items() if s.get("ports")] == ["gateway"]
    assert SERVICES["gateway"]["volumes"][0].startswith("./gateway/traefik.yml")
    for name in ("auth", "wallet", "notifier"):
        prefix = f"{name.upper()}_"
        env = SERVICES[name]["environment"]
        assert any(k.startswith(prefix) for k in env), name


def test_gateway_environment_covers_the_routing_template() -> None:
    template = (ROOT / "gateway" / "dynamic" / "routes.yml").read_text()
    used = set(re.findall(r'env "([A-Z_]+)"', template))
    provided = set(SERVICES["gateway"]["environment"])
    optional = {"GATEWAY_REDIS_PASSWORD", "GATEWAY_IP_DEPTH"}
    assert used - optional <= provided, sorted(used - optional - provided)
