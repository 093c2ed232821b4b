"""deploy/k8s's NetworkPolicies allow exactly the flows the platform needs, proven without a
cluster: k8s_netpol.py evaluates the policies (Kubernetes' semantics, proven first on small
synthetic cases below), the needed pod-to-pod flows are read from the pods' env (every
address whose host is a Service), and every other connection is checked to be denied.

Kubelet probes are not judged: they come from the pod's own node, which the API allows
("OR if the traffic source is the pod's local node") and most network plugins let through
whatever the policies say.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

_spec = importlib.util.spec_from_file_location("k8s_netpol", Path(__file__).with_name("k8s_netpol.py"))
assert _spec is not None
assert _spec.loader is not None
knp = importlib.util.module_from_spec(_spec)
sys.modules["k8s_netpol"] = knp  # dataclasses look their module up
_spec.loader.exec_module(knp)

Pod, External, ContainerPort, Flow = knp.Pod, knp.External, knp.ContainerPort, knp.Flow

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
M = knp.load(K8S)
NS = M.namespace

# What each pod's program reads of its env (by workload name). The ConfigMap
# platform-config goes to every pod through envFrom, so a variable being there does not
# make it the pod's; each service reads its own prefix (pydantic env_prefix), and:
# - the relays (svckit.outbox) connect only to the database and Redis;
# - wallet-audit, the purges and the migration Jobs only to the database (their URLs are Secrets);
# - docs reads DOCS_SOURCES, Traefik the GATEWAY_* of gateway/dynamic/routes.yml.
READS: dict[str, tuple[str, ...]] = {
    "auth": ("AUTH_*",),
    "wallet": ("WALLET_*",),
    "notifier": ("NOTIFIER_*",),
    "auth-relay": ("AUTH_DATABASE_URL", "AUTH_REDIS_URL"),
    "wallet-relay": ("WALLET_DATABASE_URL", "WALLET_REDIS_URL"),
    "docs": ("DOCS_SOURCES",),
    "gateway": ("GATEWAY_*",),
    "redis": (),
    "migrate-auth": (),
    "migrate-wallet": (),
    "wallet-audit": (),
    "wallet-purge": (),
    "auth-purge": (),
}

# --- the world outside the namespace (cannot be derived from the manifests) ------------
# The namespaces that policies may name; "elsewhere" stands for any other one.
OTHER_NAMESPACES: dict[str, dict[str, str]] = {"kube-system": {}, "monitoring": {}, "elsewhere": {}}
DNS = Pod(
    "kube-dns", "kube-system", {"k8s-app": "kube-dns"}, (ContainerPort("dns", 53, "UDP"), ContainerPort("dns-tcp", 53))
)
PROMETHEUS = Pod("prometheus", "monitoring", {"app.kubernetes.io/name": "prometheus"})
# The managed Postgres is reached at an address in the Secrets' URLs; network.yaml allows
# the private ranges on 5432 until ops narrow them to it. POSTGRES is one such address.
# The evaluator matches ipBlock against addresses outside the cluster only (as the docs
# intend); some plugins (Calico) also match pod and node IPs, and there these wide ranges
# let the database's clients reach any pod or node on 5432: another reason to narrow them.
POSTGRES_NETS = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")]
POSTGRES = External("10.20.30.40")
# Public addresses: a client of the gateway, and Brevo's API (api.brevo.com resolves to
# public addresses that change, hence "0.0.0.0/0 minus private ranges" on 443).
PUBLIC = External("8.8.8.8")
PUBLIC_SAMPLES = ("8.8.8.8", "1.1.1.1", "151.101.1.1", "2606:4700:4700::1111")
# What "public" must exclude: the ranges a cluster, its nodes and its VPC live in (private,
# carrier-grade NAT, link-local with the cloud metadata endpoint 169.254.169.254, loopback).
# Other non-global IPv4 space (0/8, multicast, 240/4) is not reachable over TCP anyway.
INTERNAL_NETS = [
    ipaddress.ip_network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16", "127.0.0.0/8")
]
DB_URL_SUFFIXES = ("_DATABASE_URL", "_MIGRATION_DATABASE_URL")

# Pod-to-pod connections allowed on purpose although no env names them: none so far.
EXTRAS: set[Flow] = set()

CLUSTER = M.cluster(OTHER_NAMESPACES)
PODS = {name: w.pod for name, w in M.workloads.items()}
ENV_FLOWS, ENV_PROBLEMS = knp.env_flows(M, READS)


def metrics_ports(name: str) -> list[Any]:
    """The ports Prometheus scrapes: named `metrics`, or the prometheus.io/port annotation."""
    workload = M.workloads[name]
    annotated = ((workload.template.get("metadata") or {}).get("annotations") or {}).get("prometheus.io/port")
    return [cp for cp in workload.pod.ports if cp.name == "metrics" or str(cp.port) == str(annotated)]


def gateway_web_ports() -> list[Any]:
    """The gateway Service's ports, translated to container ports (targetPort)."""
    return [cp for _, cp in knp.service_targets(M.services["gateway"], None, M)]


def db_pods() -> list[str]:
    return sorted(
        name
        for name, w in M.workloads.items()
        if any(var.endswith(DB_URL_SUFFIXES) for var in knp.pod_env(w, M.configmaps).secret_refs)
    )


def needed_outside() -> list[tuple[Any, Any, int, str, str]]:
    """(src, dst, port, protocol, why) for the flows that cross the namespace's edge."""
    flows = []
    for pod in PODS.values():
        flows += [(pod, DNS, 53, proto, "DNS") for proto in ("UDP", "TCP")]
    flows += [(PODS[name], POSTGRES, 5432, "TCP", "a *_DATABASE_URL Secret") for name in db_pods()]
    flows.append((PODS["notifier"], PUBLIC, 443, "TCP", "Brevo's API"))
    flows += [(PUBLIC, PODS["gateway"], cp.port, cp.protocol, "clients") for cp in gateway_web_ports()]
    for name in PODS:
        flows += [(PROMETHEUS, PODS[name], cp.port, cp.protocol, "metrics") for cp in metrics_ports(name)]
    return flows


def allowed_pod_flows() -> Iterator[tuple[Any, Any, Any]]:
    for src in PODS.values():
        for dst in PODS.values():
            for cp in dst.ports:
                if CLUSTER.allowed(src, dst, cp.port, cp.protocol):
                    yield src, dst, cp


def allowed_table() -> str:
    rows = []
    for src, dst, cp in allowed_pod_flows():
        needed = Flow(src.name, dst.name, cp.port, cp.protocol) in ENV_FLOWS | EXTRAS
        rows.append(
            (
                src.name,
                dst.name,
                f"{cp.port}/{cp.protocol} ({cp.name})",
                ",".join(CLUSTER.egress(src, dst, cp.port, cp.protocol)),
                ",".join(CLUSTER.ingress(src, dst, cp.port, cp.protocol)),
                "yes" if needed else "NO",
            )
        )
    return "allowed pod -> pod flows:\n" + knp.table(rows, ("from", "to", "port", "egress by", "ingress by", "needed"))


# --- the evaluator, proven on tiny synthetic policy sets ------------------------------


def netpol(name: str, spec: dict[str, Any], namespace: str = "app") -> dict[str, Any]:
    return {"kind": "NetworkPolicy", "metadata": {"name": name, "namespace": namespace}, "spec": spec}


WEB = Pod("web", "app", {"app": "web"}, (ContainerPort("http", 8080), ContainerPort("metrics", 9100)))
DB = Pod("db", "app", {"app": "db", "tier": "data"}, (ContainerPort("pg", 5432),))
PEER_A = Pod("peer", "team-a", {"role": "client"})
OTHER_A = Pod("other", "team-a", {"role": "other"})
CLIENT_B = Pod("client", "team-b", {"role": "client"})
NAMESPACES = {"app": {}, "team-a": {"team": "a"}, "team-b": {"team": "b"}}
DENY_ALL = netpol("deny", {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]})


def cluster(*policies: dict[str, Any]) -> Any:
    return knp.Cluster(NAMESPACES, policies)


class TestEvaluator:
    def test_no_policy_allows_everything(self) -> None:
        c = cluster()
        assert c.allowed(WEB, DB, 5432)
        assert c.allowed(External("8.8.8.8"), WEB, 1, "UDP")
        assert c.allowed(DB, External("8.8.8.8"), 25)
        assert not c.isolated(WEB, "Ingress")

    def test_default_deny_denies_both_ways_and_an_empty_rule_list_allows_nothing(self) -> None:
        c = cluster(DENY_ALL)
        assert not c.allowed(WEB, DB, 5432)
        assert not c.allowed(PEER_A, WEB, 8080)
        assert not c.allowed(WEB, External("8.8.8.8"), 443)
        ingress_only = cluster(netpol("deny-in", {"podSelector": {}, "ingress": []}))
        assert not ingress_only.allowed(PEER_A, WEB, 8080)
        assert ingress_only.allowed(WEB, PEER_A, 1)

    def test_policy_types_default_to_ingress_plus_egress_when_egress_rules_exist(self) -> None:
        # Egress rules only, no policyTypes: Ingress is set too, so ingress is now denied.
        egress_rules = netpol("e", {"podSelector": {"matchLabels": {"app": "web"}}, "egress": [{}]})
        c = cluster(egress_rules)
        assert c.isolated(WEB, "Ingress")
        assert c.isolated(WEB, "Egress")
        assert not c.allowed(DB, WEB, 8080)
        assert c.allowed(WEB, DB, 5432)
        # Ingress rules only: egress stays open. Explicit types: rules of other types are ignored.
        assert not cluster(netpol("i", {"podSelector": {}, "ingress": [{}]})).isolated(WEB, "Egress")
        explicit = netpol("x", {"podSelector": {}, "policyTypes": ["Egress"], "ingress": [{}], "egress": []})
        assert not cluster(explicit).isolated(WEB, "Ingress")
        assert not cluster(explicit).allowed(WEB, DB, 5432)

    def test_a_rule_without_peers_or_ports_allows_all_and_policies_add_up(self) -> None:
        open_in = netpol("open", {"podSelector": {"matchLabels": {"app": "db"}}, "ingress": [{}]})
        c = cluster(
            DENY_ALL,
            open_in,
            netpol(
                "web-out",
                {
                    "podSelector": {"matchLabels": {"app": "web"}},
                    "policyTypes": ["Egress"],
                    "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "db"}}}]}],
                },
            ),
        )
        assert c.allowed(WEB, DB, 5432)
        assert c.allowed(WEB, DB, 1, "SCTP")
        assert not c.allowed(DB, WEB, 8080)  # db's egress and web's ingress are still denied
        assert c.allowed(PEER_A, DB, 5432)  # team-a has no policy (egress open), db admits all
        assert not cluster(DENY_ALL, open_in).allowed(WEB, DB, 5432)  # both ends must allow

    def test_namespace_and_pod_selector_in_one_peer_is_and_in_two_peers_is_or(self) -> None:
        and_peer = [
            {"namespaceSelector": {"matchLabels": {"team": "a"}}, "podSelector": {"matchLabels": {"role": "client"}}}
        ]
        or_peers = [
            {"namespaceSelector": {"matchLabels": {"team": "a"}}},
            {"podSelector": {"matchLabels": {"role": "client"}}},
        ]
        conj = cluster(netpol("and", {"podSelector": {}, "ingress": [{"from": and_peer}]}))
        disj = cluster(netpol("or", {"podSelector": {}, "ingress": [{"from": or_peers}]}))
        assert conj.allowed(PEER_A, DB, 5432)
        assert not conj.allowed(OTHER_A, DB, 5432)
        assert not conj.allowed(CLIENT_B, DB, 5432)
        assert disj.allowed(OTHER_A, DB, 5432)  # any pod of team-a
        # podSelector alone means the policy's own namespace: team-b's client is not in it.
        assert not disj.allowed(CLIENT_B, DB, 5432)
        assert disj.allowed(Pod("c", "app", {"role": "client"}), DB, 5432)
        assert not disj.allowed(External("10.0.0.1"), DB, 5432)  # selectors never match addresses

    def test_match_expressions(self) -> None:
        expressions = [
            {"key": "tier", "operator": "In", "values": ["data"]},
            {"key": "app", "operator": "NotIn", "values": ["web"]},
            {"key": "missing", "operator": "DoesNotExist"},
            {"key": "app", "operator": "Exists"},
        ]
        assert knp.selector_matches({"matchExpressions": expressions}, DB.labels)
        assert not knp.selector_matches({"matchExpressions": expressions}, WEB.labels)
        assert knp.selector_matches({"matchExpressions": [{"key": "x", "operator": "NotIn", "values": ["y"]}]}, {})
        assert knp.selector_matches({}, {})
        assert not knp.selector_matches({"matchLabels": {"a": "b"}}, {})

    def test_ip_block_except(self) -> None:
        block = {"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8", "192.168.1.0/24"]}}
        c = cluster(
            DENY_ALL,
            netpol(
                "out",
                {"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"to": [block], "ports": [{"port": 443}]}]},
            ),
        )
        assert c.allowed(WEB, External("8.8.8.8"), 443)
        assert c.allowed(WEB, External("192.168.2.1"), 443)
        assert not c.allowed(WEB, External("10.1.2.3"), 443)
        assert not c.allowed(WEB, External("192.168.1.7"), 443)
        assert not c.allowed(WEB, External("8.8.8.8"), 80)
        assert not c.allowed(WEB, External("2606:4700::1"), 443)  # an IPv4 cidr holds no IPv6
        # ipBlock is for addresses outside the cluster: it never selects a pod.
        assert not c.egress(WEB, DB, 443)

    def test_named_ports_end_port_and_protocol_default(self) -> None:
        rule = {"ports": [{"port": "http"}, {"port": 9000, "endPort": 9100, "protocol": "UDP"}, {"port": 5432}]}
        c = cluster(netpol("in", {"podSelector": {}, "ingress": [rule]}))
        assert c.allowed(PEER_A, WEB, 8080)  # "http" is web's 8080
        assert not c.allowed(PEER_A, DB, 8080)  # db has no port named http
        assert not c.allowed(PEER_A, WEB, 8080, "UDP")  # a named port has a protocol too
        assert c.allowed(PEER_A, WEB, 9100, "UDP")
        assert c.allowed(PEER_A, WEB, 9000, "UDP")
        assert not c.allowed(PEER_A, WEB, 9100)
        assert not c.allowed(PEER_A, WEB, 9101, "UDP")
        assert c.allowed(PEER_A, DB, 5432)
        assert not c.allowed(PEER_A, DB, 5432, "UDP")
        egress_named = cluster(
            netpol("out", {"podSelector": {}, "egress": [{"ports": [{"port": "pg"}]}], "policyTypes": ["Egress"]})
        )
        assert egress_named.egress(WEB, DB, 5432)
        assert not egress_named.egress(WEB, External("8.8.8.8"), 5432)
        protocol_only = cluster(netpol("udp", {"podSelector": {}, "ingress": [{"ports": [{"protocol": "UDP"}]}]}))
        assert protocol_only.allowed(PEER_A, WEB, 12345, "UDP")
        assert not protocol_only.allowed(PEER_A, WEB, 12345)

    def test_flows_are_read_from_env_through_the_service_target_port(self, tmp_path: Path) -> None:
        (tmp_path / "kustomization.yaml").write_text("namespace: ns\n")
        (tmp_path / "all.yaml").write_text(
            """
kind: ConfigMap
metadata: {name: cfg}
data: {A_URL: "http://svc:80/x", A_ADDRS: "cache:6379, svc:81", B_URL: "http://svc"}
---
kind: Deployment
metadata: {name: a}
spec:
  template:
    metadata: {labels: {app: a}}
    spec:
      containers:
        - name: a
          envFrom: [{configMapRef: {name: cfg}}]
          env: [{name: A_CACHE, value: "redis://:$(PASSWORD)@cache.ns.svc.cluster.local:6379/0"}]
---
kind: StatefulSet
metadata: {name: b}
spec:
  template:
    metadata: {labels: {app: b}}
    spec:
      containers: [{name: b, ports: [{name: web, containerPort: 8080}, {containerPort: 6379}]}]
---
kind: Service
metadata: {name: svc}
spec: {selector: {app: b}, ports: [{port: 80, targetPort: web}]}
---
kind: Service
metadata: {name: cache}
spec: {selector: {app: b}, ports: [{port: 6379}]}
"""
        )
        manifests = knp.load(tmp_path)
        flows, problems = knp.env_flows(manifests, {"a": ("A_*",), "b": ()})
        assert {(f.src, f.dst, f.port) for f in flows} == {("a", "b", 8080), ("a", "b", 6379)}
        assert problems == ["a: A_ADDRS names svc:81, which Service svc does not serve"]
        assert knp.addresses("redis://:$(REDIS_PASSWORD)@redis:6379/0") == [("redis", 6379)]


# --- the real manifests --------------------------------------------------------------


def test_every_pod_has_reads_and_every_env_address_resolves() -> None:
    assert not ENV_PROBLEMS, ENV_PROBLEMS
    assert set(READS) == set(PODS), "READS lists exactly the workloads"


def test_the_flows_read_from_env_include_the_gateway_routes() -> None:
    # A floor, so a parsing slip cannot make the needed set (and so the checks) vacuous.
    assert {
        ("gateway", "auth", 8000),
        ("gateway", "wallet", 8000),
        ("gateway", "docs", 8000),
        ("gateway", "redis", 6379),
    } <= {(f.src, f.dst, f.port) for f in ENV_FLOWS}


def test_every_needed_flow_is_allowed() -> None:
    denied = [
        (f.src, f.dst, f"{f.port}/{f.protocol}", f.why)
        for f in sorted(ENV_FLOWS)
        if not CLUSTER.allowed(PODS[f.src], PODS[f.dst], f.port, f.protocol)
    ]
    denied += [
        (src.name, dst.name, f"{port}/{proto}", why)
        for src, dst, port, proto, why in needed_outside()
        if not CLUSTER.allowed(src, dst, port, proto)
    ]
    assert not denied, (
        "needed flows denied:\n" + knp.table(denied, ("from", "to", "port", "why")) + "\n\n" + allowed_table()
    )


def test_nothing_else_is_allowed_between_the_pods() -> None:
    extra = [
        (src.name, dst.name, f"{cp.port}/{cp.protocol} ({cp.name})")
        for src, dst, cp in allowed_pod_flows()
        if Flow(src.name, dst.name, cp.port, cp.protocol) not in ENV_FLOWS | EXTRAS
    ]
    assert not extra, "allowed but not needed:\n" + knp.table(extra, ("from", "to", "port")) + "\n\n" + allowed_table()


def test_each_side_alone_allows_only_the_needed_flows() -> None:
    """Defence in depth: the source's egress and the destination's ingress are each tight
    on their own, so loosening one policy later does not open a flow. The one exception is
    the gateway's web port, open to every source on the ingress side by design."""
    web = {(cp.port, cp.protocol) for cp in gateway_web_ports()}
    loose = []
    for src in PODS.values():
        for dst in PODS.values():
            for cp in dst.ports:
                if Flow(src.name, dst.name, cp.port, cp.protocol) in ENV_FLOWS | EXTRAS:
                    continue
                if CLUSTER.egress(src, dst, cp.port, cp.protocol):
                    loose.append((src.name, dst.name, f"{cp.port}/{cp.protocol}", "egress of " + src.name))
                public = dst.name == "gateway" and (cp.port, cp.protocol) in web
                if CLUSTER.ingress(src, dst, cp.port, cp.protocol) and not public:
                    loose.append((src.name, dst.name, f"{cp.port}/{cp.protocol}", "ingress of " + dst.name))
    assert not loose, "one side allows a flow nobody needs:\n" + knp.table(loose, ("from", "to", "port", "allowed by"))


def foreign_pods() -> list[Any]:
    """Pods of other namespaces, unlabelled or wearing our pods' labels."""
    label_sets = [{}, *(p.labels for p in PODS.values()), DNS.labels, PROMETHEUS.labels]
    return [
        Pod(f"{ns}/{dict(labels)}", ns, labels)
        for ns in ("elsewhere", "kube-system", "monitoring")
        for labels in label_sets
    ]


PORTS = knp.port_probes(M, extra=(53, 80, 443, 5432))
ADDRESSES = knp.address_probes(M, extra=(*PUBLIC_SAMPLES, POSTGRES.ip, "10.244.0.10", "169.254.169.254", "fd00::1"))


def test_from_outside_only_the_gateway_web_port_and_metrics_for_monitoring() -> None:
    web = {(cp.port, cp.protocol) for cp in gateway_web_ports()}
    wrong = []
    sources = [*foreign_pods(), *(External(a) for a in ADDRESSES)]
    for dst in PODS.values():
        metrics = {(cp.port, cp.protocol) for cp in metrics_ports(dst.name)}
        for src in sources:
            for port in PORTS:
                for proto in knp.PROTOCOLS:
                    if not CLUSTER.allowed(src, dst, port, proto):
                        continue
                    expected = (dst.name == "gateway" and (port, proto) in web) or (
                        isinstance(src, Pod) and src.namespace == "monitoring" and (port, proto) in metrics
                    )
                    if not expected:
                        wrong.append((src.name, dst.name, f"{port}/{proto}"))
    assert not wrong, "reachable from outside the namespace:\n" + knp.table(wrong[:60], ("from", "to", "port"))


def test_to_outside_only_dns_postgres_and_brevo() -> None:
    """Egress to other namespaces: DNS only. To addresses: public ones only from the
    notifier on 443, private ones only from the database's clients on 5432. ADDRESSES and
    PORTS hold both sides of every boundary the policies draw, so this covers them all."""
    wrong = []
    databases = set(db_pods())
    for src in PODS.values():
        for dst in [*foreign_pods(), DNS]:
            for port in PORTS:
                for proto in knp.PROTOCOLS:
                    dns = dst.namespace == "kube-system" and dst.labels == DNS.labels and port == 53 and proto != "SCTP"
                    if CLUSTER.allowed(src, dst, port, proto) and not dns:
                        wrong.append((src.name, dst.name, f"{port}/{proto}"))
        for address in ADDRESSES:
            ip = ipaddress.ip_address(address)
            for port in PORTS:
                for proto in knp.PROTOCOLS:
                    if not CLUSTER.allowed(src, External(address), port, proto):
                        continue
                    internal = any(ip in n for n in INTERNAL_NETS if n.version == ip.version)
                    brevo = src.name == "notifier" and not internal and (port, proto) == (443, "TCP")
                    postgres = (
                        src.name in databases and any(ip in n for n in POSTGRES_NETS) and (port, proto) == (5432, "TCP")
                    )
                    if not (brevo or postgres):
                        wrong.append((src.name, address, f"{port}/{proto}"))
    assert not wrong, "egress beyond DNS, Postgres and Brevo:\n" + knp.table(wrong[:60], ("from", "to", "port"))


@pytest.mark.parametrize("direction", ["Ingress", "Egress"])
def test_every_pod_is_under_a_default_deny(direction: str) -> None:
    """A policy that selects every pod ({}, so new workloads too) and allows nothing."""
    key = direction.lower()
    deny = [
        p
        for p in M.policies
        if p["spec"].get("podSelector") in ({}, None)
        and direction in knp.policy_types(p["spec"])
        and not p["spec"].get(key)
    ]
    assert deny, f"no default-deny for {direction}"
    assert all(CLUSTER.isolated(pod, direction) for pod in PODS.values())
