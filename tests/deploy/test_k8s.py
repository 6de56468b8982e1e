"""Kubernetes manifests (issue 6): schema validation, the restricted Pod Security Standard,
the NetworkPolicies' exact flows, the certs Job against an RBAC-checking API stand-in, and
a real federation run of what the manifests say (tests/support/k8s_federation.py).

No Kubernetes API server can run on the CI machines: everything here is offline. Never
skipped: a missing tool (kubectl, kubernetes-validate, podman, root) fails with the reason.
"""

from __future__ import annotations

import ipaddress
import json
import re
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from tests.support import k8s_sim
from tests.support.host import tool
from tests.support.k8s_sim import NetworkPolicies, Peer

pytestmark = pytest.mark.k8s

REPO = k8s_sim.REPO
K8S = k8s_sim.K8S_DIR
OVERLAY = REPO / "deploy" / "kustomize" / "example"
NAMESPACE = "fedsd"
COMPONENTS = (
    "certs",
    "superlink",
    "fleet-proxy",
    "serverapp",
    "supernode",
    "launcher",
    "monitoring",
    "dashboards",
)
UID = 10001  # the fedsd images' user; the official monitoring images keep their own
MONITORING_UIDS = {"prom/prometheus": 65534, "grafana/grafana": 472}


def _expected_uid(template: dict) -> int:
    images = {c["image"].rsplit(":", 1)[0] for c in template["spec"]["containers"]}
    uids = {MONITORING_UIDS.get(i, UID) for i in images}
    assert len(uids) == 1, f"one pod, one user: {images}"
    return uids.pop()


def _tool(name: str) -> str:
    return tool(name, "tests/deploy/test_k8s.py needs it (pip install -e '.[dev]')")


def _kustomize(path: Path) -> str:
    res = subprocess.run(
        [_tool("kubectl"), "kustomize", str(path)], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


@pytest.fixture(scope="module")
def objs() -> list[dict]:
    return k8s_sim.load()


def _key(obj: dict) -> tuple[str, str, str]:
    return obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"]


# --------------------------------------------------------------------------- layout, schemas


def test_apply_f_reads_exactly_the_base(objs):
    """`kubectl apply -f k8s/` reads k8s/*.yaml|yml|json, not subfolders (no -R) and not
    k8s/Kustomization; the kustomize base lists the same objects, Namespace first."""
    entries = sorted(p.name for p in K8S.iterdir())
    assert not [e for e in entries if (K8S / e).is_dir()], "kubectl apply -f k8s/ skips folders"
    manifests = [e for e in entries if e.endswith((".yaml", ".yml", ".json"))]
    assert set(entries) - set(manifests) == {"Kustomization"}
    assert objs[0]["kind"] == "Namespace" and objs[0]["metadata"]["name"] == NAMESPACE
    for obj in objs[1:]:
        assert obj["metadata"].get("namespace") == NAMESPACE, _key(obj)
    base = k8s_sim.load_text(_kustomize(K8S))
    assert sorted(map(_key, base)) == sorted(map(_key, objs))
    # Secrets: none in the manifests (the certs Job makes them, none is committed).
    assert not [o for o in objs if o["kind"] == "Secret"]


def _newest_versions(n: int = 2) -> list[str]:
    import kubernetes_validate

    schema_dir = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    versions = {
        m.group(1)
        for p in schema_dir.iterdir()
        if (m := re.fullmatch(r"v(\d+\.\d+\.\d+)-local-strict", p.name))
    }
    ordered = sorted(versions, key=lambda v: tuple(map(int, v.split("."))))
    assert len(ordered) >= n, ordered
    return ordered[-n:]


def _validate(docs: list[dict], version: str) -> list[str]:
    import kubernetes_validate

    errors = []
    for doc in docs:
        doc = json.loads(json.dumps(doc))
        doc["metadata"].get("annotations", {}).pop("fedsd.test/file", None)
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{_key(doc)}: {exc.message} at {list(exc.path)}")
    return errors


@pytest.mark.parametrize("version", _newest_versions())
def test_manifests_validate_strict(version, objs):
    assert _validate(objs, version) == []
    # The validator is strict: an unknown field fails.
    bad = json.loads(json.dumps(k8s_sim.find(objs, "Deployment", "serverapp")))
    bad["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    assert _validate([bad], version), "kubernetes-validate --strict missed an unknown field"


@pytest.mark.parametrize("version", _newest_versions())
def test_overlay_validates_strict(version):
    docs = k8s_sim.load_text(_kustomize(OVERLAY))
    assert _validate(docs, version) == []
    # The CLI the issue names, on the rendered overlay, as a user would run it.
    res = subprocess.run(
        [_tool("kubernetes-validate"), "--strict", "--quiet", "-k", version, "-"],
        input=_kustomize(OVERLAY),
        capture_output=True,
        text=True,
        timeout=300,
    )
    if res.returncode != 0 and "-" in res.stderr and "No such file" in res.stderr:
        pytest.fail("kubernetes-validate does not read stdin: " + res.stderr)
    assert res.returncode == 0, res.stdout + res.stderr


def test_overlay_sets_the_knobs():
    docs = k8s_sim.load_text(_kustomize(OVERLAY))
    nodes = k8s_sim.find(docs, "StatefulSet", "supernode")
    config = k8s_sim.find(docs, "ConfigMap", "fedsd")["data"]
    assert nodes["spec"]["replicas"] == int(config["FEDSD_NUM_NODES"]) == 4
    assert config["FEDSD_PRIVACY"] == "secagg+dp-sample"
    images = {
        c["image"]
        for _, t in k8s_sim.pod_templates(docs)
        for c in t["spec"].get("initContainers", []) + t["spec"]["containers"]
    }
    ours = {i for i in images if i.rsplit(":", 1)[0] not in MONITORING_UIDS}
    assert len(ours) == 4
    assert all(i.startswith("registry.example.org/fedsd/") and i.endswith(":0.1.0") for i in ours)
    classes = {t["spec"]["storageClassName"] for t in nodes["spec"]["volumeClaimTemplates"]}
    assert classes == {"local-nvme"}
    claims = {
        o["metadata"]["name"]: o["spec"] for o in docs if o["kind"] == "PersistentVolumeClaim"
    }
    assert {n: c.get("storageClassName") for n, c in claims.items()} == {
        "fedsd-models": "nfs-client",
        "fedsd-out": "standard",
        "fedsd-prometheus": "standard",
    }
    spread = nodes["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert [s["whenUnsatisfiable"] for s in spread] == ["DoNotSchedule"]


# --------------------------------------------------------------------------- Pod Security

ALLOWED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
RECOMMENDED = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/component",
    "app.kubernetes.io/part-of",
)


def _restricted_violations(workload: dict, template: dict) -> list[str]:
    """Restricted Pod Security Standard (and this project's extras), field by field."""
    where = f"{workload['kind']}/{workload['metadata']['name']}"
    spec = template["spec"]
    psc = spec.get("securityContext", {})
    uid = _expected_uid(template)
    out = []

    def bad(path: str, what: str) -> None:
        out.append(f"{where}: {path} {what}")

    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(flag):
            bad(f"spec.{flag}", "must not be true")
    if psc.get("runAsNonRoot") is not True:
        bad("spec.securityContext.runAsNonRoot", "must be true")
    if psc.get("runAsUser") != uid:
        bad("spec.securityContext.runAsUser", f"must be {uid}")
    if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        bad("spec.securityContext.seccompProfile.type", "must be RuntimeDefault")
    for vol in spec.get("volumes", []):
        kinds = set(vol) - {"name"}
        if not kinds <= ALLOWED_VOLUMES:
            bad(f"spec.volumes[{vol['name']}]", f"type {kinds} is not allowed")
    if spec.get("enableServiceLinks") is not False:
        bad("spec.enableServiceLinks", "must be false")
    token = spec.get("automountServiceAccountToken")
    if token is not (template["metadata"]["labels"].get("app.kubernetes.io/component") == "certs"):
        bad("spec.automountServiceAccountToken", "only the certs Job mounts an API token")
    for label in RECOMMENDED:
        if label not in template["metadata"].get("labels", {}):
            bad(f"template.metadata.labels[{label}]", "missing")
        if label not in workload["metadata"].get("labels", {}):
            bad(f"metadata.labels[{label}]", "missing")
    containers = [("initContainers", c) for c in spec.get("initContainers", [])]
    containers += [("containers", c) for c in spec["containers"]]
    for group, ctr in containers:
        path = f"spec.{group}[{ctr['name']}]"
        sc = ctr.get("securityContext", {})
        if sc.get("allowPrivilegeEscalation") is not False:
            bad(f"{path}.securityContext.allowPrivilegeEscalation", "must be false")
        if sc.get("privileged"):
            bad(f"{path}.securityContext.privileged", "must not be true")
        if sc.get("readOnlyRootFilesystem") is not True:
            bad(f"{path}.securityContext.readOnlyRootFilesystem", "must be true")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            bad(f"{path}.securityContext.capabilities.drop", "must contain ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            bad(f"{path}.securityContext.capabilities.add", "may hold NET_BIND_SERVICE only")
        if sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is not True:
            bad(f"{path}.securityContext.runAsNonRoot", "must be true")
        if sc.get("runAsUser", psc.get("runAsUser")) != uid:
            bad(f"{path}.securityContext.runAsUser", f"must be {uid}")
        seccomp = sc.get("seccompProfile", psc.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            bad(f"{path}.securityContext.seccompProfile.type", "must be RuntimeDefault")
        for port in ctr.get("ports", []):
            if port.get("hostPort"):
                bad(f"{path}.ports[{port.get('name')}].hostPort", "must not be set")
        res = ctr.get("resources", {})
        for kind in ("requests", "limits"):
            for r in ("cpu", "memory"):
                if r not in res.get(kind, {}):
                    bad(f"{path}.resources.{kind}.{r}", "missing")
        mounts = {m["mountPath"] for m in ctr.get("volumeMounts", [])}
        if "/tmp" not in mounts:
            bad(f"{path}.volumeMounts", "no writable /tmp (emptyDir) on a read-only root")
        if workload["kind"] != "Job" and group == "containers":
            for probe in ("readinessProbe", "livenessProbe"):
                if probe not in ctr:
                    bad(f"{path}.{probe}", "missing")
    return out


def test_every_pod_meets_the_restricted_standard(objs):
    ns = k8s_sim.find(objs, "Namespace", NAMESPACE)
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    templates = k8s_sim.pod_templates(objs)
    comps = {t["metadata"]["labels"]["app.kubernetes.io/component"] for _, t in templates}
    assert comps == set(COMPONENTS)
    violations = [v for w, t in templates for v in _restricted_violations(w, t)]
    assert violations == [], "\n".join(violations)


def test_restricted_check_names_object_and_field(objs):
    """The checker itself: a privileged variant is caught with object and field."""
    workload = json.loads(json.dumps(k8s_sim.find(objs, "StatefulSet", "supernode")))
    template = workload["spec"]["template"]
    template["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    template["spec"]["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    del template["spec"]["securityContext"]["runAsNonRoot"]
    found = _restricted_violations(workload, template)
    assert any(
        "StatefulSet/supernode: spec.containers[supernode].securityContext"
        ".allowPrivilegeEscalation" in v
        for v in found
    )
    assert any("spec.volumes[host]" in v for v in found)
    assert any("spec.securityContext.runAsNonRoot" in v for v in found)


def test_supernodes_gpu_ordinal_spread_and_own_volumes(objs):
    sts = k8s_sim.find(objs, "StatefulSet", "supernode")
    spec = sts["spec"]["template"]["spec"]
    ctr = spec["containers"][0]
    assert ctr["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {e["name"]: e for e in ctr["env"]}
    assert env["FEDSD_NODE_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.labels['apps.kubernetes.io/pod-index']"
    )
    assert env["SUPERNODE_HOST"]["value"] == "0.0.0.0"
    assert env["SUPERLINK_ADDRESS"]["value"] == "fleet:9092"
    assert {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]} == {
        "shard",
        "cache",
    }
    assert spec["topologySpreadConstraints"][0]["topologyKey"] == "kubernetes.io/hostname"
    assert sts["spec"]["replicas"] == int(k8s_sim.find(objs, "ConfigMap", "fedsd")["data"][
        "FEDSD_NUM_NODES"
    ])  # fmt: skip
    # Metrics ports as in compose: SuperNodes 9400 (a pod each), the ServerApp pod 9401
    # and its SuperLink exporter 9400 (tests/support/k8s_federation.py scrapes them all).
    assert _metrics_ports(sts["spec"]["template"]) == {"supernode": {"metrics": 9400}}
    serverapp = k8s_sim.find(objs, "Deployment", "serverapp")["spec"]["template"]
    assert _metrics_ports(serverapp) == {
        "serverapp": {"metrics": 9401},
        "superlink-exporter": {"link-metrics": 9400},
    }
    (exporter,) = [c for c in serverapp["spec"]["containers"] if c["name"] == "superlink-exporter"]
    assert exporter["args"] == ["superlink-exporter"]
    env = {e["name"]: e.get("value") for e in exporter["env"]}
    assert env["SUPERLINK_ADDRESS"] == "superlink:9092" and env["FEDSD_METRICS_PORT"] == "9400"
    for template in (sts["spec"]["template"], serverapp):
        ann = template["metadata"]["annotations"]
        ports = {p["containerPort"] for c in template["spec"]["containers"] for p in c["ports"]}
        assert ann["prometheus.io/scrape"] == "true" and int(ann["prometheus.io/port"]) in ports


def _metrics_ports(template: dict) -> dict[str, dict[str, int]]:
    return {
        c["name"]: {p["name"]: p["containerPort"] for p in c["ports"] if "metrics" in p["name"]}
        for c in template["spec"]["containers"]
        if any("metrics" in p["name"] for p in c.get("ports", []))
    }


# --------------------------------------------------------------------------- monitoring


def test_monitoring_is_generated_and_wired_to_the_services(objs, tmp_path):
    """Prometheus and Grafana as the manifests mount them: the ConfigMaps are the generated
    ones, promtool accepts the configuration at the paths the args name, every scrape
    target is a Service port with a pod behind it, SRV discovery names a headless Service
    of the StatefulSet, and Grafana's provisioning points at the Prometheus Service."""
    import yaml

    from fedsd.observability import scrape as observability
    from scripts import monitoring

    maps = {o["metadata"]["name"]: o["data"] for o in objs if o["kind"] == "ConfigMap"}
    for name, files in monitoring.k8s_configmaps().items():
        assert maps[name] == files, f"{name} is stale: python scripts/monitoring.py --write"
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())["services"]
    prom = k8s_sim.find(objs, "Deployment", "prometheus")["spec"]["template"]["spec"]
    graf = k8s_sim.find(objs, "Deployment", "grafana")["spec"]["template"]["spec"]
    assert prom["containers"][0]["image"] == compose["prometheus"]["image"]
    assert graf["containers"][0]["image"] == compose["grafana"]["image"]

    def mounted(spec: dict, path: str) -> tuple[dict, str]:
        """The volume holding ``path`` in the first container, and the path inside it."""
        for m in spec["containers"][0]["volumeMounts"]:
            if path == m["mountPath"] or path.startswith(m["mountPath"] + "/"):
                vol = next(v for v in spec["volumes"] if v["name"] == m["name"])
                return vol, path[len(m["mountPath"]) :].lstrip("/")
        raise AssertionError(f"{path} is on no volume")

    args = dict(a.split("=", 1) for a in prom["containers"][0]["args"])
    vol, key = mounted(prom, args["--config.file"])
    files = maps[vol["configMap"]["name"]]
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    promtool = tool("promtool", "install it with: bash docker/ci-observability.sh (as root)")
    res = subprocess.run(
        [promtool, "check", "config", str(tmp_path / key)], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stdout + res.stderr  # with the rule files it names
    assert mounted(prom, args["--storage.tsdb.path"])[0]["persistentVolumeClaim"]

    pods = k8s_sim.expand_pods(objs)
    services = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Service"}
    config = yaml.safe_load(files[key])
    assert [j["job_name"] for j in config["scrape_configs"]] == list(observability.JOBS)
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                assert host in services, f"{job['job_name']}: no Service {host}"
                ends = k8s_sim.service_endpoints(objs, pods, host, int(port))
                assert ends, f"{job['job_name']}: {target} reaches no container port"
        for sd in job.get("dns_sd_configs", []):
            for name in sd["names"]:
                port_name, svc_name = re.fullmatch(
                    r"_([a-z0-9-]+)\._tcp\.([a-z0-9-]+)", name
                ).groups()
                svc = services[svc_name]["spec"]
                assert svc["clusterIP"] == "None" and svc["publishNotReadyAddresses"] is True
                assert port_name in [p["name"] for p in svc["ports"]]
                sts = k8s_sim.find(objs, "StatefulSet", svc_name)
                assert sts["spec"]["serviceName"] == svc_name  # pods get SRV targets by name

    env = {e["name"]: e["value"] for e in graf["containers"][0]["env"]}
    provisioning = mounted(graf, env["GF_PATHS_PROVISIONING"])[0]["configMap"]
    layout = {i["path"]: maps[provisioning["name"]][i["key"]] for i in provisioning["items"]}
    datasource = yaml.safe_load(layout["datasources/prometheus.yaml"])["datasources"][0]
    url = re.fullmatch(r"http://([a-z0-9-]+):(\d+)", datasource["url"])
    ends = k8s_sim.service_endpoints(objs, pods, url.group(1), int(url.group(2)))
    assert [p.labels["app.kubernetes.io/name"] for p, _ in ends] == ["prometheus"]
    boards = yaml.safe_load(layout["dashboards/fedsd.yaml"])["providers"][0]["options"]["path"]
    vol, inside = mounted(graf, env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert mounted(graf, boards)[0] is vol and inside in maps[vol["configMap"]["name"]]
    assert env["GF_SECURITY_DISABLE_INITIAL_ADMIN_CREATION"] == "true"  # no default password


def test_cluster_dns_stand_in_answers_like_cluster_dns(objs):
    """What Prometheus' SRV discovery gets in tests/support/k8s_federation.py: one SRV record per
    SuperNode pod with its own name; NXDOMAIN for names that do not exist."""
    import struct

    pods = k8s_sim.expand_pods(objs)
    for i, pod in enumerate(pods):
        pod.ip = f"127.1.0.{i + 1}"
    records = k8s_sim.cluster_dns_records(objs, pods)

    def ask(name: str, qtype: int) -> tuple[int, list[bytes]]:
        query = struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0)
        query += k8s_sim._dns_name(name) + struct.pack("!HH", qtype, 1)
        reply = k8s_sim.dns_answer(query, records)
        qid, flags, _, count = struct.unpack("!HHHH", reply[:8])
        assert qid == 7 and flags & 0x8000
        pos, answers = len(query), []
        for _ in range(count):
            (length,) = struct.unpack("!H", reply[pos + 10 : pos + 12])
            answers.append(reply[pos + 12 : pos + 12 + length])
            pos += 12 + length
        return flags & 0xF, answers

    rcode, srv = ask("_metrics._tcp.supernode.fedsd.svc.cluster.local", k8s_sim.DNS_SRV)
    assert rcode == 0
    assert sorted((struct.unpack("!H", a[4:6])[0], a[6:]) for a in srv) == [
        (9400, k8s_sim._dns_name(f"supernode-{i}.supernode.fedsd.svc.cluster.local"))
        for i in range(2)
    ]
    node0 = next(p for p in pods if p.name == "supernode-0")
    rcode, a = ask("SuperNode-0.supernode.fedsd.svc.cluster.local", k8s_sim.DNS_A)
    assert (rcode, a) == (0, [bytes(map(int, node0.ip.split(".")))])
    assert ask("supernode-0.supernode.fedsd.svc.cluster.local", k8s_sim.DNS_AAAA) == (0, [])
    assert ask("_metrics._tcp.supernode.svc.cluster.local", k8s_sim.DNS_SRV) == (3, [])
    assert ask("superlink-0.superlink.fedsd.svc.cluster.local", k8s_sim.DNS_A)[0] == 3


# --------------------------------------------------------------------------- NetworkPolicies

NS_LABELS = {
    NAMESPACE: {"kubernetes.io/metadata.name": NAMESPACE},
    "monitoring": {"kubernetes.io/metadata.name": "monitoring"},
    "kube-system": {"kubernetes.io/metadata.name": "kube-system"},
    "other": {"kubernetes.io/metadata.name": "other"},
}


def _peers(objs: list[dict]) -> tuple[list[Peer], list[Peer]]:
    """(pods of the manifests + others, every peer) for the flow matrix."""
    pods = [Peer.of(p) for p in k8s_sim.expand_pods(objs)]
    extra = [
        Peer(
            "prometheus",
            "monitoring",
            (("app.kubernetes.io/name", "prometheus"),),
            (("web", 9090, "TCP"),),
        ),
        Peer(
            "kube-dns",
            "kube-system",
            (("k8s-app", "kube-dns"),),
            (("dns", 53, "UDP"), ("dns-tcp", 53, "TCP")),
        ),  # fmt: skip
        Peer("stranger", NAMESPACE, (("app", "debug"),), (("http", 8080, "TCP"),)),
        Peer("other-ns", "other", (("app", "x"),), (("http", 8080, "TCP"),)),
        Peer(
            "apiserver", None, (), (("https", 443, "TCP"), ("https-alt", 6443, "TCP")), "10.0.0.1"
        ),
        Peer("internet", None, (), (("https", 443, "TCP"),), "203.0.113.7"),
    ]
    return pods, pods + extra


def _matrix(objs: list[dict]) -> set[tuple[str, str, int, str]]:
    policies = NetworkPolicies(objs, NS_LABELS)
    pods, everyone = _peers(objs)
    ours = {p.name for p in pods} | {"stranger"}
    allowed = set()
    for src in everyone:
        for dst in everyone:
            if src is dst or (src.name not in ours and dst.name not in ours):
                continue  # flows between pods outside fedsd are not ours to decide
            for _, port, proto in dst.ports:
                if policies.allowed(src, dst, port, proto):
                    allowed.add((src.name, dst.name, port, proto))
    return allowed


def test_network_policies_allow_exactly_the_intended_flows(objs):
    pods = {p.name: p for p in k8s_sim.expand_pods(objs)}
    by_comp: dict[str, list[str]] = {}
    for name, pod in pods.items():
        by_comp.setdefault(pod.labels["app.kubernetes.io/component"], []).append(name)
    assert sorted(by_comp["supernode"]) == ["supernode-0", "supernode-1"]

    def each(comp: str) -> list[str]:
        return by_comp[comp]

    intended = set()
    for src in each("supernode"):
        intended |= {(src, dst, 9092, "TCP") for dst in each("fleet-proxy")}
    for comp in ("fleet-proxy", "serverapp", "launcher"):
        intended |= {(s, d, 9092, "TCP") for s in each(comp) for d in each("superlink")}
    # Metrics: the cluster's Prometheus (namespace monitoring) and ours scrape the nodes
    # (9400) and the ServerApp pod (SuperLink exporter 9400, ServerApp 9401); Grafana
    # reads our Prometheus; nothing reaches Grafana (kubectl port-forward only).
    for scraper in ("prometheus", *each("monitoring")):
        intended |= {(scraper, d, 9400, "TCP") for d in each("supernode")}
        intended |= {(scraper, d, p, "TCP") for d in each("serverapp") for p in (9400, 9401)}
    intended |= {(s, d, 9090, "TCP") for s in each("dashboards") for d in each("monitoring")}
    for s in each("certs"):  # the API server; no `to`: also anything else on 443
        intended |= {(s, "apiserver", 443, "TCP"), (s, "apiserver", 6443, "TCP")}
        intended |= {(s, "internet", 443, "TCP")}
    for s in [*pods, "stranger"]:
        intended |= {(s, "kube-dns", 53, "UDP"), (s, "kube-dns", 53, "TCP")}

    allowed = _matrix(objs)
    assert allowed - intended == set(), f"allowed but not intended: {sorted(allowed - intended)}"
    assert intended - allowed == set(), f"intended but denied: {sorted(intended - allowed)}"
    # Spelled out, what the design rests on:
    for s in each("supernode"):
        for d in each("superlink"):
            assert (s, d, 9092, "TCP") not in allowed  # Control/Runtime API: never from nodes
        for d in each("supernode"):
            assert (s, d, 9094, "TCP") not in allowed  # node Runtime APIs on 0.0.0.0: closed
            assert (s, d, 9400, "TCP") not in allowed  # another node's exporter: closed
    assert not [f for f in allowed if f[0] == "other-ns" or f[1] == "stranger"]
    for d in each("superlink"):  # the exporter asks the Control API from the ServerApp pod
        assert not [f for f in allowed if f[1] == d and f[0] in each("monitoring")]
    assert not [f for f in allowed if f[1] in each("dashboards")]


def test_network_policy_evaluator_semantics():
    """The evaluator on hand-made cases (namespaces, named ports, policyTypes defaults)."""
    a = Peer("a", "n1", (("role", "a"),), (("web", 80, "TCP"),))
    b = Peer("b", "n1", (("role", "b"),), (("web", 8080, "TCP"), ("dns", 53, "UDP")))
    c = Peer("c", "n2", (("role", "a"),), ())
    ns = {"n1": {"team": "x"}, "n2": {"team": "y"}}
    none = NetworkPolicies([], ns)
    assert none.allowed(a, b, 8080) and none.allowed(c, b, 53, "UDP")
    ingress_only = {  # no policyTypes, no egress key: Ingress only
        "kind": "NetworkPolicy",
        "metadata": {"name": "p", "namespace": "n1"},
        "spec": {
            "podSelector": {"matchLabels": {"role": "b"}},
            "ingress": [
                {
                    "from": [{"podSelector": {"matchLabels": {"role": "a"}}}],
                    "ports": [{"port": "web"}],
                }
            ],  # fmt: skip
        },
    }
    pol = NetworkPolicies([ingress_only], ns)
    assert pol.allowed(a, b, 8080)  # named port resolved on the destination
    assert not pol.allowed(a, b, 80)
    assert not pol.allowed(c, b, 8080)  # podSelector alone: same namespace only
    assert not pol.allowed(a, b, 53, "UDP")
    assert pol.allowed(b, a, 80)  # a is not selected: open
    cross = json.loads(json.dumps(ingress_only))
    cross["spec"]["ingress"][0]["from"] = [
        {
            "namespaceSelector": {"matchLabels": {"team": "y"}},
            "podSelector": {
                "matchExpressions": [{"key": "role", "operator": "In", "values": ["a"]}]
            },
        }  # fmt: skip
    ]
    pol = NetworkPolicies([cross], ns)
    assert pol.allowed(c, b, 8080) and not pol.allowed(a, b, 8080)
    egress = {
        "kind": "NetworkPolicy",
        "metadata": {"name": "e", "namespace": "n1"},
        "spec": {
            "podSelector": {},
            "policyTypes": ["Egress"],
            "egress": [{"ports": [{"protocol": "UDP", "port": 53}]}],
        },  # fmt: skip
    }
    pol = NetworkPolicies([egress], ns)
    assert pol.allowed(a, b, 53, "UDP") and not pol.allowed(a, b, 8080)
    assert pol.allowed(c, b, 8080)  # c's namespace has no policy; b has no ingress policy
    ext = Peer("ext", None, (), (("https", 443, "TCP"),), "192.0.2.9")
    block = json.loads(json.dumps(egress))
    block["spec"]["egress"] = [
        {"to": [{"ipBlock": {"cidr": "192.0.2.0/24", "except": ["192.0.2.8/29"]}}]}
    ]
    pol = NetworkPolicies([block], ns)
    assert not pol.allowed(a, ext, 443)  # in the except range
    ext2 = Peer("ext2", None, (), (("https", 443, "TCP"),), "192.0.2.1")
    assert pol.allowed(a, ext2, 443) and not pol.allowed(a, b, 8080)


# --------------------------------------------------------------------------- certs Job


def _certs_job_env(objs: list[dict], nodes: int) -> dict[str, str]:
    job = k8s_sim.find(objs, "Job", "fedsd-certs")
    env = {}
    for e in job["spec"]["template"]["spec"]["containers"][0]["env"]:
        if "value" in e:
            env[e["name"]] = e["value"]
    env["FEDSD_NUM_NODES"] = str(nodes)
    return env


def test_certs_job_creates_secrets_with_least_privilege(objs, tmp_path, monkeypatch):
    """fedsd.deploy.containers.k8s_certs against an API stand-in that enforces the
    manifests' Role: it creates the four Secrets, is idempotent, adds keys when nodes grow,
    and needs no verb beyond get/create/patch (list, delete, other Secrets: refused)."""
    from fedsd.deploy.containers import k8s_certs

    rules = k8s_sim.role_rules(objs, "fedsd-certs", NAMESPACE)
    assert k8s_sim.rbac_allows(rules, "get", "secrets", "fedsd-tls")
    assert not k8s_sim.rbac_allows(rules, "get", "secrets", "some-other-secret")
    assert not k8s_sim.rbac_allows(rules, "list", "secrets", None)
    assert not k8s_sim.rbac_allows(rules, "delete", "secrets", "fedsd-tls")
    assert not k8s_sim.rbac_allows(rules, "get", "configmaps", "fedsd")
    ca, cert, key = k8s_sim.make_tls(tmp_path / "api", "127.0.0.1")
    server = k8s_sim.FakeApiServer(("127.0.0.1", 0), "tok", NAMESPACE, rules, cert, key)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text("tok")
    (sa / "namespace").write_text(NAMESPACE)
    shutil.copy(ca, sa / "ca.crt")
    monkeypatch.setattr(k8s_certs, "SA_DIR", sa)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(server.server_address[1]))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    try:
        for name, value in _certs_job_env(objs, 2).items():
            monkeypatch.setenv(name, value)
        assert k8s_certs.main() == 0
        assert set(server.secrets) == {
            "fedsd-tls",
            "fedsd-ca",
            "fedsd-node-keys",
            "fedsd-node-pubkeys",
            "fedsd-superexec-auth",
        }
        secret = server.data("fedsd-superexec-auth")
        assert set(secret) == {"superexec-auth"}
        assert re.fullmatch(rb"[0-9a-f]{64}", secret["superexec-auth"])
        assert server.secrets["fedsd-tls"]["type"] == "kubernetes.io/tls"
        tls = server.data("fedsd-tls")
        assert set(tls) == {"tls.crt", "tls.key", "ca.crt"}
        assert server.data("fedsd-ca") == {"ca.crt": tls["ca.crt"]}
        keys = server.data("fedsd-node-keys")
        assert set(keys) == {"node-0", "node-1"}
        assert set(server.data("fedsd-node-pubkeys")) == {"node-0.pub", "node-1.pub"}
        from cryptography import x509

        from fedsd.deploy.certs import server_cert_covers

        crt = x509.load_pem_x509_certificate(tls["tls.crt"])
        assert server_cert_covers(crt, ["fleet", "superlink", "fleet.fedsd.svc.cluster.local"])
        assert not any(v.startswith(b"-----BEGIN") and b"CA" in v[:40] for v in keys.values())
        # Idempotent; a third node adds a key and keeps the others byte for byte.
        before = {n: dict(s) for n, s in server.secrets.items()}
        assert k8s_certs.main() == 0
        assert {n: dict(s) for n, s in server.secrets.items()} == before
        monkeypatch.setenv("FEDSD_NUM_NODES", "3")
        assert k8s_certs.main() == 0
        grown = server.data("fedsd-node-keys")
        assert set(grown) == {"node-0", "node-1", "node-2"}
        assert {k: grown[k] for k in keys} == keys
        assert server.data("fedsd-tls") == tls
        assert server.data("fedsd-superexec-auth") == secret  # kept byte for byte
        refused = [entry for entry in server.log if entry[2] in (401, 403)]
        assert refused == [], refused
        assert {verb for verb, _, _ in server.log} <= {"get", "create", "patch"}
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------- the real run


@pytest.mark.heavy
@pytest.mark.timeout(2400)
def test_manifests_run_a_federation(objs, ci_images, tmp_path):
    """What the manifests say, run as pods: see tests/support/k8s_federation.py."""
    from tests.support import k8s_federation

    k8s_federation.run(objs, ci_images, tmp_path)


def test_loopback_only(objs):
    """Addresses the federation test gives pods are loopback (127.0.0.0/8)."""
    from tests.support import k8s_federation

    for ip in k8s_federation.addresses(len(k8s_sim.expand_pods(objs)) + 4):
        assert ipaddress.ip_address(ip).is_loopback, ip
