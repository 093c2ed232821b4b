"""The gateway's Go runtime settings are the same wherever it runs: `make run`
(deploy/local/stack.py), docker-compose.yml and deploy/k8s."""

from __future__ import annotations

import importlib.util
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]


def stack_module() -> Any:
    spec = importlib.util.spec_from_file_location("stack_under_test", ROOT / "deploy" / "local" / "stack.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def k8s_gateway_env() -> dict[str, str]:
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "k8s" / "gateway.yaml").read_text()))
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    (container,) = (c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "traefik")
    return {v["name"]: v["value"] for v in container["env"] if "value" in v}


def test_the_go_runtime_of_the_gateway_is_one_setting_everywhere(tmp_path: Path, monkeypatch: Any) -> None:
    stack = stack_module()
    wanted = stack.GATEWAY_GO_ENV
    assert wanted["GOGC"] != "100"  # the setting exists (100 is Go's default)
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["gateway"]["environment"]
    assert {k: str(compose[k]) for k in wanted} == wanted
    k8s = k8s_gateway_env()
    assert {k: k8s[k] for k in wanted} == wanted

    for name in wanted:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("VAR_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    plan = stack.Plan.from_env()
    loop = shlex.split(stack.commands(plan)["gateway"])[-1]  # sh -c '<restart loop>'
    (command,) = (part for part in loop.split("; ") if "--entryPoints.web.address=" in part)
    argv = shlex.split(command)
    assert argv[0] == "env"
    assert dict(a.split("=", 1) for a in argv[1 : 1 + len(wanted)]) == wanted
    assert Path(argv[1 + len(wanted)]).name == "traefik"


def test_gomemlimit_stays_under_the_k8s_memory_limit() -> None:
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "k8s" / "gateway.yaml").read_text()))
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    (container,) = (c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "traefik")
    limit = container["resources"]["limits"]["memory"]
    soft = k8s_gateway_env()["GOMEMLIMIT"]
    assert limit.endswith("Mi"), limit
    assert soft.endswith("MiB"), soft
    assert int(soft[:-3]) <= 0.8 * int(limit[:-2])
