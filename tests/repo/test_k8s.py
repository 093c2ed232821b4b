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


DOCS = [
    d for p in sorted(K8S.glob("*.yaml")) if p.name != "kustomization.yaml" for d in yaml.safe_load_all(p.read_text())
]
CONFIG = next(d["data"] for d in DOCS if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "platform-config")


def pod_specs() -> list[tuple[str, dict]]:
    out = []
    for doc in DOCS:
        spec = doc.get("spec", {})
        if doc["kind"] == "CronJob":
            spec = spec["jobTemplate"]["spec"]
        if "template" in spec:
            out.append((f"{doc['kind']}/{doc['metadata']['name']}", spec["template"]["spec"]))
    return out


def test_every_pod_meets_the_restricted_pod_security_standard() -> None:
    namespace = next(d for d in DOCS if d["kind"] == "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    pods = pod_specs()
    assert len(pods) == 13
    for name, pod in pods:
        sc = pod["securityContext"]
        assert sc["runAsNonRoot"] is True, name
        assert sc["runAsUser"] >= 10000, name
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert pod["automountServiceAccountToken"] is False, name
        assert pod["enableServiceLinks"] is False, name  # no AUTH_PORT=tcp://... in the settings' prefix
        for container in pod.get("initContainers", []) + pod["containers"]:
            csc = container["securityContext"]
            assert csc["allowPrivilegeEscalation"] is False, (name, container["name"])
            assert csc["readOnlyRootFilesystem"] is True, (name, container["name"])
            assert csc["capabilities"] == {"drop": ["ALL"]}, (name, container["name"])
            assert {"cpu", "memory"} <= set(container["resources"]["limits"]), (name, container["name"])
        # A Secret volume is readable by the pod's user only through fsGroup (its files are root's).
        for volume in pod.get("volumes", []):
            if "secret" in volume:
                assert sc.get("fsGroup") == sc["runAsUser"], name
                assert volume["secret"]["defaultMode"] & 0o040, name


def test_images_are_pinned_by_version() -> None:
    for image in KUSTOMIZATION["images"]:
        assert image["newTag"] not in ("", "latest"), image
    for name, pod in pod_specs():
        for container in pod.get("initContainers", []) + pod["containers"]:
            ref = container["image"]
            if ref.startswith("wallet-platform/"):
                assert ":" not in ref, ref  # the tag comes from kustomization.yaml's images
            else:
                assert ":" in ref, (name, ref)
                assert not ref.endswith(":latest"), (name, ref)


def test_every_database_pod_waits_for_its_schema() -> None:
    for name, pod in pod_specs():
        if not name.startswith(("Deployment/", "StatefulSet/")):
            continue
        env = {e["name"] for c in pod["containers"] for e in c.get("env", [])}
        if any(e.endswith("_DATABASE_URL") for e in env):
            waits = [c for c in pod.get("initContainers", []) if c["name"] == "wait-for-schema"]
            assert waits, name
            assert waits[0]["command"][1] == "wait", name


def test_the_postgres_connection_budget_holds_at_the_autoscalers_maximum() -> None:
    """Every connection the workloads may hold at once, at the HPA's maximum and with every
    Deployment's rolling-update surge at the same time (one apply rolls them all), fits in
    the budget config.yaml declares; and its comment's totals are true."""
    hpa_max = {
        d["spec"]["scaleTargetRef"]["name"]: d["spec"]["maxReplicas"]
        for d in DOCS
        if d["kind"] == "HorizontalPodAutoscaler"
    }
    steady = surge = 0
    for doc in DOCS:
        if doc["kind"] not in ("Deployment", "Job", "CronJob"):
            continue
        name = doc["metadata"]["name"]
        pod = (doc["spec"]["jobTemplate"]["spec"] if doc["kind"] == "CronJob" else doc["spec"])["template"]["spec"]
        (container,) = pod["containers"]
        urls = [e["name"] for e in container.get("env", []) if e["name"].endswith("_DATABASE_URL")]
        if not urls:
            continue
        prefix = urls[0].removesuffix("_DATABASE_URL")
        if doc["kind"] != "Deployment":
            steady += 1  # a migration, the audit or a purge: one session
            continue
        replicas = hpa_max[name] if name in hpa_max else doc["spec"].get("replicas", 1)
        if "command" in container:  # a relay: its loop and its measurements
            per_pod = 2
        else:
            workers = int(CONFIG["WEB_CONCURRENCY"])
            per_pod = workers * (int(CONFIG[f"{prefix}_DB_POOL_SIZE"]) + int(CONFIG[f"{prefix}_DB_MAX_OVERFLOW"]))
        steady += replicas * per_pod
        max_surge = doc["spec"].get("strategy", {}).get("rollingUpdate", {}).get("maxSurge", "25%")
        extra = -(-replicas * int(max_surge[:-1]) // 100) if isinstance(max_surge, str) else max_surge
        surge += extra * (per_pod + 1)  # the new pods, and their wait-for-schema session
    comment = (K8S / "config.yaml").read_text()
    assert f"total  = {steady}" in comment, f"config.yaml's budget comment is stale: the workloads hold {steady}"
    assert f"surge  = {surge}" in comment, f"config.yaml's budget comment is stale: a rollout adds {surge}"
    config = next(d for d in DOCS if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "platform-config")
    budget = int(config["metadata"]["annotations"]["wallet-platform/postgres-max-connections"])
    assert steady + surge <= budget - 10, (steady, surge, budget)  # 10: superuser_reserved_connections and admins
