"""Run what k8s/ says as a real federation on one CI machine, without Kubernetes.

Every pod of the manifests (the certs Job, SuperLink, fleet proxy, ServerApp SuperExec with
the SuperLink exporter, two SuperNodes, the launcher Job, Prometheus; not Grafana, below)
becomes podman containers of the real images (docker/build.sh), each pod in its own
network namespace, with what the kubelet would give it, taken from the
manifests: image, command/args, env (values with $(VAR) expansion, ConfigMap keys, the
fieldRefs metadata.name/namespace/labels incl. the StatefulSet ordinal label), Secret and
projected volumes (files, items, modes, group fsGroup), emptyDirs, PersistentVolumeClaims
(one folder per claim; volumeClaimTemplates give <template>-<statefulset>-<ordinal>), the
ServiceAccount token where automounted, runAsUser/runAsGroup/fsGroup, read-only root,
dropped capabilities, no-new-privileges, restart policies. The Secrets' data is what the
certs Job's own container creates through a stand-in of the Kubernetes API
(tests/support/k8s_sim.py, enforcing the manifests' Role), reached from the Job's namespace.

Networking. Tests may send traffic to loopback addresses only, so the pods' addresses are
in 127.1.0.0/16: each pod namespace has a veth into a bridge in a "node" namespace; in every
namespace lo keeps only 127.0.0.1/32 (so the rest of 127/8 is not local) and
route_localnet=1 lets 127.x addresses travel over the veths. Nothing is added to the host's
own network namespace. Service names resolve to the address of the pod the Service
selects, through hosts entries and a cluster DNS stand-in (tests/support/k8s_sim.py: A records,
and the SRV records of headless Services that Prometheus' discovery reads) behind the
search path and ndots of a pod's resolv.conf; Service ports must equal their target ports
(checked). The NetworkPolicies are enforced: tests/support/k8s_sim.py's evaluator turns them into
iptables rules in each pod's namespace (ingress in INPUT, egress in OUTPUT; the node, where
kubelet probes come from, is allowed in, as with common CNIs), so a flow the federation
needs but the policies deny fails the run. Probes: exec probes run in the container
(podman exec), tcpSocket and httpGet probes connect from the node namespace to the pod.

Prometheus: the image prom/prometheus cannot be pulled offline, so its pod runs the same
program, Debian's build (2.42, docker/ci-observability.sh), in the CI base image with the
official image's entrypoint; everything else (args, the generated ConfigMap, the claim,
user, probes) is the manifests'. After the run it must scrape every exporter (the
SuperLink exporter, the ServerApp, each SuperNode found by DNS SRV, named by pod) through
the NetworkPolicies. Grafana is not run: there is no Grafana image or binary offline;
tests/deploy/test_k8s.py checks its provisioning against the Prometheus Service statically.

Deviations, all for a CPU-only 2-core machine: the ConfigMap's run settings are overridden
(2 rounds, resolution 64, the tiny model at /models/tiny-sd), OMP_NUM_THREADS=1 is added to
every container, the GPU limit and CPU/memory limits are not applied, DNS is UDP only,
and the SuperNodes start after the launcher's register init container has finished (on a
cluster they may start earlier, be refused with 401, exit and be restarted by the kubelet
with back-off; here that would only burn CPU).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from tests.support import k8s_sim
from tests.support.host import wait_for_exit
from tests.support.k8s_sim import NetworkPolicies, Peer, Pod

REPO = k8s_sim.REPO
NODE_IP = "127.1.0.254"  # the node: bridge address, where kubelet probes come from
API_IP = "127.1.0.250"  # the Kubernetes API (stand-in), outside every pod
DNS_IP = "127.1.0.249"  # cluster DNS (stand-in), namespace kube-system
PROM_IP = "127.1.0.240"  # the cluster's own Prometheus, in namespace "monitoring"
SEARCH = ("fedsd.svc.cluster.local", "svc.cluster.local", "cluster.local")
NOT_RUN = {  # workloads whose pods get an address and policies, but no containers
    "grafana": "no Grafana image or binary on an offline machine",
}
PROMETHEUS_IMAGE = "localhost/fedsd-ci-prometheus:debian"
SA_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"
CONFIG_OVERRIDES = {
    "FEDSD_ROUNDS": "2",
    "FEDSD_RUN_CONFIG": "resolution=64",
    "FEDSD_TIMEOUT": "900",
    "FEDSD_MODEL": "/models/tiny-sd",
}
EXTRA_ENV = {"OMP_NUM_THREADS": "1"}


def addresses(pods: int) -> list[str]:
    return [f"127.1.0.{i + 1}" for i in range(pods)] + [NODE_IP, API_IP, DNS_IP, PROM_IP]


def _sh(cmd: list[str], *, timeout: float = 120, check: bool = True, input: str | None = None):
    res = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
    )  # fmt: skip
    if check and res.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` exited {res.returncode}: {res.stderr.strip()}")
    return res


_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion (undefined references stay as they are; $$ escapes)."""

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _VAR.sub(sub, value)


class Federation:
    def __init__(self, objs: list[dict], images: dict[str, str], base: str, root: Path) -> None:
        self.objs = objs
        self.images = images
        self.ci_base = base
        self.root = root
        self.id = f"{os.getpid() % 100000:05d}{secrets.token_hex(1)}"
        self.prefix = f"fk{self.id}"
        self.podman = shutil.which("podman") or ""
        self.pods = k8s_sim.expand_pods(objs)
        self.by_name = {p.name: p for p in self.pods}
        for i, pod in enumerate(self.pods):
            pod.ip = f"127.1.0.{i + 1}"
        self.configmaps = {
            o["metadata"]["name"]: dict(o.get("data", {})) for o in objs if o["kind"] == "ConfigMap"
        }
        self.configmaps["fedsd"].update(CONFIG_OVERRIDES)
        self.secrets: dict[str, dict[str, bytes]] = {}
        self.token = secrets.token_hex(16)
        self.netns: list[str] = []
        self.api_proc: subprocess.Popen | None = None
        self.dns_proc: subprocess.Popen | None = None
        self.containers: list[str] = []
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ network

    def _ns(self, key: str) -> str:
        return f"{self.prefix}-{key}"

    def _ip(self, ns: str, *args: str) -> None:
        _sh(["ip", "-n", ns, *args])

    def _make_ns(self, key: str) -> str:
        ns = self._ns(key)
        _sh(["ip", "netns", "add", ns])
        self.netns.append(ns)
        self._ip(ns, "link", "set", "lo", "up")
        # 127.0.0.1 stays local; the rest of 127/8 must be routable to other namespaces.
        self._ip(ns, "addr", "del", "127.0.0.1/8", "dev", "lo")
        self._ip(ns, "addr", "add", "127.0.0.1/32", "dev", "lo")
        _sh(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.conf.all.route_localnet=1"])
        return ns

    def _attach(self, ns: str, index: int, ip: str) -> None:
        veth = f"{self.prefix}v{index}"
        _sh(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
        _sh(["ip", "link", "set", veth, "netns", self.hub])
        self._ip(self.hub, "link", "set", veth, "master", "br0", "up")
        _sh(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.conf.eth0.route_localnet=1"])
        self._ip(ns, "addr", "add", f"{ip}/16", "dev", "eth0")
        self._ip(ns, "link", "set", "eth0", "up")

    def setup_network(self) -> None:
        self.hub = self._make_ns("node")
        self._ip(self.hub, "link", "add", "br0", "type", "bridge")
        self._ip(self.hub, "addr", "add", f"{NODE_IP}/16", "dev", "br0")
        self._ip(self.hub, "link", "set", "br0", "up")
        _sh(["ip", "netns", "exec", self.hub, "sysctl", "-qw",
             "net.ipv4.conf.br0.route_localnet=1"])  # fmt: skip
        for i, pod in enumerate(self.pods):
            self._attach(self._make_ns(f"p{i}"), i, pod.ip)
        self.pod_ns = {pod.name: self._ns(f"p{i}") for i, pod in enumerate(self.pods)}
        self.api_ns = self._make_ns("api")
        self._attach(self.api_ns, len(self.pods), API_IP)
        self.prom_ns = self._make_ns("prom")
        self._attach(self.prom_ns, len(self.pods) + 1, PROM_IP)
        self.dns_ns = self._make_ns("dns")
        self._attach(self.dns_ns, len(self.pods) + 2, DNS_IP)
        self.enforce_network_policies()

    def enforce_network_policies(self) -> None:
        ns_labels = {
            name: {"kubernetes.io/metadata.name": name}
            for name in ("fedsd", "monitoring", "kube-system")
        }
        policies = NetworkPolicies(self.objs, ns_labels)
        peers = [Peer.of(p) for p in self.pods]
        peers.append(
            Peer(
                "prometheus", "monitoring", (("app.kubernetes.io/name", "prometheus"),), (), PROM_IP
            )
        )
        peers.append(Peer("apiserver", None, (), (("https", 443, "TCP"),), API_IP))
        peers.append(
            Peer("kube-dns", "kube-system", (("k8s-app", "kube-dns"),),
                 (("dns", 53, "UDP"), ("dns-tcp", 53, "TCP")), DNS_IP)
        )  # fmt: skip
        for me in peers[: len(self.pods)]:
            lines = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]",
                     ":OUTPUT ACCEPT [0:0]"]  # fmt: skip
            for chain, direction, flag in (("INPUT", "Ingress", "-s"), ("OUTPUT", "Egress", "-d")):
                if not policies.isolated(me, direction):
                    continue
                iface = "-i lo" if chain == "INPUT" else "-o lo"
                lines += [
                    f"-A {chain} {iface} -j ACCEPT",
                    f"-A {chain} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
                ]
                if chain == "INPUT":
                    lines.append(f"-A INPUT -s {NODE_IP}/32 -j ACCEPT")  # kubelet probes
                for other in peers:
                    if other is me:
                        continue
                    dst = me if chain == "INPUT" else other
                    for _, port, proto in dst.ports:
                        ok = (
                            policies.ingress_allowed(me, other, port, proto)
                            if chain == "INPUT"
                            else policies.egress_allowed(me, other, port, proto)
                        )
                        if ok:
                            lines.append(
                                f"-A {chain} {flag} {other.ip}/32 -p {proto.lower()} "
                                f"--dport {port} -j ACCEPT"
                            )
                lines.append(f"-A {chain} -j DROP")
            lines.append("COMMIT")
            _sh(
                ["ip", "netns", "exec", self.pod_ns[me.name], "iptables-restore"],
                input="\n".join(lines) + "\n",
            )

    def hosts(self) -> dict[str, str]:
        """Service DNS names -> the address of the (first) pod each Service selects."""
        entries = {
            name: API_IP
            for name in (
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            )  # fmt: skip
        }
        for svc in self.objs:
            if svc["kind"] != "Service":
                continue
            ns, name = svc["metadata"]["namespace"], svc["metadata"]["name"]
            backends = k8s_sim.service_backends(svc, self.pods)
            assert backends, f"Service {name} selects no pod"
            for sp in svc["spec"]["ports"]:
                try:
                    target = k8s_sim.target_port(backends[0], sp.get("targetPort", sp["port"]))
                except ValueError as exc:
                    raise AssertionError(f"Service {name}: {exc}") from exc
                if target != sp["port"]:
                    pytest.fail(f"Service {name} maps {sp['port']} to {target}: not emulated")
            for alias in (
                name,
                f"{name}.{ns}",
                f"{name}.{ns}.svc",
                f"{name}.{ns}.svc.cluster.local",
            ):
                entries[alias] = backends[0].ip
        return entries

    # ------------------------------------------------------------------ API server, Secrets

    def start_api(self) -> None:
        api = self.root / "apiserver"
        api.mkdir()
        self.api_ca, cert, key = k8s_sim.make_tls(api, API_IP)
        (api / "token").write_text(self.token)
        sa = k8s_sim.find(self.objs, "Job", "fedsd-certs")["spec"]["template"]["spec"][
            "serviceAccountName"
        ]
        rules = k8s_sim.role_rules(self.objs, sa, "fedsd")
        (api / "rules.json").write_text(json.dumps(rules))
        self.api_state = api / "state.json"
        self.api_proc = self._stand_in(
            self.api_ns, api / "log.txt", self.api_state.exists,
            ["apiserver", "--host", API_IP, "--port", "443", "--token-file", str(api / "token"),
             "--namespace", "fedsd", "--rules", str(api / "rules.json"), "--cert", str(cert),
             "--key", str(key), "--state", str(self.api_state)],
        )  # fmt: skip

    def start_dns(self) -> None:
        """Cluster DNS (A and SRV records of the manifests' Services) at DNS_IP:53/udp."""
        records = k8s_sim.cluster_dns_records(self.objs, self.pods)
        path = self.root / "dns-records.json"
        path.write_text(json.dumps(records, indent=1))
        log = self.root / "dns-log.txt"
        self.dns_proc = self._stand_in(
            self.dns_ns, log, lambda: "cluster DNS on" in log.read_text(),
            ["dns", "--host", DNS_IP, "--records", str(path)],
        )  # fmt: skip

    def _stand_in(
        self, ns: str, log: Path, ready: Callable[[], bool], args: list[str]
    ) -> subprocess.Popen:
        """``python tests/support/k8s_sim.py ARGS`` in network namespace ``ns``, once
        ``ready()``."""
        with log.open("wb") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, str(Path(k8s_sim.__file__)), *args],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"stand-in {args[0]} did not start: {log.read_text()}")
            time.sleep(0.2)
        return proc

    def load_secrets(self) -> None:
        state = json.loads(self.api_state.read_text())
        self.secrets = {
            name: {k: base64.b64decode(v) for k, v in obj.get("data", {}).items()}
            for name, obj in state["secrets"].items()
        }
        refused = [e for e in state["log"] if e[2] in (401, 403)]
        assert not refused, f"the certs Job was refused by RBAC: {refused}"

    # ------------------------------------------------------------------ volumes

    def _fs_group(self, pod: Pod) -> int | None:
        return pod.spec.get("securityContext", {}).get("fsGroup")

    def _write_files(self, directory: Path, files: dict[str, bytes], mode: int, gid: int | None):
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o755)
        for rel, data in files.items():
            path = directory / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            if gid is not None:
                os.chown(path, 0, gid)
                mode |= 0o040  # the kubelet makes fsGroup able to read
            path.chmod(mode)

    def _source_files(self, source: dict, kind: str) -> tuple[dict[str, bytes], dict[str, int]]:
        name = source.get("secretName", source.get("name"))
        store = self.secrets if kind == "secret" else {
            k: {kk: vv.encode() for kk, vv in v.items()} for k, v in self.configmaps.items()
        }  # fmt: skip
        if name not in store:
            pytest.fail(f"{kind} {name} does not exist (the kubelet would wait for it forever)")
        data = store[name]
        if "items" not in source:
            return dict(data), {}
        files, modes = {}, {}
        for item in source["items"]:
            if item["key"] not in data:
                pytest.fail(f"{kind} {name} has no key {item['key']}")
            files[item["path"]] = data[item["key"]]
            if "mode" in item:
                modes[item["path"]] = item["mode"]
        return files, modes

    def _claim_dir(self, claim: str, gid: int | None) -> Path:
        path = self.root / "pv" / claim
        if not path.exists():
            path.mkdir(parents=True)
        if gid is not None:  # fsGroup ownership management of the volume
            for p in [path, *path.rglob("*")]:
                os.chown(p, 0, gid)
                p.chmod((p.stat().st_mode | (0o2070 if p.is_dir() else 0o060)) & 0o7777)
        return path

    def volume_args(self, pod: Pod, ctr: dict) -> list[str]:
        vols = {v["name"]: v for v in pod.spec.get("volumes", [])}
        templates = {}
        if pod.owner["kind"] == "StatefulSet":
            templates = {
                t["metadata"]["name"] for t in pod.owner["spec"].get("volumeClaimTemplates", [])
            }
        gid = self._fs_group(pod)
        args = []
        for vm in ctr.get("volumeMounts", []):
            name, ro = vm["name"], vm.get("readOnly", False)
            host: Path
            if name in vols:
                vol = vols[name]
                base = self.root / "pods" / pod.name / name
                if "secret" in vol or "configMap" in vol:
                    kind = "secret" if "secret" in vol else "configMap"
                    files, modes = self._source_files(vol[kind], kind)
                    mode = vol[kind].get("defaultMode", 0o644)
                    if not base.exists():
                        self._write_files(base, files, mode, gid)
                        for rel, m in modes.items():
                            (base / rel).chmod(m)
                    host = base
                elif "projected" in vol:
                    if not base.exists():
                        mode = vol["projected"].get("defaultMode", 0o644)
                        for src in vol["projected"]["sources"]:
                            kind = next(iter(src))
                            if kind not in ("secret", "configMap"):
                                pytest.fail(f"projected source {kind} not emulated")
                            files, _ = self._source_files(src[kind], kind)
                            self._write_files(base, files, mode, gid)
                    host = base
                elif "emptyDir" in vol:
                    base.mkdir(parents=True, exist_ok=True)
                    base.chmod(0o777)
                    host = base
                elif "persistentVolumeClaim" in vol:
                    host = self._claim_dir(vol["persistentVolumeClaim"]["claimName"], gid)
                    ro = ro or vol["persistentVolumeClaim"].get("readOnly", False)
                else:
                    pytest.fail(f"{pod.name}: volume {name} of an unemulated type")
            elif name in templates:
                host = self._claim_dir(f"{name}-{pod.owner['metadata']['name']}-{pod.ordinal}", gid)
            else:
                pytest.fail(f"{pod.name}/{ctr['name']}: volumeMount {name} has no volume")
            if "subPath" in vm:
                host = host / vm["subPath"]
            args += ["-v", f"{host}:{vm['mountPath']}:{'ro' if ro else 'rw'}"]
        if self._automount(pod):
            sa = self.root / "pods" / pod.name / "serviceaccount"
            if not sa.exists():
                files = {
                    "token": self.token.encode(),
                    "namespace": pod.namespace.encode(),
                    "ca.crt": self.api_ca.read_bytes(),
                }
                self._write_files(sa, files, 0o440, gid)
            args += ["-v", f"{sa}:{SA_PATH}:ro"]
        return args

    def _automount(self, pod: Pod) -> bool:
        if "automountServiceAccountToken" in pod.spec:
            return bool(pod.spec["automountServiceAccountToken"])
        sa_name = pod.spec.get("serviceAccountName", "default")
        for o in self.objs:
            if o["kind"] == "ServiceAccount" and o["metadata"]["name"] == sa_name:
                return o.get("automountServiceAccountToken", True)
        return True

    # ------------------------------------------------------------------ containers

    def env(self, pod: Pod, ctr: dict) -> dict[str, str]:
        env: dict[str, str] = {"KUBERNETES_SERVICE_HOST": API_IP, "KUBERNETES_SERVICE_PORT": "443"}
        if pod.spec.get("enableServiceLinks", True):
            for svc in self.objs:
                if svc["kind"] == "Service" and svc["spec"].get("clusterIP") != "None":
                    up = svc["metadata"]["name"].upper().replace("-", "_")
                    port = svc["spec"]["ports"][0]["port"]
                    ip = self.hosts_map[svc["metadata"]["name"]]
                    env[f"{up}_SERVICE_HOST"] = ip
                    env[f"{up}_SERVICE_PORT"] = str(port)
                    env[f"{up}_PORT"] = f"tcp://{ip}:{port}"
        for src in ctr.get("envFrom", []):
            if "configMapRef" in src:
                env.update(self.configmaps[src["configMapRef"]["name"]])
            else:
                env.update(
                    {k: v.decode() for k, v in self.secrets[src["secretRef"]["name"]].items()}
                )
        for e in ctr.get("env", []):
            if "value" in e:
                env[e["name"]] = expand(e["value"], env)
                continue
            ref = e["valueFrom"]
            if "configMapKeyRef" in ref:
                r = ref["configMapKeyRef"]
                env[e["name"]] = self.configmaps[r["name"]][r["key"]]
            elif "secretKeyRef" in ref:
                r = ref["secretKeyRef"]
                env[e["name"]] = self.secrets[r["name"]][r["key"]].decode()
            elif "fieldRef" in ref:
                env[e["name"]] = self.field(pod, ref["fieldRef"]["fieldPath"])
            else:
                pytest.fail(f"{pod.name}: env {e['name']}: {ref} not emulated")
        env.update(EXTRA_ENV)
        return env

    def field(self, pod: Pod, path: str) -> str:
        m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
        if m:
            source = pod.labels if m.group(1) == "labels" else pod.annotations
            if m.group(2) not in source:
                pytest.fail(f"{pod.name}: fieldRef {path}: no such {m.group(1)[:-1]}")
            return source[m.group(2)]
        simple = {
            "metadata.name": pod.name,
            "metadata.namespace": pod.namespace,
            "status.podIP": pod.ip,
            "status.hostIP": NODE_IP,
            "spec.nodeName": "node-1",
            "spec.serviceAccountName": pod.spec.get("serviceAccountName", "default"),
        }
        if path not in simple:
            pytest.fail(f"{pod.name}: fieldRef {path} not emulated")
        return simple[path]

    def image(self, ref: str) -> str:
        if ref.split(":")[0] == "prom/prometheus":
            return PROMETHEUS_IMAGE  # built by build_prometheus_image() in go()
        name = ref.rsplit("/", 1)[-1].split("@")[0].split(":")[0]
        service = name.removeprefix("fedsd-")
        if service not in self.images:
            pytest.fail(f"image {ref}: not one of the fedsd images {sorted(self.images)}")
        return self.images[service]

    def build_prometheus_image(self) -> None:
        """PROMETHEUS_IMAGE: the official image's layout (entrypoint /bin/prometheus,
        workdir /prometheus, user nobody) around Debian's build, on the CI base image."""
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("`prometheus` not found; install it with bash docker/ci-observability.sh")
        ctx = self.root / "prometheus-image"
        ctx.mkdir()
        shutil.copy2(binary, ctx / "prometheus")
        (ctx / "Containerfile").write_text(
            f"FROM {self.ci_base}\nCOPY prometheus /bin/prometheus\nUSER 65534:65534\n"
            'WORKDIR /prometheus\nENTRYPOINT ["/bin/prometheus"]\n'
        )
        _sh([self.podman, "build", "-q", "-t", PROMETHEUS_IMAGE, str(ctx)], timeout=600)

    def start(self, pod: Pod, ctr: dict, restart: str) -> str:
        name = f"{self.prefix}-{pod.name}-{ctr['name']}"
        psc = pod.spec.get("securityContext", {})
        sc = {**{k: psc[k] for k in ("runAsUser", "runAsGroup", "runAsNonRoot") if k in psc},
              **ctr.get("securityContext", {})}  # fmt: skip
        uid, gid = sc.get("runAsUser"), sc.get("runAsGroup")
        if sc.get("runAsNonRoot") and not uid:
            pytest.fail(f"{pod.name}/{ctr['name']}: runAsNonRoot without a non-zero runAsUser")
        env = self.env(pod, ctr)
        args = [self.podman, "run", "-d", "--name", name, "--label", f"fedsd-k8s-test={self.id}",
                "--network", f"ns:/run/netns/{self.pod_ns[pod.name]}", "--hostname", pod.name,
                "--no-healthcheck", "--restart", restart]  # fmt: skip
        if uid is not None:
            args += ["--user", f"{uid}:{gid}" if gid is not None else str(uid)]
        if self._fs_group(pod) is not None:
            args += ["--group-add", str(self._fs_group(pod))]
        if sc.get("readOnlyRootFilesystem"):
            args += ["--read-only", "--read-only-tmpfs=false"]
        caps = sc.get("capabilities", {})
        args += [a for c in caps.get("drop", []) for a in ("--cap-drop", c)]
        args += [a for c in caps.get("add", []) for a in ("--cap-add", c)]
        if sc.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        seccomp = sc.get("seccompProfile", psc.get("seccompProfile", {})).get("type")
        if seccomp == "Unconfined":
            args += ["--security-opt", "seccomp=unconfined"]
        for host, ip in sorted(self.hosts_map.items()):
            args += ["--add-host", f"{host}:{ip}"]
        args += ["--dns", DNS_IP, "--dns-option", "ndots:5"]  # the kubelet's ClusterFirst
        args += [a for domain in SEARCH for a in ("--dns-search", domain)]
        for k, v in env.items():
            args += ["-e", f"{k}={v}"]
        args += self.volume_args(pod, ctr)
        if "workingDir" in ctr:
            args += ["--workdir", ctr["workingDir"]]
        if "command" in ctr:
            args += ["--entrypoint", json.dumps([expand(c, env) for c in ctr["command"]])]
        args.append(self.image(ctr["image"]))
        args += [expand(a, env) for a in ctr.get("args", [])]
        _sh(args, timeout=300)
        self.containers.append(name)
        return name

    def wait(self, name: str, timeout: float, watch: Sequence[str] = ()) -> int:
        """``name``'s exit code; fails at once when a ``watch``ed service it needs has
        stopped or crash-loops (the kubelet would restart it; a run cannot finish then)."""
        return wait_for_exit(
            self.podman, name, timeout, watch=watch, max_restarts=3, evidence=self.tails
        )

    def logs(self, name: str, tail: int | None = None) -> str:
        cmd = [self.podman, "logs"] + (["--tail", str(tail)] if tail else []) + [name]
        res = _sh(cmd, timeout=60, check=False)
        return res.stdout + res.stderr

    def run_job_pod(self, pod: Pod, timeout: float) -> dict[str, str]:
        """Init containers one by one, then the containers; each must exit 0."""
        out = {}
        for group in ("initContainers", "containers"):
            for ctr in pod.spec.get(group, []):
                name = self.start(pod, ctr, "no")
                code = self.wait(name, timeout)
                out[ctr["name"]] = self.logs(name)
                if code != 0:
                    pytest.fail(
                        f"{name} exited {code}:\n{out[ctr['name']][-6000:]}\n{self.tails()}"
                    )
        return out

    def tails(self) -> str:
        return "\n".join(f"--- {c}\n{self.logs(c, 30)}" for c in self.containers)

    # ------------------------------------------------------------------ probes, checks

    def probe(self, pod: Pod, ctr: dict, cname: str, probe: dict) -> str | None:
        """None when the probe passes, else why not. A probe that outlasts its timeout is
        a failed attempt, retried until the deadline, as the kubelet retries it (on a loaded
        2-core machine a `podman exec` alone can take seconds)."""
        try:
            return self._probe_once(pod, ctr, cname, probe)
        except subprocess.TimeoutExpired as exc:
            return f"timed out after {exc.timeout} s"

    def _probe_once(self, pod: Pod, ctr: dict, cname: str, probe: dict) -> str | None:
        timeout = probe.get("timeoutSeconds", 1) + 5
        if "exec" in probe:
            res = _sh([self.podman, "exec", cname, *probe["exec"]["command"]], timeout=timeout,
                      check=False)  # fmt: skip
            return None if res.returncode == 0 else f"exit {res.returncode}: {res.stderr[-300:]}"
        kind = "tcpSocket" if "tcpSocket" in probe else "httpGet"
        if kind not in probe:
            return f"probe kind {set(probe)} not emulated"
        port = probe[kind]["port"]
        if isinstance(port, str):
            port = next(p["containerPort"] for p in ctr.get("ports", []) if p.get("name") == port)
        if kind == "tcpSocket":
            code = f"import socket; socket.create_connection(({pod.ip!r}, {port}), 3).close()"
        else:
            scheme = probe["httpGet"].get("scheme", "HTTP").lower()
            url = f"{scheme}://{pod.ip}:{port}{probe['httpGet'].get('path', '/')}"
            code = (
                "import ssl, urllib.request; ctx = ssl._create_unverified_context(); "
                f"assert urllib.request.urlopen({url!r}, timeout=3, context=ctx).status < 400"
            )
        res = _sh(["ip", "netns", "exec", self.hub, sys.executable, "-c", code], timeout=timeout,
                  check=False)  # fmt: skip
        return None if res.returncode == 0 else res.stderr.strip().splitlines()[-1]

    def probes_pass(self, pods: list[Pod], deadline: float) -> dict[str, int]:
        pending = {}
        for pod in pods:
            for ctr in pod.spec["containers"]:
                for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                    if kind in ctr:
                        key = f"{pod.name}/{ctr['name']}/{kind}"
                        pending[key] = (pod, ctr, f"{self.prefix}-{pod.name}-{ctr['name']}", kind)
        passed: dict[str, int] = {}
        last: dict[str, str] = {}
        while pending and time.monotonic() < deadline:
            for key, (pod, ctr, cname, kind) in list(pending.items()):
                why = self.probe(pod, ctr, cname, ctr[kind])
                if why is None:
                    passed[key] = int(time.monotonic())
                    del pending[key]
                else:
                    last[key] = why
            if pending:
                time.sleep(3)
        if pending:
            pytest.fail("probes never passed: " + json.dumps({k: last.get(k) for k in pending}))
        return passed

    def exec_py(self, cname: str, code: str) -> str:
        res = _sh([self.podman, "exec", cname, "python", "-c", code], timeout=60, check=False)
        return (res.stdout + res.stderr).strip()

    def netns_py(self, ns: str, code: str) -> str:
        res = _sh(["ip", "netns", "exec", ns, sys.executable, "-c", code], timeout=60, check=False)
        return (res.stdout + res.stderr).strip()

    # ------------------------------------------------------------------ the run

    def prepare_data(self) -> None:
        def fedsd(*args: str) -> None:
            _sh([sys.executable, "-m", "fedsd.cli", *args], timeout=300)

        models = self.root / "pv" / "fedsd-models"
        fedsd("tiny-model", "--out", str(models / "tiny-sd"))
        nodes = k8s_sim.find(self.objs, "StatefulSet", "supernode")["spec"]["replicas"]
        shards = self.root / "shards"
        fedsd("shards", "--source", "synthetic", "--num-shards", str(nodes), "--out", str(shards))
        for i in range(nodes):  # pre-populated claims of the volumeClaimTemplate "shard"
            shutil.copytree(shards / f"shard-{i}", self.root / "pv" / f"shard-supernode-{i}")
        for p in [self.root / "pv", *(self.root / "pv").rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)

    def go(self) -> None:
        t0 = time.monotonic()
        self.prepare_data()
        self.setup_network()
        self.hosts_map = self.hosts()
        self.start_api()
        self.start_dns()
        self.build_prometheus_image()  # before the federation loads the machine
        self.timings["setup"] = time.monotonic() - t0

        pods = {p.owner["metadata"]["name"]: p for p in self.pods}
        t0 = time.monotonic()
        certs_logs = self.run_job_pod(pods["fedsd-certs"], 300)
        print(certs_logs.get("certs", ""))
        self.load_secrets()
        self.timings["certs"] = time.monotonic() - t0

        t0 = time.monotonic()
        services = [
            p for p in self.pods
            if p.owner["kind"] in ("StatefulSet", "Deployment")
            and p.owner["metadata"]["name"] not in NOT_RUN
        ]  # fmt: skip
        print("not run:", json.dumps(NOT_RUN))
        nodes = [p for p in services if p.owner["metadata"]["name"] == "supernode"]
        running = [
            self.start(pod, ctr, "always")
            for pod in services
            if pod not in nodes
            for ctr in pod.spec["containers"]
        ]
        launcher = pods["fedsd-launcher"]
        init = launcher.spec["initContainers"]
        assert [c["name"] for c in init] == ["register"]
        reg = self.start(launcher, init[0], "no")
        code = self.wait(reg, 300, watch=running)  # waits for the SuperLink, then registers
        reg_logs = self.logs(reg)
        if code != 0:
            pytest.fail(f"register exited {code}:\n{reg_logs}\n{self.tails()}")
        self.timings["register"] = time.monotonic() - t0
        running += [
            self.start(pod, ctr, "always") for pod in nodes for ctr in pod.spec["containers"]
        ]

        t0 = time.monotonic()
        (run_ctr,) = launcher.spec["containers"]
        run = self.start(launcher, run_ctr, "no")
        passed = self.probes_pass(services, time.monotonic() + 600)
        self.timings["probes"] = time.monotonic() - t0
        code = self.wait(run, 600, watch=running)  # 2 rounds at 64 px: minutes under load
        self.timings["run"] = time.monotonic() - t0
        run_logs = self.logs(run)
        if code != 0:
            pytest.fail(f"launcher exited {code}:\n{run_logs[-6000:]}\n{self.tails()}")
        assert "finished:completed" in run_logs
        print("\n".join(ln for ln in run_logs.splitlines() if "fedsd " in ln))
        print(f"probes passed: {sorted(passed)}")
        out = self.root / "pv" / "fedsd-out"
        adapter = out / "latest" / "pytorch_lora_weights.safetensors"
        assert adapter.is_file() and adapter.stat().st_size > 0
        history = json.loads((out / "history.json").read_text())
        rounds = history["rounds"] if isinstance(history, dict) else history
        assert len(rounds) == 2
        self.check_isolation(nodes)
        t0 = time.monotonic()
        self.check_prometheus(pods["prometheus"], time.monotonic() + 180)
        self.timings["prometheus"] = time.monotonic() - t0
        restarts = {
            c: _sh(
                [self.podman, "inspect", "-f", "{{.RestartCount}}", c], check=False
            ).stdout.strip()
            for c in self.containers
        }
        print("restarts:", json.dumps(restarts))
        print("timings (s):", json.dumps({k: round(v, 1) for k, v in self.timings.items()}))

    def check_isolation(self, nodes: list[Pod]) -> None:
        node = f"{self.prefix}-{nodes[0].name}-{nodes[0].spec['containers'][0]['name']}"
        env = self.env(nodes[0], nodes[0].spec["containers"][0])
        ca = env["FEDSD_CA_CERT"]
        fleet = "https://" + env["SUPERLINK_ADDRESS"]

        def request(url: str, method: str = "POST") -> str:
            return self.exec_py(
                node,
                "import ssl, urllib.request, urllib.error\n"
                f"ctx = ssl.create_default_context(cafile={ca!r})\n"
                f"req = urllib.request.Request({url!r}, method={method!r}, "
                "data=b'' if " + repr(method) + " == 'POST' else None)\n"
                "try:\n    print(urllib.request.urlopen(req, context=ctx, timeout=5).status)\n"
                "except urllib.error.HTTPError as e:\n    print(e.code)\n"
                "except OSError as e:\n    print('blocked', type(e).__name__)\n",
            )

        # From a SuperNode's namespace: the fleet entry point passes /health and the Fleet
        # API, refuses the Control and Runtime APIs; the SuperLink itself is unreachable.
        assert request(f"{fleet}/health", "GET") == "200"
        for path in (
            "/v1/control/list-runs",
            "/v1/control/register-node",
            "/v1/runtime/pull-messages",
        ):
            got = request(fleet + path)
            assert got == "403", f"{path} through the fleet entry point: {got}"
        # A Fleet call passes the proxy; the SuperLink itself answers (no node auth here).
        fleet_call = request(f"{fleet}/v1/fleet/get-run")
        assert fleet_call not in ("403",) and not fleet_call.startswith("blocked"), fleet_call
        direct = request("https://superlink:9092/v1/control/list-runs")
        assert direct.startswith("blocked"), f"SuperLink reachable from a SuperNode: {direct}"
        peer = nodes[1]
        for port, what in ((9094, "Runtime API"), (9400, "metrics exporter")):
            reach = self.exec_py(
                node,
                "import socket\ntry:\n"
                f"    socket.create_connection(({peer.ip!r}, {port}), 3); print('open')\n"
                "except OSError as e:\n    print('blocked')\n",
            )
            assert reach == "blocked", f"SuperNode {what} reachable from another node: {reach}"
        # The cluster's Prometheus (namespace monitoring) scrapes the metrics ports.
        serverapp = [p for p in self.pods if p.owner["metadata"]["name"] == "serverapp"]
        ports = [(n, 9400) for n in nodes] + [(p, q) for p in serverapp for q in (9400, 9401)]
        for pod, port in ports:
            got = self.netns_py(
                self.prom_ns,
                "import urllib.request\n"
                f"url = 'http://{pod.ip}:{port}/metrics'\n"
                "body = urllib.request.urlopen(url, timeout=5).read()\n"
                "print(len(body), b'fedsd_' in body)",
            )
            assert got.endswith("True"), f"metrics of {pod.name}:{port}: {got}"

    def check_prometheus(self, pod: Pod, deadline: float) -> None:
        """The manifests' Prometheus scrapes every exporter, each under the instance name
        the dashboards and alerts use (SuperNodes found by SRV, named by pod), and reads
        the SuperLink's view of the federation from its exporter."""
        nodes = k8s_sim.find(self.objs, "StatefulSet", "supernode")["spec"]["replicas"]
        want = {("superlink", "superlink"), ("serverapp", "serverapp")}
        want |= {("supernode", f"supernode-{i}") for i in range(nodes)}

        def query(expr: str) -> list[dict]:
            out = self.netns_py(
                self.hub,
                "import json, urllib.parse, urllib.request\n"
                f"url = 'http://{pod.ip}:9090/api/v1/query?query=' + "
                f"urllib.parse.quote({expr!r})\n"
                "reply = json.load(urllib.request.urlopen(url, timeout=10))\n"
                "print(json.dumps(reply['data']['result']))",
            )
            try:
                return json.loads(out.splitlines()[-1])
            except (json.JSONDecodeError, IndexError):
                return [{"error": out[-500:]}]

        got: object = None
        online: object = None
        while time.monotonic() < deadline:
            up = query("up")
            got = {(r["metric"].get("job"), r["metric"].get("instance")): r["value"][1]
                   for r in up if "metric" in r} or up  # fmt: skip
            online = query('sum(fedsd_superlink_node_online{instance="superlink"})')
            if (
                isinstance(got, dict)
                and set(got) == want
                and set(got.values()) == {"1"}
                and [r.get("value", [0, None])[1] for r in online] == [str(nodes)]
            ):
                break
            time.sleep(5)
        else:
            cname = f"{self.prefix}-{pod.name}-{pod.spec['containers'][0]['name']}"
            pytest.fail(
                f"Prometheus up: {got}, want {sorted(want)} at 1; nodes online: {online}\n"
                f"{self.logs(cname, 40)}"
            )
        print("prometheus up:", json.dumps(sorted(f"{j}/{i}" for j, i in want)))

    def _ours(self) -> list[str]:
        return _sh([self.podman, "ps", "-aq", "--filter", f"label=fedsd-k8s-test={self.id}"],
                   check=False).stdout.split()  # fmt: skip

    def remove_containers(self) -> str:
        """``podman rm -f`` every container of this run, again while any is left (one that
        its restart policy is just restarting can survive a removal); what is left and
        why, or "" when none is."""
        why = ""
        for _ in range(5):
            ids = self._ours()
            if not ids:
                return ""
            res = _sh([self.podman, "rm", "-f", "-t", "5", *ids], timeout=300, check=False)
            why = res.stderr.strip()
            time.sleep(2)
        left = self._ours()
        return f"{' '.join(left)} ({why})" if left else ""

    def cleanup(self) -> None:
        left_containers = self.remove_containers() if self.podman else ""
        for proc in (self.api_proc, self.dns_proc):
            if proc is None:
                continue
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            if proc.poll() is None:
                proc.kill()
        for ns in reversed(self.netns):
            _sh(["ip", "netns", "del", ns], check=False)
        left = _sh(["ip", "netns", "list"], check=False).stdout
        assert self.prefix not in left, f"network namespaces left: {left}"
        assert left_containers == "", f"containers left: {left_containers}"


def run(objs: list[dict], ci_images: object, root: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("the Kubernetes federation test needs root (network namespaces, podman)")
    for tool in ("ip", "iptables-restore", "podman"):
        if shutil.which(tool) is None:
            pytest.fail(f"`{tool}` not found; set the machine up with bash docker/ci-setup.sh")
    fed = Federation(objs, ci_images.images, ci_images.base, root)
    try:
        fed.go()
    finally:
        fed.cleanup()
