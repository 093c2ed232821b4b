"""The launcher behind `make run`: it stops every process it started, and keeps data."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import httpx
import pytest

from .client import login, signup, unique_email
from .conftest import start_stack


def _proc(pid: int, name: str) -> str:
    return (Path("/proc") / str(pid) / name).read_text(errors="replace")


def descendants(root: int) -> dict[int, str]:
    """Every live process below `root`, with its command name."""
    parents: dict[int, int] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                parents[int(proc.name)] = int(_proc(int(proc.name), "stat").rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found: dict[int, str] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in found:
                try:
                    found[pid] = _proc(pid, "comm").strip()
                except OSError:
                    continue
                frontier.append(pid)
    return found


def alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            state = _proc(pid, "stat").rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.append(pid)
    return out


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_stopping_leaves_no_process_behind_and_a_restart_keeps_the_data(tmp_path: Path, sig: int) -> None:
    var = tmp_path / "var"
    first = start_stack(var)
    assert first.process is not None
    children = descendants(first.process.pid)
    names = set(children.values())
    assert {"redis-server", "traefik"} <= names, names
    assert sum("uvicorn" in _proc(pid, "cmdline") for pid in alive(list(children))) >= 3  # auth, wallet, docs
    email = unique_email()
    with httpx.Client(base_url=first.url, timeout=10) as api:
        signup(api, email=email)
    # No Brevo key here (the local default): the welcome email lands in var/outbox.
    deadline = time.monotonic() + 20
    while not (written := list((var / "outbox").glob("*.json"))) and time.monotonic() < deadline:
        time.sleep(0.2)
    [welcome] = written
    assert json.loads(welcome.read_text())["to"][0]["email"] == email
    assert first.stop(sig) in (0, 130, 143, -sig)
    assert alive(list(children)) == []

    second = start_stack(var)
    assert second.process is not None
    children = descendants(second.process.pid)
    try:
        with httpx.Client(base_url=second.url, timeout=10) as api:
            assert login(api, email).status_code == 200  # same users, same keys
    finally:
        second.stop()
    assert alive(list(children)) == []
