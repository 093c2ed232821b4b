"""PROMETHEUS_MULTIPROC_DIR is created by whoever writes metrics into it; a single-process
program (a relay) also removes what an earlier process with its pid left there."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from svckit.metrics import ensure_metrics_dir, prepare_metrics_dir


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "not" / "yet"
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(path))
    return path


def stale_files(folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True)
    mine = folder / f"counter_{os.getpid()}.db"  # a previous process with our pid (pid 1 in a container)
    theirs = folder / f"counter_{os.getpid() + 1}0.db"  # a sibling's, or a dead process's counters
    mine.write_bytes(b"x")
    theirs.write_bytes(b"x")
    return mine, theirs


def test_a_missing_folder_is_created(folder: Path) -> None:
    assert ensure_metrics_dir() == folder
    assert folder.is_dir()
    assert prepare_metrics_dir(sole_writer=True) == folder


def test_the_sole_writer_removes_only_its_own_pids_files(folder: Path) -> None:
    mine, theirs = stale_files(folder)
    prepare_metrics_dir(sole_writer=True)
    assert not mine.exists()
    assert theirs.exists()


def test_other_programs_remove_nothing(folder: Path) -> None:
    mine, theirs = stale_files(folder)
    prepare_metrics_dir(sole_writer=False)
    ensure_metrics_dir()
    assert mine.exists()
    assert theirs.exists()


def test_without_the_variable_nothing_happens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    assert ensure_metrics_dir() is None
    assert prepare_metrics_dir(sole_writer=True) is None
