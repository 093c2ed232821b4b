"""A NetworkPolicy evaluator for the manifests in deploy/k8s (no cluster needed), and the
flows the platform needs, read from the same manifests.

Semantics follow https://kubernetes.io/docs/concepts/services-networking/network-policies/
and the API reference of NetworkPolicySpec (networking.k8s.io/v1); each rule below says
which part it implements. test_k8s_network.py proves the evaluator on small synthetic
policy sets before it judges deploy/k8s.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

Labels = Mapping[str, str]
Doc = dict[str, Any]
PROTOCOLS = ("TCP", "UDP", "SCTP")
# "kubernetes.io/metadata.name" is set on every namespace by the API server (1.22+), so
# selectors may rely on it.
NS_NAME_LABEL = "kubernetes.io/metadata.name"
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


@dataclass(frozen=True)
class ContainerPort:
    name: str | None
    port: int
    protocol: str = "TCP"  # containerPort protocol defaults to TCP


@dataclass(frozen=True)
class Pod:
    """A pod (one per workload: replicas share labels, so they behave alike)."""

    name: str
    namespace: str
    labels: Labels = field(default_factory=dict, hash=False, compare=False)
    ports: tuple[ContainerPort, ...] = ()


@dataclass(frozen=True)
class External:
    """An address outside the cluster (what ipBlock peers are for)."""

    ip: str

    @property
    def name(self) -> str:
        return self.ip


Endpoint = Pod | External


# --- label selectors (metav1.LabelSelector) ------------------------------------------


def selector_matches(selector: Mapping[str, Any], labels: Labels) -> bool:
    """matchLabels AND every matchExpressions entry; the empty selector {} matches all."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != str(value):
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], [str(v) for v in expr.get("values") or []]
        if op == "In":
            ok = key in labels and labels[key] in values
        elif op == "NotIn":  # a pod without the key is "not in" (labels.Selector semantics)
            ok = key not in labels or labels[key] not in values
        elif op == "Exists":
            ok = key in labels
        elif op == "DoesNotExist":
            ok = key not in labels
        else:
            raise ValueError(f"unknown selector operator {op!r}")
        if not ok:
            return False
    return True


# --- the evaluator -------------------------------------------------------------------


def policy_types(spec: Mapping[str, Any]) -> set[str]:
    """policyTypes, defaulted: "If no policyTypes are specified on a NetworkPolicy then by
    default Ingress will always be set and Egress will be set if the NetworkPolicy has any
    egress rules" (an empty list counts as unspecified, as the API's defaulting does)."""
    if spec.get("policyTypes"):
        return set(spec["policyTypes"])
    return {"Ingress", "Egress"} if spec.get("egress") else {"Ingress"}


class Cluster:
    """Namespaces (name -> labels) and the NetworkPolicies of the namespaces we know.
    Namespaces without policies here have none: their pods are not isolated."""

    def __init__(self, namespaces: Mapping[str, Labels], policies: Iterable[Doc]) -> None:
        self.namespaces = {name: {NS_NAME_LABEL: name, **labels} for name, labels in namespaces.items()}
        self.policies = list(policies)
        self._selecting: dict[tuple[str, tuple[tuple[str, str], ...], str], list[Doc]] = {}
        for policy in self.policies:
            if "namespace" not in policy.get("metadata", {}):
                raise ValueError(f"policy {policy['metadata'].get('name')} has no namespace")

    def selecting(self, pod: Pod, direction: str) -> list[Doc]:
        key = (pod.namespace, tuple(sorted(pod.labels.items())), direction)
        if key not in self._selecting:
            self._selecting[key] = self._select(pod, direction)
        return self._selecting[key]

    def _select(self, pod: Pod, direction: str) -> list[Doc]:
        """The policies that select `pod` for `direction`. "By default, a pod is non-isolated
        for ingress/egress"; it is isolated for a direction as soon as one policy in its
        namespace selects it (spec.podSelector) and has that direction in policyTypes. Rules
        of a direction not in policyTypes do not apply."""
        return [
            p
            for p in self.policies
            if p["metadata"]["namespace"] == pod.namespace
            and selector_matches(p["spec"].get("podSelector") or {}, pod.labels)
            and direction in policy_types(p["spec"])
        ]

    def isolated(self, pod: Pod, direction: str) -> bool:
        return bool(self.selecting(pod, direction))

    def peer_matches(self, peer: Mapping[str, Any], policy_ns: str, other: Endpoint) -> bool:
        """One entry of from/to. ipBlock: an address in cidr and in no `except` range; it is
        meant for cluster-external addresses ("Pod IPs are ephemeral and unpredictable"), so
        pods are matched by selectors only. podSelector alone: pods of the policy's
        namespace; namespaceSelector alone: every pod of the selected namespaces; both in
        ONE entry: pods matching podSelector in namespaces matching namespaceSelector (AND;
        separate entries are OR)."""
        if "ipBlock" in peer:
            if not isinstance(other, External):
                return False
            addr = ipaddress.ip_address(other.ip)
            block = peer["ipBlock"]
            net = ipaddress.ip_network(block["cidr"], strict=False)
            if addr.version != net.version or addr not in net:
                return False
            return not any(
                addr in ex for ex in (ipaddress.ip_network(e, strict=False) for e in block.get("except") or [])
            )
        pod_sel, ns_sel = peer.get("podSelector"), peer.get("namespaceSelector")
        if pod_sel is None and ns_sel is None:
            raise ValueError(f"peer with no selector nor ipBlock: {peer}")
        if not isinstance(other, Pod):
            return False
        if ns_sel is None:
            ns_ok = other.namespace == policy_ns
        else:
            ns_ok = selector_matches(ns_sel, self.namespaces.get(other.namespace, {NS_NAME_LABEL: other.namespace}))
        return ns_ok and (pod_sel is None or selector_matches(pod_sel, other.labels))

    @staticmethod
    def port_matches(ports: Sequence[Mapping[str, Any]] | None, dst: Endpoint, port: int, protocol: str) -> bool:
        """A rule's ports: none listed = every port. Each entry: protocol (default TCP);
        port missing = every port of that protocol; a number, up to endPort inclusive when
        given; a name = the DESTINATION pod's container port of that name and protocol
        (an external destination has no named ports)."""
        if not ports:
            return True
        for entry in ports:
            if entry.get("protocol", "TCP") != protocol:
                continue
            value = entry.get("port")
            if value is None:
                return True
            if isinstance(value, str):
                if isinstance(dst, Pod) and any(
                    cp.name == value and cp.protocol == protocol and cp.port == port for cp in dst.ports
                ):
                    return True
                continue
            if int(value) <= port <= int(entry.get("endPort", value)):
                return True
        return False

    def _direction_allows(
        self, pod: Pod, direction: str, other: Endpoint, dst: Endpoint, port: int, protocol: str
    ) -> list[str]:
        """Names of the policies that let this connection through on `pod`'s side, or
        ["(not isolated)"]. Allowed when ANY rule of ANY selecting policy matches (they add
        up); an empty rule list allows nothing; a rule without from/to matches every peer,
        without ports every port."""
        selecting = self.selecting(pod, direction)
        if not selecting:
            return ["(not isolated)"]
        rules_key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
        names = []
        for policy in selecting:
            for rule in policy["spec"].get(rules_key) or []:
                peers = rule.get(peers_key)
                if peers and not any(self.peer_matches(p, policy["metadata"]["namespace"], other) for p in peers):
                    continue
                if self.port_matches(rule.get("ports"), dst, port, protocol):
                    names.append(policy["metadata"]["name"])
                    break
        return names

    def egress(self, src: Endpoint, dst: Endpoint, port: int, protocol: str = "TCP") -> list[str]:
        if not isinstance(src, Pod):
            return ["(outside)"]
        return self._direction_allows(src, "Egress", dst, dst, port, protocol)

    def ingress(self, src: Endpoint, dst: Endpoint, port: int, protocol: str = "TCP") -> list[str]:
        if not isinstance(dst, Pod):
            return ["(outside)"]
        return self._direction_allows(dst, "Ingress", src, dst, port, protocol)

    def allowed(self, src: Endpoint, dst: Endpoint, port: int, protocol: str = "TCP") -> bool:
        """A connection needs both ends: the source's egress AND the destination's ingress
        ("both the egress policy on the source pod and the ingress policy on the
        destination pod need to allow the connection"). Replies are implied."""
        return bool(self.egress(src, dst, port, protocol)) and bool(self.ingress(src, dst, port, protocol))


# --- the manifests -------------------------------------------------------------------


@dataclass
class Workload:
    pod: Pod
    doc: Doc
    template: Doc  # the pod template

    @property
    def spec(self) -> Doc:
        return self.template.get("spec") or {}

    @property
    def containers(self) -> list[Doc]:
        return list(self.spec.get("initContainers") or []) + list(self.spec.get("containers") or [])


@dataclass
class Manifests:
    namespace: str
    namespace_labels: dict[str, str]
    docs: list[Doc]
    workloads: dict[str, Workload]
    services: dict[str, Doc]
    configmaps: dict[str, dict[str, str]]
    policies: list[Doc]

    def cluster(self, others: Mapping[str, Labels]) -> Cluster:
        return Cluster({self.namespace: self.namespace_labels, **others}, self.policies)


def pod_template(doc: Doc) -> Doc | None:
    if doc["kind"] in WORKLOAD_KINDS:
        return doc["spec"]["template"]  # type: ignore[no-any-return]
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]  # type: ignore[no-any-return]
    return None


def load(k8s_dir: Path) -> Manifests:
    """Every document of deploy/k8s/*.yaml but the kustomization, placed in the
    kustomization's namespace (kustomize's `namespace:` overrides every resource's)."""
    namespace = yaml.safe_load((k8s_dir / "kustomization.yaml").read_text())["namespace"]
    docs = [
        d
        for path in sorted(k8s_dir.glob("*.yaml"))
        if path.name != "kustomization.yaml" and not path.name.startswith(".")  # as the shell's *.yaml
        for d in yaml.safe_load_all(path.read_text())
        if d
    ]
    ns_labels: dict[str, str] = {}
    workloads, services, configmaps, policies = {}, {}, {}, []
    for doc in docs:
        meta = doc.setdefault("metadata", {})
        if doc["kind"] == "Namespace":
            ns_labels = dict(meta.get("labels") or {})
            continue
        meta["namespace"] = namespace
        template = pod_template(doc)
        if template is not None:
            ports = tuple(
                ContainerPort(p.get("name"), int(p["containerPort"]), p.get("protocol", "TCP"))
                for c in template["spec"]["containers"]
                for p in c.get("ports") or []
            )
            labels = dict((template.get("metadata") or {}).get("labels") or {})
            workloads[meta["name"]] = Workload(Pod(meta["name"], namespace, labels, ports), doc, template)
        elif doc["kind"] == "Service":
            services[meta["name"]] = doc
        elif doc["kind"] == "ConfigMap":
            configmaps[meta["name"]] = {k: str(v) for k, v in (doc.get("data") or {}).items()}
        elif doc["kind"] == "NetworkPolicy":
            policies.append(doc)
    return Manifests(namespace, ns_labels, docs, workloads, services, configmaps, policies)


# --- what the pods need --------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Flow:
    """src -> dst on a destination CONTAINER port (what policies match, after the
    Service's port -> targetPort translation)."""

    src: str
    dst: str
    port: int
    protocol: str = "TCP"
    why: str = field(default="", compare=False)


@dataclass
class PodEnv:
    values: dict[str, str]  # plain values, from env and envFrom ConfigMaps
    secret_refs: dict[str, tuple[str, str]]  # name -> (Secret, key)


_DEPENDENT = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def pod_env(workload: Workload, configmaps: Mapping[str, Mapping[str, str]]) -> PodEnv:
    """The environment of the pod's containers (init containers included): envFrom
    ConfigMaps, then env (value, configMapKeyRef, secretKeyRef). $(VAR) references are
    replaced by a placeholder (Kubernetes expands them from the container's env; only the
    host and port matter here)."""
    values: dict[str, str] = {}
    secrets: dict[str, tuple[str, str]] = {}
    for container in workload.containers:
        for source in container.get("envFrom") or []:
            if "configMapRef" in source:
                data = configmaps.get(source["configMapRef"]["name"], {})
                values.update({source.get("prefix", "") + k: v for k, v in data.items()})
        for var in container.get("env") or []:
            ref = var.get("valueFrom") or {}
            if "value" in var:
                values[var["name"]] = _DEPENDENT.sub("x", str(var["value"]))
            elif "configMapKeyRef" in ref:
                values[var["name"]] = configmaps.get(ref["configMapKeyRef"]["name"], {}).get(
                    ref["configMapKeyRef"]["key"], ""
                )
            elif "secretKeyRef" in ref:
                secrets[var["name"]] = (ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"])
    return PodEnv(values, secrets)


DEFAULT_PORTS = {"http": 80, "https": 443, "redis": 6379, "rediss": 6379, "postgresql": 5432, "postgres": 5432}


def addresses(value: str) -> list[tuple[str, int | None]]:
    """(host, port) of every URL or host:port in a (comma-separated) value."""
    found: list[tuple[str, int | None]] = []
    for item in (s.strip() for s in value.split(",")):
        if "://" in item:
            url = urlsplit(item)
            if url.hostname:
                found.append((url.hostname, url.port or DEFAULT_PORTS.get(url.scheme)))
        elif m := re.fullmatch(r"([a-z0-9][a-z0-9.-]*):(\d+)", item):
            found.append((m[1], int(m[2])))
    return found


def service_of(host: str, manifests: Manifests) -> Doc | None:
    """The Service a host name resolves to: `name`, `name.ns`, `name.ns.svc[.cluster.local]`."""
    parts = host.split(".")
    if len(parts) > 1 and parts[1] != manifests.namespace:
        return None
    return manifests.services.get(parts[0])


def service_targets(service: Doc, port: int | None, manifests: Manifests) -> list[tuple[Pod, ContainerPort]]:
    """The pods a Service selects and the container port its `port` reaches (targetPort:
    a number, or a container port name looked up in each pod; missing = port)."""
    found = []
    selector = service["spec"].get("selector") or {}
    for sp in service["spec"].get("ports") or []:
        if port is not None and int(sp["port"]) != port:
            continue
        target, protocol = sp.get("targetPort", sp["port"]), sp.get("protocol", "TCP")
        for workload in manifests.workloads.values():
            if not selector or not selector_matches({"matchLabels": selector}, workload.pod.labels):
                continue
            for cp in workload.pod.ports:
                if cp.protocol == protocol and (
                    cp.name == target if isinstance(target, str) else cp.port == int(target)
                ):
                    found.append((workload.pod, cp))
    return found


def env_flows(manifests: Manifests, reads: Mapping[str, Sequence[str]]) -> tuple[set[Flow], list[str]]:
    """Pod -> pod flows from the addresses in each pod's env whose host is a Service.

    `reads` says which variables the program of each pod (by workload name) reads, as
    fnmatch-style name prefixes ending in "*" or exact names: the ConfigMap is shared by
    every pod, so its presence in a pod's env does not make a variable the pod's.
    Returns the flows and the problems (an address of a Service with no such port, a pod
    missing from `reads`)."""
    flows: set[Flow] = set()
    problems: list[str] = []
    for name, workload in manifests.workloads.items():
        if name not in reads:
            problems.append(f"{name}: not in READS (which variables does its program read?)")
            continue
        patterns = reads[name]
        env = pod_env(workload, manifests.configmaps)
        for var, value in sorted(env.values.items()):
            if not any(var.startswith(p[:-1]) if p.endswith("*") else var == p for p in patterns):
                continue
            for host, port in addresses(value):
                service = service_of(host, manifests)
                if service is None:
                    continue
                targets = service_targets(service, port, manifests)
                if not targets:
                    problems.append(f"{name}: {var} names {host}:{port}, which Service {host} does not serve")
                for pod, cp in targets:
                    flows.add(Flow(name, pod.name, cp.port, cp.protocol, f"{var}={value}"))
    return flows, problems


# --- probes that cover every case -----------------------------------------------------


def port_probes(manifests: Manifests, extra: Iterable[int] = ()) -> list[int]:
    """Ports on both sides of every boundary the policies draw (port, endPort, container
    ports): what a policy allows is constant between them, so these stand for all 65535."""
    points = {1, 65535, *extra}
    for workload in manifests.workloads.values():
        points.update(cp.port for cp in workload.pod.ports)
    for policy in manifests.policies:
        for key in ("ingress", "egress"):
            for rule in policy["spec"].get(key) or []:
                for entry in rule.get("ports") or []:
                    if isinstance(entry.get("port"), int):
                        points.update((entry["port"], entry.get("endPort", entry["port"])))
    return sorted(q for p in points for q in (p - 1, p, p + 1) if 1 <= q <= 65535)


def ip_block_cidrs(manifests: Manifests) -> Iterator[str]:
    """Every cidr and except range of every ipBlock peer."""
    for policy in manifests.policies:
        for key, peers_key in (("ingress", "from"), ("egress", "to")):
            for rule in policy["spec"].get(key) or []:
                for peer in rule.get(peers_key) or []:
                    if block := peer.get("ipBlock"):
                        yield block["cidr"]
                        yield from block.get("except") or []


def address_probes(manifests: Manifests, extra: Iterable[str] = ()) -> list[str]:
    """Addresses on both sides of both ends of every ipBlock cidr and except range, plus
    `extra`: what an ipBlock allows is constant between them."""
    points = {ipaddress.ip_address(a) for a in extra}
    for cidr in ip_block_cidrs(manifests):
        net = ipaddress.ip_network(cidr, strict=False)
        for addr in (net.network_address, net.broadcast_address):
            points.add(addr)
            for step in (-1, 1):
                with contextlib.suppress(ValueError):  # past the end of the address space
                    points.add(addr + step)
    return sorted((str(a) for a in points), key=lambda a: (ipaddress.ip_address(a).version, ipaddress.ip_address(a)))


def table(rows: Iterable[Sequence[object]], header: Sequence[str]) -> str:
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])
