"""Kubernetes manifests (issue 6): schema validation, the restricted Pod Security Standard,
the NetworkPolicies' exact flows, the certs Job against an RBAC-checking API stand-in, and
a real federation run of what the manifests say (tests/k8s_federation.py).

No Kubernetes API server can run on the CI machines: everything here is offline. Never
skipped: a missing tool (kubectl, kubernetes-validate, podman, root) fails with the reason.
"""

from __future__ import annotations

import ipaddress
import json
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests import k8s_sim
from tests.host import tool
from tests.k8s_sim import NetworkPolicies, Peer

pytestmark = pytest.mark.k8s

REPO = k8s_sim.REPO
K8S = k8s_sim.K8S_DIR
OVERLAY = REPO / "deploy" / "kustomize" / "example"
NAMESPACE = "fedsd"
COMPONENTS = ("certs", "superlink", "fleet-proxy", "serverapp", "supernode", "launcher")
UID = 10001


def _tool(name: str) -> str:
    return tool(name, "tests/test_k8s.py needs it (pip install -e '.[dev]')")


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
    assert all(i.startswith("registry.example.org/fedsd/") and i.endswith(":0.1.0") for i in images)
    classes = {t["spec"]["storageClassName"] for t in nodes["spec"]["volumeClaimTemplates"]}
    assert classes == {"local-nvme"}
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
    out = []

    def bad(path: str, what: str) -> None:
        out.append(f"{where}: {path} {what}")

    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(flag):
            bad(f"spec.{flag}", "must not be true")
    if psc.get("runAsNonRoot") is not True:
        bad("spec.securityContext.runAsNonRoot", "must be true")
    if psc.get("runAsUser") != UID:
        bad("spec.securityContext.runAsUser", f"must be {UID}")
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
        if sc.get("runAsUser", psc.get("runAsUser")) != UID:
            bad(f"{path}.securityContext.runAsUser", f"must be {UID}")
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
    for _, template in k8s_sim.pod_templates(objs):
        for c in template["spec"]["containers"]:
            if c["image"].split(":")[0] in ("fedsd-supernode", "fedsd-serverapp") and (
                template["metadata"]["labels"]["app.kubernetes.io/component"]
                in ("supernode", "serverapp")
            ):
                ports = {p["name"]: p["containerPort"] for p in c["ports"]}
                assert ports["metrics"] == 9400
                ann = template["metadata"]["annotations"]
                assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == "9400"


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
    for comp in ("supernode", "serverapp"):
        intended |= {("prometheus", d, 9400, "TCP") for d in each(comp)}
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
    assert not [f for f in allowed if f[0] == "other-ns" or f[1] == "stranger"]


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
    """docker/k8s_certs.py against an API stand-in that enforces the manifests' Role: it
    creates the four Secrets, is idempotent, adds keys when nodes grow, and needs no verb
    beyond get/create/patch (list, delete, other Secrets: refused)."""
    sys.path.insert(0, str(REPO / "docker"))
    try:
        import k8s_certs
    finally:
        sys.path.remove(str(REPO / "docker"))
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
        }
        assert server.secrets["fedsd-tls"]["type"] == "kubernetes.io/tls"
        tls = server.data("fedsd-tls")
        assert set(tls) == {"tls.crt", "tls.key", "ca.crt"}
        assert server.data("fedsd-ca") == {"ca.crt": tls["ca.crt"]}
        keys = server.data("fedsd-node-keys")
        assert set(keys) == {"node-0", "node-1"}
        assert set(server.data("fedsd-node-pubkeys")) == {"node-0.pub", "node-1.pub"}
        from cryptography import x509

        from fedsd.certs import server_cert_covers

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
    """What the manifests say, run as pods: see tests/k8s_federation.py."""
    from tests import k8s_federation

    k8s_federation.run(objs, ci_images, tmp_path)


def test_loopback_only(objs):
    """Addresses the federation test gives pods are loopback (127.0.0.0/8)."""
    from tests import k8s_federation

    for ip in k8s_federation.addresses(len(k8s_sim.expand_pods(objs)) + 4):
        assert ipaddress.ip_address(ip).is_loopback, ip
