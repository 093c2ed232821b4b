"""`auth-relay` as its container runs it: the command itself, in a process of its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from auth import relay
from auth.config import Settings
from svckit.testing import alembic, free_port, fresh_database, scrape_metrics

INI = Path(__file__).resolve().parents[1] / "alembic.ini"
COMMAND = str(Path(sys.executable).with_name("auth-relay"))


def test_the_relay_creates_its_metrics_folder_serves_metrics_and_answers_alive(tmp_path: Path, redis_url: str) -> None:
    # PROMETHEUS_MULTIPROC_DIR is set for every pod (the ConfigMap); nobody creates it for the relay.
    metrics_dir = tmp_path / "not-yet" / "prometheus"
    port = free_port()
    with fresh_database("auth_relay", tmp_path) as url:
        alembic(INI, url, "upgrade", "head")
        env = {
            **os.environ,
            "AUTH_DATABASE_URL": url,
            "AUTH_REDIS_URL": redis_url,
            "AUTH_RELAY_METRICS_PORT": str(port),
            "AUTH_RELAY_HEARTBEAT_FILE": str(tmp_path / "alive"),
            "METRICS_BIND": "127.0.0.1",
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        }
        proc = subprocess.Popen([COMMAND], env=env)
        try:
            text = scrape_metrics(port, until='outbox_backlog{service="auth"}', proc=proc)
            assert 'outbox_oldest_age_seconds{service="auth"} 0.0' in text
            assert metrics_dir.is_dir()
            probe = subprocess.run(
                [COMMAND, "alive", "--max-age", "30"], env=env, capture_output=True, text=True, timeout=30
            )
            assert probe.returncode == 0, probe.stderr
        finally:
            proc.terminate()
            assert proc.wait(30) == 0  # SIGTERM ends the loop cleanly
    stopped = subprocess.run([COMMAND, "alive", "--max-age", "0"], env=env, capture_output=True, text=True, timeout=30)
    assert stopped.returncode == 1
    assert "stuck" in stopped.stderr


def test_the_probe_reads_the_settings_variable() -> None:
    assert Settings.model_config["env_prefix"] == relay.ENV_PREFIX
    code = "import sys, auth.relay; print(sorted({'sqlalchemy', 'pydantic', 'redis', 'dramatiq'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"  # `auth-relay alive` answers without the relay's imports
