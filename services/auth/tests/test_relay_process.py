"""`auth-relay` as its container runs it: the command itself, in a process of its own."""

from __future__ import annotations

from pathlib import Path

from auth import relay
from auth.config import Settings
from svckit.testing import check_relay_probe_is_light, check_relay_process

INI = Path(__file__).resolve().parents[1] / "alembic.ini"


def test_the_relay_creates_its_metrics_folder_serves_metrics_and_answers_alive(tmp_path: Path, redis_url: str) -> None:
    check_relay_process("auth", INI, tmp_path, redis_url)


def test_the_probe_reads_the_settings_variable_without_the_relays_imports() -> None:
    assert Settings.model_config["env_prefix"] == relay.ENV_PREFIX
    check_relay_probe_is_light("auth")
