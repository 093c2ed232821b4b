"""The relay's liveness: its loop touches a file after each round, `alive` checks its age."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pydantic_settings import SettingsConfigDict

from svckit import heartbeat
from svckit.db import make_engine
from svckit.outbox import Relay, relay_main
from svckit.settings import BaseServiceSettings
from svckit.testing import outbox_table

OUTBOX = outbox_table()  # the relay's loop needs one to go round
metadata = OUTBOX.metadata
MAX_AGE = 1.0  # seconds: small, so a stuck loop shows soon (yet above a round on a busy machine)


class Settings(BaseServiceSettings):
    model_config = SettingsConfigDict(env_prefix="HBT_", extra="ignore")


def alive(monkeypatch: pytest.MonkeyPatch, path: Path, max_age: float = MAX_AGE) -> int:
    """`hbt-relay alive --max-age ...` as the relay commands answer it (svckit.heartbeat.alive_main)."""
    monkeypatch.setenv("HBT_RELAY_HEARTBEAT_FILE", str(path))
    return heartbeat.alive_main("hbt", "HBT_", ["--max-age", str(max_age)])


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[Relay]:
    engine = make_engine(f"sqlite:///{tmp_path}/outbox.db")
    metadata.create_all(engine)
    # No Redis: lease=None relays alone, markers=None skips the reconciliation.
    yield Relay(
        engine, OUTBOX, lambda _: None, lease=None, name="hbt", idle_s=0.02, heartbeat_file=str(tmp_path / "alive")
    )
    engine.dispose()


@contextmanager
def looping(relay: Relay) -> Iterator[None]:
    """The relay's loop in a thread (run_forever's signal handlers need the main thread),
    from its first touch of the file until the test is done."""
    thread = threading.Thread(target=relay.loop, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while relay.heartbeat is not None and not relay.heartbeat.path.exists():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        yield
    finally:
        relay.running = False
        thread.join(10)
    assert not thread.is_alive()


def test_a_running_loop_keeps_alive_at_zero(relay: Relay, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with looping(relay):
        deadline = time.monotonic() + 3 * MAX_AGE
        while time.monotonic() < deadline:
            assert alive(monkeypatch, tmp_path / "alive") == 0
            time.sleep(MAX_AGE / 4)


def test_a_loop_whose_rounds_fail_is_still_alive(relay: Relay, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The database or Redis down: each round logs its error and sleeps; a restart would not help."""
    rounds = 0

    def broken() -> int:
        nonlocal rounds
        rounds += 1
        raise ConnectionError("the database is down")

    monkeypatch.setattr(relay, "run_once", broken)
    with looping(relay):
        time.sleep(3 * MAX_AGE)
        assert alive(monkeypatch, tmp_path / "alive") == 0
    assert rounds > 3


def test_a_stuck_round_makes_alive_exit_1_after_max_age(
    relay: Relay, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    stuck = threading.Event()
    release = threading.Event()

    def hangs() -> int:
        stuck.set()
        while relay.running and not release.wait(0.05):  # a connection that never answers
            pass
        return 0

    monkeypatch.setattr(relay, "run_once", hangs)
    with looping(relay):
        assert stuck.wait(10)
        assert alive(monkeypatch, tmp_path / "alive") == 0  # touched as the loop started
        time.sleep(MAX_AGE + 0.2)
        capsys.readouterr()
        assert alive(monkeypatch, tmp_path / "alive") == 1
        reason = capsys.readouterr().err
        assert "stuck" in reason
        assert reason.count("\n") == 1
        release.set()  # the round completes: alive again
        deadline = time.monotonic() + 5
        while alive(monkeypatch, tmp_path / "alive") != 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)


def test_a_missing_file_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert alive(monkeypatch, tmp_path / "never-written", max_age=3600) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err
    assert err.count("\n") == 1


def test_a_file_that_cannot_be_written_does_not_stop_the_loop(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "a-file").write_text("")
    beat = heartbeat.Heartbeat(tmp_path / "a-file" / "alive")  # its parent is a file
    beat.beat()
    beat.beat()
    assert sum("cannot touch the heartbeat file" in r.getMessage() for r in caplog.records) == 1  # once, not raised


def test_the_file_is_the_setting_or_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HBT_RELAY_HEARTBEAT_FILE", raising=False)
    assert heartbeat.path_from_env("hbt", "HBT_") == "/tmp/hbt-relay.alive"
    assert heartbeat.path_for("hbt", Settings().relay_heartbeat_file) == "/tmp/hbt-relay.alive"
    # The probe reads the variable as the settings do (its name in any case).
    monkeypatch.setenv("hbt_relay_heartbeat_file", "/run/x/alive")
    assert heartbeat.path_from_env("hbt", "HBT_") == "/run/x/alive"
    assert Settings().relay_heartbeat_file == "/run/x/alive"


def test_relay_main_answers_alive_from_the_settings(tmp_path: Path) -> None:
    settings = Settings(relay_heartbeat_file=str(tmp_path / "alive"))
    with pytest.raises(SystemExit) as exited:
        relay_main("hbt", settings, OUTBOX, ["alive"])
    assert exited.value.code == 1
    heartbeat.Heartbeat(tmp_path / "alive").beat()
    with pytest.raises(SystemExit) as exited:
        relay_main("hbt", settings, OUTBOX, ["alive", "--max-age", "30"])
    assert exited.value.code == 0


def test_the_probe_imports_nothing_heavy() -> None:
    code = (
        "import sys; from svckit import heartbeat; "
        "heavy = {'sqlalchemy', 'redis', 'dramatiq', 'prometheus_client', 'pydantic', 'fastapi'} & set(sys.modules); "
        "print(sorted(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
