"""Architecture rules that a reviewer would otherwise have to remember."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ["auth", "wallet", "notifier"]


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def python_files(*parts: str) -> list[Path]:
    return sorted((ROOT.joinpath(*parts)).rglob("*.py"))


@pytest.mark.parametrize("service", SERVICES)
def test_services_never_import_each_other(service: str) -> None:
    others = set(SERVICES) - {service}
    offenders = {
        str(p.relative_to(ROOT)): sorted(imported_packages(p) & others)
        for p in python_files("services", service)
        if imported_packages(p) & others
    }
    assert offenders == {}


def test_the_shared_library_imports_no_service() -> None:
    offenders = [str(p.relative_to(ROOT)) for p in python_files("libs") if imported_packages(p) & set(SERVICES)]
    assert offenders == []


def test_end_to_end_tests_only_speak_http() -> None:
    forbidden = set(SERVICES) | {"svckit"}
    offenders = [str(p.relative_to(ROOT)) for p in python_files("tests", "e2e") if imported_packages(p) & forbidden]
    assert offenders == []


def test_the_rule_checker_sees_imports(tmp_path: Path) -> None:
    sample = tmp_path / "x.py"
    sample.write_text("import wallet.models\nfrom auth import service\nfrom . import sibling\n")
    assert imported_packages(sample) == {"wallet", "auth"}
