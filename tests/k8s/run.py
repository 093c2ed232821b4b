"""`make test-k8s`: every workload of deploy/k8s starts, on a host with Docker and no cluster.

1. Renders the kustomize base itself (tests/k8s/kube.py; compared with `kubectl kustomize`
   when kubectl is on PATH), refusing any kustomize feature it does not implement.
2. Builds the services' images from their real Dockerfiles under the names and tags the
   manifests use; third-party images map to the local stand-ins of deploy/images/ (names
   from docker-compose.yml and deploy/compose/local-images.yml) unless
   COMPOSE_BASE_IMAGES=official. The engine, tools and base images are tests/compose/run.py's.
3. Starts a stand-in for the managed Postgres (deploy/postgres/init-databases.sh creates the
   databases and their _owner/_app roles) and the Secrets the manifests reference, with
   random values; the notifier's Brevo is tests/tools/brevo_stub.py.
4. Acts as a minimal kubelet: per pod a sandbox container holding the network namespace
   (aliases: the pod's name and the Services selecting it), init containers in order, then
   the containers, with the pod's securityContext, env, volumes (kubelet's file modes and
   ownership), resource limits and probes (from the host to the pod's IP; exec through
   `docker exec`). Jobs and Deployments start together, as after a `kubectl apply`.
5. Pass: every Deployment/StatefulSet pod Ready, its liveness probe passing for WATCH_S
   more seconds, no container exits; Jobs exit 0; signup, token, wallet and deposit through
   the gateway pod, the welcome email at the Brevo stub; then the CronJob's job, once, exit 0.

Not emulated (said here rather than pretended): NetworkPolicies (no CNI), PDBs and the HPA
(checked for selecting something only), ClusterIPs (Service names resolve to the pods'
IPs straight, so Service port == target port is required of in-cluster clients), and
Docker's DNS answers for pods that are not Ready yet.

Logs: var/k8s/logs/<run>/. Everything created is removed at the end, on Ctrl-C and on TERM.
Where no engine can run, it says why and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import http.client
import importlib.util
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kube

ROOT = Path(__file__).resolve().parents[2]
WORK = ROOT / "var" / "k8s"
LABEL = "wallet-platform.test-k8s"
WATCH_S = float(os.environ.get("K8S_WATCH_S", "30"))
READY_TIMEOUT_S = float(os.environ.get("K8S_READY_TIMEOUT_S", "300"))
# Replicas per Deployment here (the manifests' counts are for a cluster): one each;
# K8S_WALLET_REPLICAS=2 puts two wallets behind one Service name (the HPA's minimum).
REPLICAS = {"wallet": int(os.environ.get("K8S_WALLET_REPLICAS", "1"))}
# "Loosely": on a shared, loaded host a pod may take longer to first answer than the
# manifests' liveness timing allows (initialDelaySeconds + failureThreshold x periodSeconds).
# Liveness failures before the container's first passing probe count only after this much
# time; each one the kubelet's exact timing would have restarted is reported as a WARNING.
START_GRACE_S = float(os.environ.get("K8S_START_GRACE_S", "150"))

# What the emulation knows of a pod spec. Mapped: the first set. Ignored, with the reason:
# the second (scheduling and API-side matters; no pod here gets a service account token,
# whatever automountServiceAccountToken says, and none is needed).
POD_KEYS = {"containers", "initContainers", "volumes", "securityContext", "restartPolicy", "enableServiceLinks"}
POD_IGNORED = {
    "automountServiceAccountToken",
    "serviceAccountName",
    "terminationGracePeriodSeconds",
    "topologySpreadConstraints",
    "affinity",
    "nodeSelector",
    "tolerations",
    "priorityClassName",
}
CONTAINER_KEYS = {
    "name",
    "image",
    "imagePullPolicy",
    "command",
    "args",
    "env",
    "envFrom",
    "ports",
    "securityContext",
    "volumeMounts",
    "readinessProbe",
    "livenessProbe",
    "startupProbe",
    "resources",
    "workingDir",
    "lifecycle",  # preStop runs at termination only; the run ends by removing the containers
}
POD_SC_KEYS = {"runAsNonRoot", "runAsUser", "runAsGroup", "fsGroup", "supplementalGroups", "seccompProfile"}
CONTAINER_SC_KEYS = {
    "runAsNonRoot",
    "runAsUser",
    "runAsGroup",
    "seccompProfile",
    "allowPrivilegeEscalation",
    "readOnlyRootFilesystem",
    "capabilities",
    "privileged",
}
PROBE_KEYS = {
    "httpGet",
    "tcpSocket",
    "exec",
    "initialDelaySeconds",
    "periodSeconds",
    "timeoutSeconds",
    "failureThreshold",
    "successThreshold",
}
# Kinds with no pod: checked where cheap, not run.
PASSIVE_KINDS = {
    "Namespace",
    "ConfigMap",
    "Service",
    "HorizontalPodAutoscaler",
    "PodDisruptionBudget",
    "NetworkPolicy",
    "ServiceAccount",
}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "Job", "CronJob"}


def load_compose_run() -> ModuleType:
    spec = importlib.util.spec_from_file_location("compose_run", ROOT / "tests" / "compose" / "run.py")
    if spec is None or spec.loader is None:
        raise SystemExit("test-k8s: tests/compose/run.py cannot be loaded")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.NAME = "test-k8s"
    module.WORK = WORK
    return module


compose = load_compose_run()
say = compose.say
BREVO_KEY = compose.BREVO_KEY  # the key brevo_stub() starts the stub with


def docker(*args: str, check: bool = True, env: dict[str, str] | None = None, timeout: float = 120) -> str:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, check=False, env=env, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"docker {shlex.join(args[:3])} ...: {result.stderr.strip()[-800:]}")
    return result.stdout.strip()


class Failure(Exception):
    pass


@dataclass
class Probe:
    kind: str  # startup, readiness, liveness
    spec: dict[str, Any]
    successes: int = 0  # consecutive
    failures: int = 0  # consecutive
    total_ok: int = 0
    last: str = ""
    slowest: float = 0.0
    passed_once: bool = False
    warned: bool = False

    @property
    def threshold(self) -> int:
        return int(self.spec.get("failureThreshold", 3))


@dataclass
class Container:
    name: str
    docker_name: str
    spec: dict[str, Any]
    user: str
    probes: list[Probe] = field(default_factory=list)
    started: bool = False


@dataclass
class Pod:
    name: str
    workload: str
    kind: str  # Deployment, StatefulSet, Job
    spec: dict[str, Any]
    labels: dict[str, str]
    aliases: list[str]
    sandbox: str = ""
    ip: str = ""
    containers: list[Container] = field(default_factory=list)
    phase: str = "Pending"  # Pending, Running, Succeeded, Failed
    stage: str = "creating"
    ready: bool = False
    error: str = ""

    @property
    def long_running(self) -> bool:
        return self.kind in ("Deployment", "StatefulSet")


class Cluster:
    def __init__(self, docs: list[dict[str, Any]], run_id: str, tmp: Path, image_map: dict[str, str]) -> None:
        self.docs = docs
        self.run = run_id
        self.tmp = tmp
        self.image_map = image_map
        self.network = f"{run_id}-net"
        self.stop = threading.Event()
        self.launch = threading.Lock()
        self.lock = threading.Lock()
        self.pods: list[Pod] = []
        self.config_maps: dict[str, dict[str, str]] = {}
        self.secrets: dict[str, dict[str, bytes]] = {}
        self.services = [d for d in docs if d["kind"] == "Service"]
        self.failures: list[str] = []
        self.warnings: list[str] = []
        self.image_config: dict[str, dict[str, Any]] = {}
        self.threads: list[threading.Thread] = []

    # docker plumbing ------------------------------------------------------------------

    def image(self, name: str) -> str:
        return self.image_map.get(name, name)

    def config_of(self, image: str) -> dict[str, Any]:
        if image not in self.image_config:
            self.image_config[image] = json.loads(docker("image", "inspect", "--format", "{{json .Config}}", image))
        return self.image_config[image]

    def docker_run(self, args: list[str], env: dict[str, str] | None = None) -> str:
        with self.launch:
            if self.stop.is_set():
                raise Failure("stopping")
            return docker("run", "-d", "--label", f"{LABEL}={self.run}", *args, env=env)

    def fail(self, pod: Pod, message: str) -> None:
        with self.lock:
            if pod.phase != "Failed":
                pod.phase = "Failed"
                pod.error = message
                self.failures.append(f"{pod.name}: {message}")
        say(f"FAILURE {pod.name}: {message}")

    # pods -------------------------------------------------------------------------------

    def plan(self) -> None:
        """Pods for every workload; CronJobs become one Job, started after the smoke."""
        for doc in self.docs:
            kind, name = doc["kind"], doc["metadata"]["name"]
            if kind == "ConfigMap":
                self.config_maps[name] = dict(doc.get("data") or {})
            elif kind == "Secret":
                raise SystemExit(f"test-k8s: FAILED: Secret {name} is in the manifests (ops create Secrets)")
            elif kind not in PASSIVE_KINDS | WORKLOAD_KINDS:
                raise kube.Unsupported(f"kind {kind}")
        for doc in self.docs:
            kind, name = doc["kind"], doc["metadata"]["name"]
            if kind == "Deployment" or kind == "StatefulSet":
                template = doc["spec"]["template"]
                selector = doc["spec"]["selector"].get("matchLabels", {})
                labels = template["metadata"].get("labels", {})
                if not selector or any(labels.get(k) != v for k, v in selector.items()):
                    raise SystemExit(f"test-k8s: FAILED: {kind} {name}: selector {selector} does not match {labels}")
                count = min(int(doc["spec"].get("replicas", 1)), REPLICAS.get(name, 1))
                for i in range(count):
                    pod_name = f"{name}-{i}" if kind == "StatefulSet" else f"{name}-{secrets.token_hex(3)}"
                    self.pods.append(self.new_pod(pod_name, name, kind, template, doc))
            elif kind == "Job":
                template = doc["spec"]["template"]
                self.pods.append(self.new_pod(f"{name}-{secrets.token_hex(3)}", name, "Job", template, doc))
        for svc in self.services:
            selector = svc["spec"].get("selector", {})
            chosen = [p for p in self.pods if all(p.labels.get(k) == v for k, v in selector.items())]
            if not chosen:
                raise SystemExit(f"test-k8s: FAILED: Service {svc['metadata']['name']} selects no pod ({selector})")
            for port in svc["spec"].get("ports", []):
                target = port.get("targetPort", port["port"])
                for pod in chosen:
                    if isinstance(target, str) and not any(
                        p.get("name") == target for c in pod.spec["containers"] for p in c.get("ports", [])
                    ):
                        raise SystemExit(
                            f"test-k8s: FAILED: Service {svc['metadata']['name']}: no container port named {target}"
                        )
        for doc in self.docs:
            if doc["kind"] == "PodDisruptionBudget":
                selector = doc["spec"]["selector"].get("matchLabels", {})
                if not any(all(p.labels.get(k) == v for k, v in selector.items()) for p in self.pods):
                    raise SystemExit(f"test-k8s: FAILED: PodDisruptionBudget {doc['metadata']['name']} selects no pod")
            if doc["kind"] == "HorizontalPodAutoscaler":
                ref = doc["spec"]["scaleTargetRef"]
                if not any(d["kind"] == ref["kind"] and d["metadata"]["name"] == ref["name"] for d in self.docs):
                    raise SystemExit(f"test-k8s: FAILED: HorizontalPodAutoscaler {doc['metadata']['name']}: no {ref}")

    def new_pod(self, pod_name: str, workload: str, kind: str, template: dict[str, Any], doc: dict[str, Any]) -> Pod:
        spec = copy.deepcopy(template["spec"])
        unknown = set(spec) - POD_KEYS - POD_IGNORED
        if unknown:
            raise kube.Unsupported(f"pod spec keys {sorted(unknown)} ({workload})")
        labels = dict(template.get("metadata", {}).get("labels", {}))
        namespace = doc["metadata"].get("namespace", "default")
        aliases = [pod_name]
        for svc in self.services:
            selector = svc["spec"].get("selector", {})
            if selector and all(labels.get(k) == v for k, v in selector.items()):
                name = svc["metadata"]["name"]
                aliases += [
                    name,
                    f"{name}.{namespace}",
                    f"{name}.{namespace}.svc",
                    f"{name}.{namespace}.svc.cluster.local",
                ]
        if kind == "StatefulSet":
            aliases.append(f"{pod_name}.{doc['spec']['serviceName']}")
            for claim in doc["spec"].get("volumeClaimTemplates", []):
                spec.setdefault("volumes", []).append({"name": claim["metadata"]["name"], "persistentVolumeClaim": {}})
        return Pod(pod_name, workload, kind, spec, labels, aliases)

    def security(self, pod: Pod, container: dict[str, Any], image: str) -> tuple[list[str], str]:
        """docker run options for the effective securityContext, and the user; refuses what
        the kubelet refuses (verifyRunAsNonRoot) and what the design forbids."""
        psc = pod.spec.get("securityContext") or {}
        csc = container.get("securityContext") or {}
        for keys, sc, what in ((POD_SC_KEYS, psc, "pod"), (CONTAINER_SC_KEYS, csc, "container")):
            if set(sc) - keys:
                raise kube.Unsupported(f"{what} securityContext keys {sorted(set(sc) - keys)}")
        eff = {**psc, **csc}
        where = f"container {container['name']}"
        problems = []
        if not eff.get("runAsNonRoot"):
            problems.append("runAsNonRoot is not true")
        if eff.get("privileged"):
            problems.append("privileged")
        if csc.get("allowPrivilegeEscalation") is not False:
            problems.append("allowPrivilegeEscalation is not false")
        if "ALL" not in (csc.get("capabilities") or {}).get("drop", []):
            problems.append("capabilities.drop lacks ALL")
        if (eff.get("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
            problems.append("seccompProfile is not RuntimeDefault")
        if not csc.get("readOnlyRootFilesystem"):
            problems.append("readOnlyRootFilesystem is not true")
        if problems:
            raise Failure(f"{where}: restricted policy (deploy/README.md): " + ", ".join(problems))
        # kubelet kuberuntime_container_linux.go verifyRunAsNonRoot
        user = str(self.config_of(image).get("User") or "")
        if "runAsUser" in eff:
            if int(eff["runAsUser"]) == 0:
                raise Failure(f"{where}: container's runAsUser breaks non-root policy")
        else:
            name = user.split(":", 1)[0]
            if not name or name == "0" or name == "root":
                raise Failure(f"{where}: container has runAsNonRoot and image will run as root")
            if not name.isdigit():
                raise Failure(
                    f"{where}: container has runAsNonRoot and image has non-numeric user ({name}), "
                    "cannot verify user is non-root"
                )
        uid = str(eff.get("runAsUser", user.split(":", 1)[0]))
        gid = eff.get("runAsGroup")
        run_user = f"{uid}:{gid}" if gid is not None else uid
        opts = ["--user", run_user]
        for group in [*([psc["fsGroup"]] if "fsGroup" in psc else []), *psc.get("supplementalGroups", [])]:
            opts += ["--group-add", str(group)]
        if csc.get("readOnlyRootFilesystem"):
            opts.append("--read-only")
        caps = csc.get("capabilities") or {}
        opts += [f"--cap-drop={c}" for c in caps.get("drop", [])] + [f"--cap-add={c}" for c in caps.get("add", [])]
        if csc.get("allowPrivilegeEscalation") is False:
            opts += ["--security-opt", "no-new-privileges"]
        if (eff.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            raise kube.Unsupported("seccompProfile other than RuntimeDefault")
        # RuntimeDefault is Docker's default profile: no option.
        return opts, run_user

    def volumes(self, pod: Pod) -> dict[str, tuple[Path, bool]]:
        """Host directories for the pod's volumes (path, read-only), made as the kubelet does."""
        fs_group = (pod.spec.get("securityContext") or {}).get("fsGroup")
        out: dict[str, tuple[Path, bool]] = {}
        for volume in pod.spec.get("volumes", []):
            name = volume["name"]
            path = self.tmp / "pods" / pod.name / "volumes" / name
            kinds = set(volume) - {"name"}
            if kinds == {"emptyDir"}:
                if set(volume["emptyDir"] or {}) - {"sizeLimit", "medium"} or (volume["emptyDir"] or {}).get("medium"):
                    raise kube.Unsupported(f"emptyDir {volume['emptyDir']}")
                path.mkdir(parents=True)
                path.chmod(0o777)  # emptydir.go setupDir: perm 0777
                kube.set_volume_ownership(path, fs_group, read_only=False)
                out[name] = (path, False)
            elif kinds == {"persistentVolumeClaim"}:
                # A fresh filesystem's root (root:root 0755), then the fsGroup ownership the
                # kubelet applies to block-backed volumes.
                path.mkdir(parents=True)
                path.chmod(0o755)
                kube.set_volume_ownership(path, fs_group, read_only=False)
                out[name] = (path, False)
            elif kinds == {"configMap"}:
                source = volume["configMap"]
                data = self.config_maps.get(source["name"])
                if data is None:
                    raise Failure(f"volume {name}: ConfigMap {source['name']} not found")
                files = kube.projected_files(
                    source, {k: v.encode() for k, v in data.items()}, f"ConfigMap {source['name']}"
                )
                kube.write_atomic_volume(path, files)
                kube.set_volume_ownership(path, fs_group, read_only=True)
                out[name] = (path, True)
            elif kinds == {"secret"}:
                source = volume["secret"]
                sdata = self.secrets.get(source["secretName"])
                if sdata is None:
                    raise Failure(f"volume {name}: Secret {source['secretName']} not found")
                files = kube.projected_files(source, sdata, f"Secret {source['secretName']}")
                kube.write_atomic_volume(path, files)
                kube.set_volume_ownership(path, fs_group, read_only=True)
                out[name] = (path, True)
            else:
                raise kube.Unsupported(f"volume {name} of type {sorted(kinds)}")
        return out

    def container_args(
        self, pod: Pod, container: dict[str, Any], vols: dict[str, tuple[Path, bool]]
    ) -> tuple[list[str], dict[str, str], str]:
        unknown = set(container) - CONTAINER_KEYS
        if unknown:
            raise kube.Unsupported(f"container keys {sorted(unknown)} ({container['name']})")
        image = self.image(container["image"])
        opts, user = self.security(pod, container, image)
        links = (
            {} if pod.spec.get("enableServiceLinks") is False else kube.service_links(self.services, self.fake_ips())
        )
        fields = {
            "metadata.name": pod.name,
            "metadata.namespace": "wallet-platform",
            "status.podIP": pod.ip,
            "spec.nodeName": "k8srun",
        }
        env = kube.container_env(container, self.config_maps, self.secrets, links, fields)
        entrypoint, args = kube.command_line(container, self.config_of(image), env)
        for mount in container.get("volumeMounts", []):
            if set(mount) - {"name", "mountPath", "readOnly", "subPath"}:
                raise kube.Unsupported(
                    f"volumeMount keys {sorted(set(mount) - {'name', 'mountPath', 'readOnly', 'subPath'})}"
                )
            if mount["name"] not in vols:
                raise Failure(f"container {container['name']}: volumeMount {mount['name']} has no volume")
            src, read_only = vols[mount["name"]]
            if mount.get("subPath"):
                # kubelet bind-mounts the resolved path, refusing one that leaves the volume.
                resolved = Path(os.path.realpath(src / mount["subPath"]))
                if not resolved.is_relative_to(Path(os.path.realpath(src))):
                    raise Failure(f"subPath {mount['subPath']} leaves volume {mount['name']}")
                src = resolved
            ro = read_only or bool(mount.get("readOnly"))
            opts += ["--mount", f"type=bind,src={src},dst={mount['mountPath']}" + (",readonly" if ro else "")]
        limits = (container.get("resources") or {}).get("limits") or {}
        if "memory" in limits:
            mem = str(int(kube.quantity(limits["memory"])))
            opts += ["--memory", mem, "--memory-swap", mem]
        if "cpu" in limits:
            opts += ["--cpus", f"{kube.quantity(limits['cpu']):g}"]
        if container.get("workingDir"):
            opts += ["--workdir", container["workingDir"]]
        client_env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "DOCKER_HOST", "DOCKER_CONFIG")}
        client_env.update(env)
        opts += [arg for name in env for arg in ("-e", name)]
        if entrypoint is not None:
            opts += ["--entrypoint", entrypoint[0]]
            args = entrypoint[1:] + args
        pull = ["--pull", "never"] if self.image_map else []
        return [*opts, *pull, image, *args], client_env, user

    def fake_ips(self) -> dict[str, str]:
        return {s["metadata"]["name"]: f"10.96.1.{i + 10}" for i, s in enumerate(self.services)}

    def start_pod(self, pod: Pod) -> None:
        try:
            vols = self.volumes(pod)
            pod.sandbox = f"{self.run}-{pod.name}"
            alias_args = [a for alias in pod.aliases for a in ("--network-alias", alias)]
            sandbox_image = self.image("python:3.11-slim")
            self.docker_run(
                [
                    "--name", pod.sandbox, "--hostname", pod.name, "--network", self.network, *alias_args,
                    "--user", "65535:65535", "--read-only", "--cap-drop=ALL", "--security-opt", "no-new-privileges",
                    "--entrypoint", "sleep", "--pull", "never", sandbox_image, "infinity",
                ]
            )  # fmt: skip
            pod.ip = docker(
                "inspect",
                "--format",
                f'{{{{(index .NetworkSettings.Networks "{self.network}").IPAddress}}}}',
                pod.sandbox,
            )
            pod.phase = "Running"
            for init in pod.spec.get("initContainers", []):
                args, env, user = self.container_args(pod, init, vols)
                name = f"{pod.sandbox}-{init['name']}"
                pod.containers.append(Container(init["name"], name, init, user))
                pod.stage = f"init container {init['name']} running"
                self.docker_run(["--name", name, "--network", f"container:{pod.sandbox}", *args], env)
                code = docker("wait", name, timeout=READY_TIMEOUT_S)
                if code != "0":
                    raise Failure(f"init container {init['name']} exited {code}:\n{self.tail(name)}")
            for spec in pod.spec["containers"]:
                args, env, user = self.container_args(pod, spec, vols)
                name = f"{pod.sandbox}-{spec['name']}"
                container = Container(spec["name"], name, spec, user)
                pod.containers.append(container)
                self.docker_run(["--name", name, "--network", f"container:{pod.sandbox}", *args], env)
                container.started = True
                pod.stage = "containers started"
                if pod.long_running:
                    t = threading.Thread(target=self.probe_loop, args=(pod, container), daemon=True)
                    t.start()
            if not pod.long_running:
                codes = [docker("wait", c.docker_name, timeout=READY_TIMEOUT_S) for c in pod.containers if c.started]
                if any(code != "0" for code in codes):
                    bad = [
                        c
                        for c, code in zip([c for c in pod.containers if c.started], codes, strict=True)
                        if code != "0"
                    ]
                    raise Failure(f"container {bad[0].name} exited {codes}:\n{self.tail(bad[0].docker_name)}")
                pod.phase = "Succeeded"
                say(f"{pod.kind} {pod.workload}: pod {pod.name} completed (exit 0)")
        except Failure as exc:
            if not self.stop.is_set():
                self.fail(pod, str(exc))
        except (RuntimeError, SystemExit, subprocess.TimeoutExpired) as exc:
            if not self.stop.is_set():
                self.fail(pod, str(exc))

    def tail(self, name: str, lines: int = 50) -> str:
        result = subprocess.run(
            ["docker", "logs", "--tail", str(lines), name], capture_output=True, text=True, check=False
        )
        text = (result.stdout + result.stderr).rstrip()
        return "\n".join("    | " + line for line in text.splitlines())

    # probes -----------------------------------------------------------------------------

    def port_of(self, container: dict[str, Any], port: int | str) -> int:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        for p in container.get("ports", []):
            if p.get("name") == port:
                return int(p["containerPort"])
        raise Failure(f"container {container['name']}: probe port {port} is not a named port")

    def probe_once(self, pod: Pod, container: Container, probe: Probe) -> tuple[bool, str]:
        spec = probe.spec
        timeout = float(spec.get("timeoutSeconds", 1))
        if "httpGet" in spec:
            get = spec["httpGet"]
            if set(get) - {"path", "port", "scheme"} or get.get("scheme", "HTTP") != "HTTP":
                raise kube.Unsupported(f"httpGet {get}")
            port = self.port_of(container.spec, get["port"])
            conn = http.client.HTTPConnection(pod.ip, port, timeout=timeout)
            try:
                conn.request("GET", get.get("path", "/"), headers={"User-Agent": "kube-probe/1.32", "Accept": "*/*"})
                status = conn.getresponse().status
                return 200 <= status < 400, f"HTTP {status}"
            except OSError as exc:
                return False, f"{type(exc).__name__}: {exc}"
            finally:
                conn.close()
        if "tcpSocket" in spec:
            port = self.port_of(container.spec, spec["tcpSocket"]["port"])
            try:
                with socket.create_connection((pod.ip, port), timeout=timeout):
                    return True, "connected"
            except OSError as exc:
                return False, f"{type(exc).__name__}: {exc}"
        if "exec" in spec:
            # A second of allowance for `docker exec` itself; the durations are reported.
            cmd = ["docker", "exec", "--user", container.user, container.docker_name, *spec["exec"]["command"]]
            try:
                result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 1, check=False)
            except subprocess.TimeoutExpired:
                return False, f"timed out after {timeout:g}s"
            output = (result.stdout + result.stderr).strip()[-300:]
            return result.returncode == 0, f"exit {result.returncode} {output}".strip()
        raise kube.Unsupported(f"probe {sorted(spec)}")

    def probe_loop(self, pod: Pod, container: Container) -> None:
        specs = container.spec
        for key in ("startupProbe", "readinessProbe", "livenessProbe"):
            if key in specs and set(specs[key]) - PROBE_KEYS:
                self.fail(pod, f"{key}: not implemented: {sorted(set(specs[key]) - PROBE_KEYS)}")
                return
        probes = {
            k: Probe(k.removesuffix("Probe"), specs[k])
            for k in ("startupProbe", "readinessProbe", "livenessProbe")
            if k in specs
        }
        container.probes = list(probes.values())
        started = time.monotonic()
        startup = probes.get("startupProbe")
        if startup is not None and not self.run_probe(pod, container, startup, started, until_success=True):
            return
        threads = [
            threading.Thread(target=self.run_probe, args=(pod, container, p, time.monotonic()), daemon=True)
            for k, p in probes.items()
            if k != "startupProbe"
        ]
        for t in threads:
            t.start()
        if "readinessProbe" not in probes:
            self.update_ready(pod)

    def run_probe(self, pod: Pod, container: Container, probe: Probe, t0: float, until_success: bool = False) -> bool:
        spec = probe.spec
        period = float(spec.get("periodSeconds", 10))
        next_at = t0 + float(spec.get("initialDelaySeconds", 0))
        while not self.stop.is_set() and pod.phase == "Running":
            delay = next_at - time.monotonic()
            if delay > 0:
                self.stop.wait(delay)
                continue
            next_at += period
            began = time.monotonic()
            try:
                ok, message = self.probe_once(pod, container, probe)
            except Failure as exc:
                self.fail(pod, str(exc))
                return False
            probe.slowest = max(probe.slowest, time.monotonic() - began)
            probe.last = message
            if ok:
                probe.successes += 1
                probe.total_ok += 1
                probe.failures = 0
                probe.passed_once = True
            else:
                probe.failures += 1
                probe.successes = 0
            if probe.kind == "readiness":
                self.update_ready(pod)
            if not ok and probe.failures >= probe.threshold and not probe.passed_once and probe.kind != "readiness":
                if not probe.warned:
                    probe.warned = True
                    self.warnings.append(
                        f"{pod.name}/{container.name}: {probe.kind} probe failed {probe.failures}x in a row "
                        f"{time.monotonic() - t0:.0f}s after start, before its first pass ({message}): the kubelet "
                        "would have restarted it here (no startupProbe)"
                    )
                    say("WARNING " + self.warnings[-1])
                if time.monotonic() - t0 < START_GRACE_S:
                    continue
            if not ok and probe.failures >= probe.threshold:
                if probe.kind == "readiness":
                    if probe.passed_once:
                        self.fail(pod, f"became NotReady: readiness failed {probe.failures}x: {message}")
                        return False
                    continue  # not ready yet: no restart for readiness
                self.fail(
                    pod,
                    f"{probe.kind} probe failed {probe.failures}x ({message}): the kubelet would restart "
                    f"{container.name}\n{self.tail(container.docker_name)}",
                )
                return False
            if until_success and ok:
                return True
        return False

    def update_ready(self, pod: Pod) -> None:
        ready = all(
            all(p.successes > 0 for p in c.probes if p.kind == "readiness") and c.started
            for c in pod.containers
            if c.spec in pod.spec["containers"]
        ) and len([c for c in pod.containers if c.spec in pod.spec["containers"]]) == len(pod.spec["containers"])
        if ready and not pod.ready:
            say(f"{pod.kind} {pod.workload}: pod {pod.name} Ready")
        pod.ready = pod.ready or ready

    def watch_exits(self) -> None:
        """A container of a long-running pod that exits is a failure (the kubelet restarts it)."""
        running = [
            (p, c) for p in self.pods if p.long_running and p.phase == "Running" for c in p.containers if c.started
        ]
        if not running:
            return
        states = json.loads(docker("inspect", *[c.docker_name for _, c in running]) or "[]")
        for (pod, container), state in zip(running, states, strict=True):
            st = state["State"]
            if st["Status"] != "running":
                self.fail(
                    pod,
                    f"container {container.name} {st['Status']} (exit {st['ExitCode']}, OOMKilled {st['OOMKilled']}):\n"
                    + self.tail(container.docker_name),
                )

    def start_all(self) -> None:
        for pod in self.pods:
            t = threading.Thread(target=self.start_pod, args=(pod,), daemon=True)
            self.threads.append(t)
            t.start()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            self.watch_exits()
            pending = [
                p
                for p in self.pods
                if p.phase != "Failed" and not (p.ready if p.long_running else p.phase == "Succeeded")
            ]
            if not pending:
                return
            time.sleep(1)
        for p in pending:
            probes = "; ".join(f"{c.name} {pr.kind}: {pr.last or 'not run'}" for c in p.containers for pr in c.probes)
            self.fail(p, f"not ready after {READY_TIMEOUT_S:.0f}s ({p.phase}, {p.stage}; {probes})")

    def save_logs(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for pod in self.pods:
            for c in pod.containers:
                result = subprocess.run(["docker", "logs", c.docker_name], capture_output=True, check=False)
                (folder / f"{pod.name}.{c.name}.log").write_bytes(result.stdout + result.stderr)

    def cleanup(self) -> None:
        self.stop.set()
        with self.launch:
            # One container at a time, each with its own deadline: on a loaded host one `rm`
            # of them all outlasted 120 s (seen in CI), and a cleanup that raises hides the
            # run's verdict. What is still left after a retry is reported, not raised.
            ids = docker("ps", "-aq", "--filter", f"label={LABEL}={self.run}", check=False).split()
            left = []
            for cid in ids:
                for attempt in range(2):
                    try:
                        docker("rm", "-f", "-v", cid, check=False, timeout=120)
                        break
                    except subprocess.TimeoutExpired:
                        if attempt:
                            left.append(cid)
            if left:
                self.warnings.append(f"cleanup: containers not removed in time: {' '.join(left)}")
            with contextlib.suppress(subprocess.TimeoutExpired):
                docker("network", "rm", self.network, check=False)


# Images ----------------------------------------------------------------------------------


def third_party_map() -> dict[str, str]:
    """Official image -> local stand-in, from docker-compose.yml and local-images.yml."""
    official = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    local = yaml.safe_load((ROOT / "deploy" / "compose" / "local-images.yml").read_text())["services"]
    mapping = {official[name]["image"]: spec["image"] for name, spec in local.items()}
    mapping["python:3.11-slim"] = "python:3.11-slim"  # built locally under that name
    return mapping


def own_service(name: str) -> bool:
    """One of our images, whatever registry kustomization.yaml's newName puts in front."""
    parts = name.split("/")
    return len(parts) >= 2 and parts[-2] == "wallet-platform" and (ROOT / "services" / parts[-1]).is_dir()


def build_images(docs: list[dict[str, Any]], local_bases: bool) -> dict[str, str]:
    images = sorted(
        {
            c["image"]
            for d in docs
            for pod in kube._pod_specs(d)
            for c in pod.get("initContainers", []) + pod["containers"]
        }
    )
    mapping: dict[str, str] = {}
    stand_ins = third_party_map()
    for image in images:
        name, tag, digest = kube._split_image(image)
        if own_service(name):
            service = name.rsplit("/", 1)[1]
            if digest or not tag or tag == ":latest":
                raise SystemExit(f"test-k8s: FAILED: {image}: a service image needs a version tag")
            started = time.monotonic()
            build = ["docker", "build", "-q", "-f", f"services/{service}/Dockerfile", "-t", image, "."]
            say("$ " + shlex.join(build))
            done = subprocess.run(
                build, cwd=ROOT, env={**os.environ, "DOCKER_BUILDKIT": "0"}, capture_output=True, text=True, check=False
            )
            if done.returncode != 0:
                raise SystemExit(f"test-k8s: FAILED: {shlex.join(build)}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
            say(f"image {image}: {time.monotonic() - started:.0f}s")
        elif local_bases:
            if image not in stand_ins:
                raise SystemExit(f"test-k8s: FAILED: no local stand-in for {image} (deploy/compose/local-images.yml)")
            mapping[image] = stand_ins[image]
            say(f"image {image}: the local stand-in {stand_ins[image]}")
    if local_bases:
        mapping.setdefault("python:3.11-slim", "python:3.11-slim")
    return mapping


# Postgres, secrets, smoke ---------------------------------------------------------------


def start_postgres(cluster: Cluster, local_bases: bool) -> dict[str, str]:
    pw = {k: secrets.token_hex(16) for k in ("POSTGRES", "AUTH_MIGRATOR", "AUTH_DB", "WALLET_MIGRATOR", "WALLET_DB")}
    env = {
        "PATH": os.environ.get("PATH", ""),
        "POSTGRES_USER": "postgres",
        "POSTGRES_PASSWORD": pw["POSTGRES"],
        "POSTGRES_SERVICE_DATABASES": "auth wallet",
        **{f"{k}_PASSWORD": v for k, v in pw.items() if k != "POSTGRES"},
    }
    image = "wallet-platform-base/postgres:15" if local_bases else "postgres:16-alpine"
    init = ROOT / "deploy" / "postgres" / "init-databases.sh"
    cluster.docker_run(
        [
            "--name", f"{cluster.run}-managed-postgres", "--network", cluster.network, "--network-alias", "managed-postgres",
            "--tmpfs", "/var/lib/postgresql/data",
            "--mount", f"type=bind,src={init},dst=/docker-entrypoint-initdb.d/10-databases.sh,readonly",
            *[a for k in env if k != "PATH" for a in ("-e", k)], image,
            "-c", "max_connections=300",  # the connection budget in deploy/k8s/config.yaml
        ],
        env,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    name = f"{cluster.run}-managed-postgres"
    while subprocess.run(
        ["docker", "exec", name, "pg_isready", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres"],
        capture_output=True,
        check=False,
    ).returncode:
        if time.monotonic() > deadline:
            raise SystemExit("test-k8s: FAILED: the Postgres stand-in did not start:\n" + cluster.tail(name))
        time.sleep(0.5)
    host = "managed-postgres:5432"
    return {
        "AUTH_DATABASE_URL": f"postgresql+psycopg://auth_app:{pw['AUTH_DB']}@{host}/auth",
        "WALLET_DATABASE_URL": f"postgresql+psycopg://wallet_app:{pw['WALLET_DB']}@{host}/wallet",
        "AUTH_MIGRATION_DATABASE_URL": f"postgresql+psycopg://auth_owner:{pw['AUTH_MIGRATOR']}@{host}/auth",
        "WALLET_MIGRATION_DATABASE_URL": f"postgresql+psycopg://wallet_owner:{pw['WALLET_MIGRATOR']}@{host}/wallet",
    }


def signing_keys(cluster: Cluster, auth_image: str) -> dict[str, bytes]:
    """One Ed25519 PEM made by the auth image's own `auth-keys rotate`."""
    folder = cluster.tmp / "signing-keys"
    folder.mkdir()
    os.chown(folder, 10001, 10001)
    subprocess.run(
        ["docker", "run", "--rm", "--label", f"{LABEL}={cluster.run}", "--network", "none", "--user", "10001:10001",
         "-e", "AUTH_KEYS_DIR=/keys", "--mount", f"type=bind,src={folder},dst=/keys", "--entrypoint", "auth-keys",
         "--pull", "never", auth_image, "rotate"],
        check=True, capture_output=True,
    )  # fmt: skip
    keys = {p.name: p.read_bytes() for p in folder.glob("*.pem")}
    if len(keys) != 1:
        raise SystemExit(f"test-k8s: FAILED: auth-keys rotate made {len(keys)} keys")
    return keys


def make_secrets(cluster: Cluster, urls: dict[str, str], keys: dict[str, bytes]) -> None:
    token = secrets.token_urlsafe(36)
    cluster.secrets = {
        "wallet-platform-secrets": {
            "AUTH_DATABASE_URL": urls["AUTH_DATABASE_URL"].encode(),
            "WALLET_DATABASE_URL": urls["WALLET_DATABASE_URL"].encode(),
            "SERVICE_TOKEN": token.encode(),
            "BREVO_API_KEY": BREVO_KEY.encode(),
        },
        "wallet-platform-migrations": {
            "AUTH_MIGRATION_DATABASE_URL": urls["AUTH_MIGRATION_DATABASE_URL"].encode(),
            "WALLET_MIGRATION_DATABASE_URL": urls["WALLET_MIGRATION_DATABASE_URL"].encode(),
        },
        "redis-auth": {"password": secrets.token_hex(24).encode()},
        "auth-signing-keys": keys,
    }


def http_json(
    method: str, url: str, body: Any = None, *, form: bool = False, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=15)
    hdrs = dict(headers or {})
    data = None
    if body is not None:
        if form:
            data = urllib.parse.urlencode(body).encode()
            hdrs["Content-Type"] = "application/x-www-form-urlencoded"
        else:
            data = json.dumps(body).encode()
            hdrs["Content-Type"] = "application/json"
    try:
        conn.request(method, parts.path + (f"?{parts.query}" if parts.query else ""), body=data, headers=hdrs)
        response = conn.getresponse()
        raw = response.read()
    finally:
        conn.close()
    try:
        return response.status, json.loads(raw or b"null")
    except ValueError:
        return response.status, raw.decode(errors="replace")[:300]


def access_ids(docker_name: str) -> set[str]:
    """The request ids of the JSON access lines a container wrote to stdout."""
    out = subprocess.run(["docker", "logs", docker_name], capture_output=True, text=True, check=False).stdout
    ids = set()
    for line in out.splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and "DownstreamStatus" in record:
                ids.add(str(record.get("downstream_X-Request-Id", "")))
    return ids


def smoke(cluster: Cluster, brevo_url: str) -> None:
    gateway = next((p for p in cluster.pods if p.workload == "gateway" and p.ready), None)
    if gateway is None:
        raise Failure("no Ready gateway pod")
    container = next(c for c in gateway.containers if c.spec in gateway.spec["containers"])
    base = f"http://{gateway.ip}:{cluster.port_of(container.spec, 'web')}"
    email = f"k8s-{secrets.token_hex(4)}@example.com"
    password = secrets.token_hex(8)
    request_id = f"k8s-smoke-{secrets.token_hex(6)}"
    steps: list[tuple[str, int, Any]] = []

    def step(what: str, want: int, status: int, body: Any) -> Any:
        steps.append((what, status, body))
        if status != want:
            raise Failure(f"smoke: {what}: {status} (want {want}): {body}")
        say(f"smoke: {what}: {status}")
        return body

    step(
        "POST /signup",
        201,
        *http_json(
            "POST", f"{base}/signup", {"first_name": "Kube", "last_name": "Let", "email": email, "password": password}
        ),
    )
    token = step(
        "POST /token", 200, *http_json("POST", f"{base}/token", {"username": email, "password": password}, form=True)
    )
    auth = {"Authorization": f"Bearer {token['access_token']}"}
    step("POST /wallet", 201, *http_json("POST", f"{base}/wallet", {"currency": "USD"}, headers=auth))
    moved = step(
        "PATCH /transaction/deposit",
        200,
        *http_json(
            "PATCH",
            f"{base}/transaction/deposit",
            {"amount": 1250, "currency": "USD"},
            headers={**auth, "X-Idempotency-Key": secrets.token_hex(8), "X-Request-ID": request_id},
        ),
    )
    if moved.get("current_balance") != 1250:
        raise Failure(f"smoke: deposit answered {moved}")
    # The access log goes to the Traefik container's stdout (gateway.yaml's init container
    # links traefik.yml's access log file there), with the request id.
    deadline = time.monotonic() + 10
    while request_id not in access_ids(container.docker_name):
        if time.monotonic() > deadline:
            raise Failure(f"smoke: the gateway's stdout has no access line with X-Request-Id {request_id}")
        time.sleep(0.5)
    say("smoke: the deposit's access line, with its request id, is on the gateway's stdout")
    deadline = time.monotonic() + 60
    while True:
        _, emails = http_json("GET", f"{brevo_url}/_stub/emails")
        welcome = [e for e in emails["emails"] if any(t.get("email") == email for t in e.get("to", []))]
        if any("Welcome" in e.get("subject", "") for e in welcome):
            say(f"smoke: the welcome email reached the Brevo stand-in ({len(welcome)} email(s) for {email})")
            return
        if time.monotonic() > deadline:
            raise Failure(f"smoke: no welcome email for {email} at the Brevo stand-in within 60s")
        time.sleep(1)


def watch(cluster: Cluster, seconds: float) -> None:
    """`seconds` more of running, and then until every liveness probe has passed twice in a
    row (a slow one, initialDelaySeconds 30 and periodSeconds 15, needs a minute)."""

    def livenesses() -> list[tuple[Pod, Container, Probe]]:
        return [
            (pod, c, p)
            for pod in cluster.pods
            if pod.phase == "Running" and pod.long_running
            for c in pod.containers
            for p in c.probes
            if p.kind == "liveness"
        ]

    started = time.monotonic()
    longest = max([float(p.spec.get("periodSeconds", 10)) for _, _, p in livenesses()] or [0])
    while not cluster.failures:
        cluster.watch_exits()
        elapsed = time.monotonic() - started
        if elapsed >= seconds and all(p.successes >= 2 for _, _, p in livenesses()):
            break
        if elapsed >= seconds + 3 * longest + 30:
            break
        time.sleep(1)
    say(f"watched {time.monotonic() - started:.0f}s")
    for pod, c, p in livenesses():
        if p.successes < 2:
            cluster.fail(pod, f"{c.name} liveness: {p.successes} consecutive passes ({p.last})")


def run_cronjobs(cluster: Cluster) -> None:
    for doc in cluster.docs:
        if doc["kind"] != "CronJob":
            continue
        name = doc["metadata"]["name"]
        template = doc["spec"]["jobTemplate"]["spec"]["template"]
        pod = cluster.new_pod(f"{name}-manual-{secrets.token_hex(3)}", name, "Job", template, doc)
        cluster.pods.append(pod)
        say(f"CronJob {name}: one run now (kubectl create job --from=cronjob/{name})")
        cluster.start_pod(pod)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kustomization", type=Path, default=ROOT / "deploy" / "k8s" / "kustomization.yaml")
    opts = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    local_bases = os.environ.get("COMPOSE_BASE_IMAGES", "local") != "official"
    WORK.mkdir(parents=True, exist_ok=True)

    docs = kube.render(opts.kustomization)
    if shutil.which("kubectl"):
        out = subprocess.run(
            ["kubectl", "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(opts.kustomization.parent)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if out.returncode == 0:
            theirs = [d for d in yaml.safe_load_all(out.stdout) if d]
            if kube.canonical(theirs) != kube.canonical(docs):
                raise SystemExit("test-k8s: FAILED: this rendering differs from `kubectl kustomize`'s")
            say(f"rendered {len(docs)} objects, identical to `kubectl kustomize`")
    else:
        say(f"rendered {len(docs)} objects (no kubectl here to compare with)")
    if os.geteuid() != 0:
        compose.skip("the kubelet's volume ownership (root:fsGroup files) needs root")

    compose.ensure_tools(local_bases, compose=False)
    run_id = f"k8s{secrets.token_hex(3)}"
    code = 1
    with compose.engine():
        if local_bases:
            compose.build_bases()
        image_map = build_images(docs, local_bases)
        say(f"images ready: {time.monotonic() - started:.0f}s")
        tmp = Path(tempfile.mkdtemp(dir=WORK, prefix=f"{run_id}-"))
        cluster = Cluster(docs, run_id, tmp, image_map)
        try:
            docker("network", "create", "--label", f"{LABEL}={run_id}", cluster.network)
            gateway_ip = json.loads(docker("network", "inspect", cluster.network))[0]["IPAM"]["Config"][0]["Gateway"]
            with compose.brevo_stub(gateway_ip) as brevo_url:
                urls = start_postgres(cluster, local_bases)
                say(f"managed-Postgres stand-in ready: {time.monotonic() - started:.0f}s")
                auth_image = next(
                    c["image"]
                    for d in docs
                    for p in kube._pod_specs(d)
                    for c in p["containers"]
                    if kube._split_image(c["image"])[0].endswith("/wallet-platform/auth")
                )
                make_secrets(cluster, urls, signing_keys(cluster, auth_image))
                # The test's one change to the manifests: the notifier's Brevo is the stub.
                cluster.plan()
                cluster.config_maps["platform-config"]["NOTIFIER_BREVO_BASE_URL"] = brevo_url
                say("test overlay: ConfigMap platform-config + NOTIFIER_BREVO_BASE_URL (the Brevo stand-in)")
                say(f"starting {len(cluster.pods)} pods: " + ", ".join(p.name for p in cluster.pods))
                cluster.start_all()
                cluster.wait_ready()
                if not cluster.failures:
                    say(f"every pod Ready, every Job done: {time.monotonic() - started:.0f}s")
                    try:
                        smoke(cluster, brevo_url)
                    except (Failure, OSError) as exc:
                        cluster.failures.append(str(exc))
                        say(f"FAILURE {exc}")
                    watch(cluster, WATCH_S)
                    run_cronjobs(cluster)
                    cluster.watch_exits()
                for pod in cluster.pods:
                    for c in pod.containers:
                        for p in c.probes:
                            if "exec" in p.spec:
                                say(
                                    f"probe {pod.name}/{c.name} {p.kind} (exec): slowest {p.slowest:.2f}s of timeoutSeconds {p.spec.get('timeoutSeconds', 1)}"
                                )
                code = 1 if cluster.failures else 0
        finally:
            logs = WORK / "logs" / run_id
            with contextlib.suppress(Exception):
                cluster.save_logs(logs)
            cluster.cleanup()
            shutil.rmtree(tmp, ignore_errors=True)
            say(f"logs: {logs.relative_to(ROOT)}")
    for warning in cluster.warnings:
        say(f"WARNING: {warning}")
    if cluster.failures:
        say(f"FAILED ({len(cluster.failures)}):")
        for failure in cluster.failures:
            print("  - " + failure.replace("\n", "\n    "), flush=True)
    say(f"{'passed' if code == 0 else 'FAILED'} in {time.monotonic() - started:.0f}s")
    return code


if __name__ == "__main__":
    sys.exit(main())
