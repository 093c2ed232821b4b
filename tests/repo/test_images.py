"""The images docker-compose.yml runs: what a fresh host needs from them, checked without an
engine (`make test-compose` boots them for real)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
DOCKERFILES = sorted(ROOT.glob("services/*/Dockerfile")) + sorted(ROOT.glob("deploy/images/*/Dockerfile"))
OVERRIDE: dict[str, Any] = yaml.safe_load((ROOT / "deploy" / "compose" / "local-images.yml").read_text())


def dockerfile_of(image: str) -> Path | None:
    """The Dockerfile that builds `image` (a service with `build:` and that image name)."""
    for service in SERVICES.values():
        if service.get("image") == image and "build" in service:
            return ROOT / service["build"]["context"] / service["build"]["dockerfile"]
    return None


def runtime_stage(dockerfile: Path) -> str:
    return re.split(r"^FROM ", dockerfile.read_text(), flags=re.M)[-1]


NAMED_MOUNTS = sorted(
    (name, volume.split(":")[0], volume.split(":")[1])
    for name, service in SERVICES.items()
    for volume in service.get("volumes", [])
    if not volume.startswith(".") and dockerfile_of(service["image"]) is not None
)


@pytest.mark.parametrize(("service", "volume", "target"), NAMED_MOUNTS)
def test_named_volumes_start_owned_by_the_service_user(service: str, volume: str, target: str) -> None:
    # A named volume takes the owner of its mount point in the image; without it, Docker
    # creates the directory root-owned and the service (USER app) cannot write to it.
    dockerfile = dockerfile_of(SERVICES[service]["image"])
    assert dockerfile is not None
    stage = runtime_stage(dockerfile)
    assert re.search(r"^USER app$", stage, re.M), dockerfile
    assert re.search(rf"install -d -o app -g app -m \d+ {re.escape(target)}\b", stage), (
        f"{dockerfile.relative_to(ROOT)} does not create {target} (volume {volume}) owned by app"
    )


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_dockerfiles_build_with_the_classic_builder_and_pinned_tools(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    # BuildKit's frontend image cannot always be pulled; the classic builder ignores it anyway.
    assert not re.search(r"^#\s*syntax=", text, re.M | re.I)
    assert "--chmod" not in text  # BuildKit only
    for line in re.findall(r"(?:pip|uv pip) install[^\n\\]*", text):
        assert "--upgrade" not in line, line
        assert " -U " not in line, line
        assert "--require-hashes" in line or ("--no-deps" in line and "/wheels/" in line), (
            f"{dockerfile.relative_to(ROOT)}: unpinned install: {line}"
        )
    assert "pip install --no-deps libs/" not in text  # would fetch the build backend unpinned


def test_the_build_context_leaves_local_state_and_secrets_out() -> None:
    patterns = set((ROOT / ".dockerignore").read_text().split())
    for needed in (".git", ".venv", "var", "**/.env", "**/*.pem", "**/keys", "**/secrets"):
        assert needed in patterns, needed


def test_the_override_swaps_only_image_names_of_pulled_images() -> None:
    assert set(OVERRIDE) == {"services"}
    for name, service in OVERRIDE["services"].items():
        assert set(service) == {"image"}, name
        assert "build" not in SERVICES[name], f"{name} is built from this repository"


def test_every_local_base_image_has_a_recipe() -> None:
    run = (ROOT / "tests" / "compose" / "run.py").read_text()
    for service in OVERRIDE["services"].values():
        assert f'"{service["image"]}"' in run, service["image"]
    for name in re.findall(r'^    "([a-z]+)": \(\[', run, re.M):
        assert (ROOT / "deploy" / "images" / name / "Dockerfile").is_file(), name
