"""The pieces of Kubernetes that `make test-k8s` reimplements, without Docker: the kustomize
subset deploy/k8s uses, the kubelet's environment rules ($(VAR) expansion, envFrom, service
links), its command/args rules and its volume file semantics. Each one refuses what it does
not implement, so the emulation fails loudly instead of silently diverging.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]


class Unsupported(SystemExit):
    """Something the manifests use that this emulation does not implement."""

    def __init__(self, what: str) -> None:
        super().__init__(f"test-k8s: FAILED: not implemented here (extend tests/k8s/kube.py): {what}")


# Kustomize -------------------------------------------------------------------------------

KUSTOMIZATION_KEYS = {"apiVersion", "kind", "namespace", "resources", "configMapGenerator", "images"}
GENERATOR_KEYS = {"name", "files", "literals"}
IMAGE_KEYS = {"name", "newName", "newTag", "digest"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PriorityClass", "StorageClass"}


def kustomize_hash(data: Mapping[str, str]) -> str:
    """kustomize's ConfigMap name suffix (api/hasher/hasher.go: encodeConfigMap + encode):
    sha256 of Go's json.Marshal of {"data", "kind", "name"} (sorted keys, HTML-escaped),
    its first 10 hex digits with 0, 1, 3, a, e swapped for g, h, k, m, t. The name hashed
    is "": kustomize looks it up as the one field "metadata/name", which no object has."""
    text = json.dumps({"data": dict(data), "kind": "ConfigMap", "name": ""}, sort_keys=True, separators=(",", ":"))
    for char, escaped in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e")):
        text = text.replace(char, escaped)
    text = text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    return digest.translate(str.maketrans("013ae", "ghkmt"))


def _pod_specs(doc: Obj) -> list[Obj]:
    kind = doc.get("kind")
    spec = doc.get("spec") or {}
    if kind in ("Deployment", "StatefulSet", "Job", "DaemonSet", "ReplicaSet"):
        return [spec["template"]["spec"]]
    if kind == "CronJob":
        return [spec["jobTemplate"]["spec"]["template"]["spec"]]
    if kind == "Pod":
        return [spec]
    return []


def _split_image(image: str) -> tuple[str, str, str]:
    """name, ':tag' or '', '@digest' or ''."""
    digest = ""
    if "@" in image:
        image, digest = image.split("@", 1)
        digest = "@" + digest
    name, tag = image, ""
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > slash:
        name, tag = image[:colon], image[colon:]
    return name, tag, digest


def render(kustomization: Path) -> list[Obj]:
    """`kustomize build --load-restrictor LoadRestrictionsNone` of a base with the keys in
    KUSTOMIZATION_KEYS only."""
    base = kustomization.parent
    k = yaml.safe_load(kustomization.read_text())
    unknown = set(k) - KUSTOMIZATION_KEYS
    if unknown:
        raise Unsupported(f"kustomization keys {sorted(unknown)}")
    if k.get("kind", "Kustomization") != "Kustomization":
        raise Unsupported(f"kind {k.get('kind')}")
    docs: list[Obj] = []
    for resource in k.get("resources", []):
        path = base / resource
        if not path.is_file():
            raise Unsupported(f"resource {resource} (a directory, a URL or missing)")
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    renamed: dict[str, str] = {}
    for gen in k.get("configMapGenerator", []):
        unknown = set(gen) - GENERATOR_KEYS
        if unknown:
            raise Unsupported(f"configMapGenerator keys {sorted(unknown)}")
        data: dict[str, str] = {}
        for entry in gen.get("files", []):
            key, _, source = entry.rpartition("=")
            key = key or Path(source).name
            data[key] = (base / source).read_text()
        for literal in gen.get("literals", []):
            key, _, value = literal.partition("=")
            data[key] = value
        name = f"{gen['name']}-{kustomize_hash(data)}"
        renamed[gen["name"]] = name
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data})
    namespace = k.get("namespace")
    for doc in docs:
        if namespace and doc["kind"] not in CLUSTER_SCOPED:
            doc["metadata"]["namespace"] = namespace
        for pod in _pod_specs(doc):
            _rename_config_maps(pod, renamed)
            for container in pod.get("initContainers", []) + pod.get("containers", []):
                container["image"] = _set_image(container["image"], k.get("images", []))
    return docs


def _rename_config_maps(pod: Obj, renamed: Mapping[str, str]) -> None:
    for volume in pod.get("volumes", []):
        if "configMap" in volume:
            volume["configMap"]["name"] = renamed.get(volume["configMap"]["name"], volume["configMap"]["name"])
    for container in pod.get("initContainers", []) + pod.get("containers", []):
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                ref = source["configMapRef"]
                ref["name"] = renamed.get(ref["name"], ref["name"])
        for var in container.get("env", []):
            ref = (var.get("valueFrom") or {}).get("configMapKeyRef")
            if ref:
                ref["name"] = renamed.get(ref["name"], ref["name"])


def _set_image(image: str, rules: list[Obj]) -> str:
    name, tag, digest = _split_image(image)
    for rule in rules:
        unknown = set(rule) - IMAGE_KEYS
        if unknown:
            raise Unsupported(f"images keys {sorted(unknown)}")
        if rule["name"] != name:
            continue
        name = rule.get("newName", name)
        if "digest" in rule:
            tag, digest = "", "@" + rule["digest"]
        elif "newTag" in rule:
            tag, digest = ":" + str(rule["newTag"]), ""
    return name + tag + digest


def canonical(docs: list[Obj]) -> list[str]:
    """The documents in an order-free, comparable form (kustomize sorts its output)."""
    return sorted(json.dumps(d, sort_keys=True) for d in docs)


# The kubelet's environment ---------------------------------------------------------------


def expand(value: str, lookup: Callable[[str], str | None]) -> str:
    """Kubernetes' $(VAR) expansion (third_party/forked/golang/expansion/expand.go): $(NAME)
    is replaced when NAME is known, else left as it is; $$ is a literal $; a $ before
    anything else, or an unclosed $(, stays as written."""
    out: list[str] = []
    i = 0
    while i < len(value):
        char = value[i]
        if char != "$" or i + 1 >= len(value):
            out.append(char)
            i += 1
            continue
        nxt = value[i + 1]
        if nxt == "$":
            out.append("$")
            i += 2
        elif nxt == "(":
            end = value.find(")", i + 2)
            if end == -1:
                out.append("$(")
                i += 2
                continue
            name = value[i + 2 : end]
            found = lookup(name)
            out.append(found if found is not None else f"$({name})")
            i = end + 1
        else:
            out.append("$" + nxt)
            i += 2
    return "".join(out)


def service_links(services: list[Obj], ips: Mapping[str, str]) -> dict[str, str]:
    """The docker-links-style variables the kubelet adds for every Service of the namespace
    (and the API server's) unless the pod says enableServiceLinks: false."""
    env = {
        "KUBERNETES_SERVICE_HOST": "10.96.0.1",
        "KUBERNETES_SERVICE_PORT": "443",
        "KUBERNETES_SERVICE_PORT_HTTPS": "443",
        "KUBERNETES_PORT": "tcp://10.96.0.1:443",
        "KUBERNETES_PORT_443_TCP": "tcp://10.96.0.1:443",
        "KUBERNETES_PORT_443_TCP_PROTO": "tcp",
        "KUBERNETES_PORT_443_TCP_PORT": "443",
        "KUBERNETES_PORT_443_TCP_ADDR": "10.96.0.1",
    }
    for svc in services:
        prefix = svc["metadata"]["name"].upper().replace("-", "_")
        ip = ips[svc["metadata"]["name"]]
        ports = svc["spec"].get("ports", [])
        for n, port in enumerate(ports):
            proto = port.get("protocol", "TCP")
            number = port["port"]
            if n == 0:
                env[f"{prefix}_SERVICE_HOST"] = ip
                env[f"{prefix}_SERVICE_PORT"] = str(number)
                env[f"{prefix}_PORT"] = f"{proto.lower()}://{ip}:{number}"
            if port.get("name"):
                env[f"{prefix}_SERVICE_PORT_{port['name'].upper().replace('-', '_')}"] = str(number)
            base = f"{prefix}_PORT_{number}_{proto}"
            env[base] = f"{proto.lower()}://{ip}:{number}"
            env[f"{base}_PROTO"] = proto.lower()
            env[f"{base}_PORT"] = str(number)
            env[f"{base}_ADDR"] = ip
    return env


ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")


def container_env(
    container: Obj,
    config_maps: Mapping[str, Mapping[str, str]],
    secrets: Mapping[str, Mapping[str, bytes]],
    links: Mapping[str, str],
    fields: Mapping[str, str],
) -> dict[str, str]:
    """kubelet_pods.go makeEnvironmentVariables: envFrom first (later sources win), then
    env in order, each value expanded against what is defined so far and the service links;
    then the service links not already defined."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        unknown = set(source) - {"configMapRef", "secretRef", "prefix"}
        if unknown:
            raise Unsupported(f"envFrom keys {sorted(unknown)}")
        prefix = source.get("prefix", "")
        if "configMapRef" in source:
            ref = source["configMapRef"]
            data: Mapping[str, str] | None = config_maps.get(ref["name"])
            if data is None and not ref.get("optional"):
                raise SystemExit(f"test-k8s: FAILED: container {container['name']}: ConfigMap {ref['name']} not found")
            items = dict(data or {})
        else:
            ref = source["secretRef"]
            sdata = secrets.get(ref["name"])
            if sdata is None and not ref.get("optional"):
                raise SystemExit(f"test-k8s: FAILED: container {container['name']}: Secret {ref['name']} not found")
            items = {k: v.decode() for k, v in (sdata or {}).items()}
        for key, value in items.items():
            if ENV_NAME.match(prefix + key):  # invalid names are skipped (an event in Kubernetes)
                env[prefix + key] = value

    def lookup(name: str) -> str | None:
        return env.get(name, links.get(name))

    for var in container.get("env", []):
        unknown = set(var) - {"name", "value", "valueFrom"}
        if unknown:
            raise Unsupported(f"env keys {sorted(unknown)}")
        if var.get("value"):
            env[var["name"]] = expand(str(var["value"]), lookup)
            continue
        source = var.get("valueFrom")
        if not source:
            env[var["name"]] = ""
            continue
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            value = (secrets.get(ref["name"]) or {}).get(ref["key"])
            if value is None:
                if ref.get("optional"):
                    continue
                raise SystemExit(
                    f"test-k8s: FAILED: container {container['name']}: CreateContainerConfigError: "
                    f"Secret {ref['name']} has no key {ref['key']}"
                )
            env[var["name"]] = value.decode()
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            text = (config_maps.get(ref["name"]) or {}).get(ref["key"])
            if text is None:
                if ref.get("optional"):
                    continue
                raise SystemExit(
                    f"test-k8s: FAILED: container {container['name']}: CreateContainerConfigError: "
                    f"ConfigMap {ref['name']} has no key {ref['key']}"
                )
            env[var["name"]] = text
        elif "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            if path not in fields:
                raise Unsupported(f"fieldRef {path}")
            env[var["name"]] = fields[path]
        else:
            raise Unsupported(f"valueFrom {sorted(source)}")
    for key, value in links.items():
        env.setdefault(key, value)
    return env


def command_line(container: Obj, image_config: Obj, env: Mapping[str, str]) -> tuple[list[str] | None, list[str]]:
    """(entrypoint override or None, arguments) with Kubernetes' rules: `command` replaces
    the image's ENTRYPOINT and drops its CMD; `args` alone replace CMD; both are expanded
    with $(VAR) against the container's final environment (kuberuntime
    ExpandContainerCommandAndArgs)."""

    def lookup(name: str) -> str | None:
        return env.get(name)

    command = [expand(str(c), lookup) for c in container.get("command", [])]
    args = [expand(str(a), lookup) for a in container.get("args", [])]
    if command:
        return command, args
    if "args" in container:
        return None, args
    return None, list(image_config.get("Cmd") or [])


# The kubelet's volumes -------------------------------------------------------------------

# kubelet pkg/volume/volume_linux.go, SetVolumeOwnership -> changeFilePermission: with an
# fsGroup, every file and directory of the volume is chowned to group fsGroup and its mode
# OR-ed with rwMask (0660), or roMask (0440) when the volume plugin reports itself
# read-only (secret, configMap, downwardAPI, projected do); directories also get setgid and
# execMask (0110). Symlinks are chowned but not chmodded (their mode means nothing, and
# chmod would follow them). Without fsGroup nothing changes: files stay root:root.
RW_MASK, RO_MASK, EXEC_MASK = 0o660, 0o440, 0o110


def set_volume_ownership(root: Path, fs_group: int | None, *, read_only: bool) -> None:
    if fs_group is None:
        return
    for path in [root, *sorted(root.rglob("*"))]:
        os.lchown(path, -1, fs_group)
        if path.is_symlink():
            continue
        mask = RO_MASK if read_only else RW_MASK
        if path.is_dir():
            mask |= 0o2000 | EXEC_MASK
        path.chmod(path.stat().st_mode & 0o7777 | mask)


def write_atomic_volume(root: Path, files: Mapping[str, tuple[bytes, int]]) -> None:
    """pkg/volume/util/atomic_writer.go's layout: the payload in a timestamped directory
    (mode 0755), `..data` a symlink to it, and each top-level entry a symlink to
    `..data/<entry>`; files root:root with the mode asked for (defaultMode, default 0644,
    or the item's mode)."""
    root.mkdir(parents=True)
    root.chmod(0o755)
    stamp = root / time.strftime("..%Y_%m_%d_%H_%M_%S.000000000", time.gmtime())
    stamp.mkdir(0o755)
    stamp.chmod(0o755)
    for rel, (content, mode) in files.items():
        target = stamp / rel
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        target.write_bytes(content)
        target.chmod(mode)
    (root / "..data").symlink_to(stamp.name)
    for top in sorted({rel.split("/", 1)[0] for rel in files}):
        (root / top).symlink_to(f"..data/{top}")


def projected_files(source: Obj, data: Mapping[str, bytes], what: str) -> dict[str, tuple[bytes, int]]:
    """The files of a configMap or secret volume: every key, or only `items`."""
    unknown = set(source) - {"name", "secretName", "items", "defaultMode", "optional"}
    if unknown:
        raise Unsupported(f"{what} volume keys {sorted(unknown)}")
    mode = int(source.get("defaultMode", 0o644))
    if "items" not in source:
        return {key: (value, mode) for key, value in data.items()}
    files = {}
    for item in source["items"]:
        if item["key"] not in data:
            if source.get("optional"):
                continue
            raise SystemExit(f"test-k8s: FAILED: {what} has no key {item['key']}")
        files[item["path"]] = (data[item["key"]], int(item.get("mode", mode)))
    return files


def quantity(text: str | int | float) -> float:
    """A Kubernetes quantity (512Mi, 1Gi, 500m, 2) as a number."""
    text = str(text)
    suffixes = {
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
        "k": 10**3,
        "M": 10**6,
        "G": 10**9,
        "T": 10**12,
        "m": 1e-3,
    }
    for suffix, factor in suffixes.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


if __name__ == "__main__":
    # `python tests/k8s/kube.py deploy/k8s OUT.yaml`: the rendered base, for make check-k8s.
    import sys

    base, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump_all(render(base / "kustomization.yaml"), sort_keys=False))
