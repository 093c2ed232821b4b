"""deploy/k8s is complete: kustomize lists every manifest, and the gateway's ConfigMaps are
generated from the same gateway/ files that make run and compose use."""

from __future__ import annotations

from pathlib import Path

import yaml

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
KUSTOMIZATION = yaml.safe_load((K8S / "kustomization.yaml").read_text())


def test_every_manifest_is_listed_and_every_listed_file_exists() -> None:
    listed = set(KUSTOMIZATION["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def test_gateway_config_comes_from_the_shared_gateway_files() -> None:
    for generator in KUSTOMIZATION["configMapGenerator"]:
        for entry in generator["files"]:
            source = entry.split("=", 1)[1]
            assert (K8S / source).resolve().is_file(), source
            assert "gateway/" in source


def test_wallet_scales_automatically_and_every_deployment_has_probes_and_requests() -> None:
    docs = [d for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml" for d in yaml.safe_load_all(p.read_text())]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("HorizontalPodAutoscaler", "wallet") in kinds
    assert {("Job", "migrate-auth"), ("Job", "migrate-wallet")} <= kinds
    for doc in docs:
        if doc["kind"] != "Deployment":
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            assert "requests" in container["resources"], doc["metadata"]["name"]
            assert "livenessProbe" in container or "readinessProbe" in container, doc["metadata"]["name"]
