"""Offline stand-ins for what a Kubernetes cluster does with k8s/, for tests/deploy/test_k8s.py.

* ``load`` / ``pod_templates`` / ``expand_pods``: the manifests and the pods their
  controllers would create (StatefulSet ordinals and their labels, Deployment replicas, Jobs).
* ``NetworkPolicies``: the semantics of networking.k8s.io/v1 NetworkPolicy (podSelector,
  namespaceSelector, ipBlock, ports incl. named ports, policyTypes) over such pods.
* ``FakeApiServer``: the few core/v1 Secret calls the certs Job makes, over HTTPS with a
  bearer token, authorized by the Role in the manifests (RBAC rules, resourceNames).
  ``python tests/support/k8s_sim.py apiserver ...`` runs it as a process (inside a network
  namespace in the federation test).
* ``cluster_dns_records`` / ``DnsServer``: the A and SRV records cluster DNS publishes for
  the manifests' Services (headless ones: a record per pod, SRV per named port), served
  over UDP (``python tests/support/k8s_sim.py dns ...``): what Prometheus' DNS discovery reads.

Standard library, PyYAML and cryptography only: the file also runs as a script.
"""

from __future__ import annotations

import argparse
import base64
import copy
import datetime as dt
import ipaddress
import json
import re
import socket
import socketserver
import ssl
import struct
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
K8S_DIR = REPO / "k8s"
WORKLOADS = ("Deployment", "StatefulSet", "Job", "DaemonSet", "ReplicaSet", "CronJob")


# --------------------------------------------------------------------------- manifests


def load(paths: list[Path] | None = None) -> list[dict]:
    """The objects of ``paths`` (default: k8s/*.yaml in the order kubectl applies them)."""
    paths = paths if paths is not None else sorted(K8S_DIR.glob("*.yaml"))
    objs = []
    for path in paths:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                doc.setdefault("metadata", {}).setdefault("annotations", {})
                doc["metadata"]["annotations"]["fedsd.test/file"] = path.name
                objs.append(doc)
    return objs


def load_text(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def find(objs: list[dict], kind: str, name: str) -> dict:
    for obj in objs:
        if obj["kind"] == kind and obj["metadata"]["name"] == name:
            return obj
    raise KeyError(f"{kind}/{name} not in the manifests")


def pod_templates(objs: list[dict]) -> list[tuple[dict, dict]]:
    """(workload, pod template) for every object that makes pods."""
    out = []
    for obj in objs:
        if obj["kind"] not in WORKLOADS:
            continue
        spec = obj["spec"]
        if obj["kind"] == "CronJob":
            spec = spec["jobTemplate"]["spec"]
        out.append((obj, spec["template"]))
    return out


@dataclass
class Pod:
    """A pod as its controller would create it."""

    name: str
    namespace: str
    labels: dict[str, str]
    spec: dict
    owner: dict  # the workload
    annotations: dict[str, str] = field(default_factory=dict)
    ordinal: int | None = None
    ip: str = ""

    def container_ports(self) -> list[dict]:
        ports = []
        for ctr in self.spec.get("containers", []):
            ports += ctr.get("ports", [])
        return ports

    def claim(self, volume: dict) -> str:
        """The PVC a volume uses: a claim of a volumeClaimTemplate, or a named claim."""
        if "persistentVolumeClaim" in volume:
            return volume["persistentVolumeClaim"]["claimName"]
        raise KeyError(volume["name"])


def expand_pods(objs: list[dict]) -> list[Pod]:
    pods = []
    for obj, template in pod_templates(objs):
        kind, name = obj["kind"], obj["metadata"]["name"]
        ns = obj["metadata"].get("namespace", "default")
        meta = template.get("metadata", {})
        labels = dict(meta.get("labels", {}))
        annotations = dict(meta.get("annotations", {}))
        spec = copy.deepcopy(template["spec"])
        if kind == "StatefulSet":
            for i in range(obj["spec"].get("replicas", 1)):
                pod_labels = {
                    **labels,
                    "statefulset.kubernetes.io/pod-name": f"{name}-{i}",
                    "apps.kubernetes.io/pod-index": str(i),
                }
                pods.append(Pod(f"{name}-{i}", ns, pod_labels, spec, obj, annotations, i))
        elif kind == "Job":
            pod_labels = {**labels, "job-name": name, "batch.kubernetes.io/job-name": name}
            pods.append(Pod(f"{name}-x1", ns, pod_labels, spec, obj, annotations))
        else:
            for i in range(obj["spec"].get("replicas", 1)):
                pods.append(Pod(f"{name}-5d8f-{i}", ns, labels, spec, obj, annotations))
    return pods


# --------------------------------------------------------------------------- selectors


def selector_matches(selector: dict | None, labels: dict[str, str]) -> bool:
    """metav1.LabelSelector semantics; an empty selector matches everything."""
    if selector is None:
        return True
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


# --------------------------------------------------------------------------- NetworkPolicy


@dataclass(frozen=True)
class Peer:
    """A pod (namespace + labels + container ports) or an address outside any pod."""

    name: str
    namespace: str | None  # None: not a pod (API server, internet)
    labels: tuple[tuple[str, str], ...] = ()
    ports: tuple[tuple[str, int, str], ...] = ()  # (name, port, protocol)
    ip: str = ""

    @classmethod
    def of(cls, pod: Pod) -> Peer:
        ports = tuple(
            (p.get("name", ""), int(p["containerPort"]), p.get("protocol", "TCP"))
            for p in pod.container_ports()
        )
        return cls(pod.name, pod.namespace, tuple(sorted(pod.labels.items())), ports, pod.ip)

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)


class NetworkPolicies:
    """Decides whether a connection (src, dst, port, protocol) is allowed."""

    def __init__(self, policies: list[dict], namespace_labels: dict[str, dict[str, str]]):
        self.policies = [p for p in policies if p["kind"] == "NetworkPolicy"]
        self.ns_labels = namespace_labels

    @staticmethod
    def types(policy: dict) -> list[str]:
        spec = policy["spec"]
        if "policyTypes" in spec:
            return spec["policyTypes"]
        return ["Ingress"] + (["Egress"] if "egress" in spec else [])

    def _selecting(self, pod: Peer, direction: str) -> list[dict]:
        if pod.namespace is None:
            return []
        return [
            p
            for p in self.policies
            if p["metadata"].get("namespace", "default") == pod.namespace
            and direction in self.types(p)
            and selector_matches(p["spec"].get("podSelector") or {}, pod.label_map)
        ]

    def isolated(self, pod: Peer, direction: str) -> bool:
        return bool(self._selecting(pod, direction))

    def _peer_matches(self, peer: dict, policy_ns: str, other: Peer) -> bool:
        if "ipBlock" in peer:
            if other.namespace is not None or not other.ip:
                return False  # pod IPs: implementation-defined, not relied upon here
            addr = ipaddress.ip_address(other.ip)
            block = peer["ipBlock"]
            if addr not in ipaddress.ip_network(block["cidr"]):
                return False
            return not any(addr in ipaddress.ip_network(c) for c in block.get("except", []))
        if other.namespace is None:
            return False
        ns_sel = peer.get("namespaceSelector")
        if ns_sel is None:
            ns_ok = other.namespace == policy_ns
        else:
            ns_ok = selector_matches(ns_sel, self.ns_labels.get(other.namespace, {}))
        return ns_ok and selector_matches(peer.get("podSelector"), other.label_map)

    @staticmethod
    def _port_matches(rule_port: dict, dst: Peer, port: int, protocol: str) -> bool:
        if rule_port.get("protocol", "TCP") != protocol:
            return False
        want = rule_port.get("port")
        if want is None:
            return True
        if isinstance(want, int):
            return want <= port <= rule_port.get("endPort", want)
        return any(n == want and p == port and pr == protocol for n, p, pr in dst.ports)

    def _rules_allow(self, policies: list[dict], key: str, peer_key: str, other: Peer,
                     dst: Peer, port: int, protocol: str) -> bool:  # fmt: skip
        for policy in policies:
            ns = policy["metadata"].get("namespace", "default")
            for rule in policy["spec"].get(key) or []:
                peers = rule.get(peer_key) or []
                if peers and not any(self._peer_matches(p, ns, other) for p in peers):
                    continue
                ports = rule.get("ports") or []
                if ports and not any(self._port_matches(p, dst, port, protocol) for p in ports):
                    continue
                return True
        return False

    def egress_allowed(self, src: Peer, dst: Peer, port: int, protocol: str = "TCP") -> bool:
        pols = self._selecting(src, "Egress")
        return not pols or self._rules_allow(pols, "egress", "to", dst, dst, port, protocol)

    def ingress_allowed(self, dst: Peer, src: Peer, port: int, protocol: str = "TCP") -> bool:
        pols = self._selecting(dst, "Ingress")
        return not pols or self._rules_allow(pols, "ingress", "from", src, dst, port, protocol)

    def allowed(self, src: Peer, dst: Peer, port: int, protocol: str = "TCP") -> bool:
        return self.egress_allowed(src, dst, port, protocol) and self.ingress_allowed(
            dst, src, port, protocol
        )


# --------------------------------------------------------------------------- fake API server


def role_rules(objs: list[dict], service_account: str, namespace: str) -> list[dict]:
    """The RBAC rules bound to a ServiceAccount by the manifests' RoleBindings."""
    rules = []
    for rb in objs:
        if rb["kind"] != "RoleBinding" or rb["metadata"].get("namespace") != namespace:
            continue
        if not any(
            s.get("kind") == "ServiceAccount"
            and s.get("name") == service_account
            and s.get("namespace", namespace) == namespace
            for s in rb.get("subjects", [])
        ):
            continue
        ref = rb["roleRef"]
        if ref["kind"] != "Role":
            raise AssertionError(f"RoleBinding {rb['metadata']['name']} binds a {ref['kind']}")
        rules += find(objs, "Role", ref["name"]).get("rules", [])
    return rules


def rbac_allows(rules: list[dict], verb: str, resource: str, name: str | None) -> bool:
    for rule in rules:
        if "" not in rule.get("apiGroups", []) and "*" not in rule.get("apiGroups", []):
            continue
        if resource not in rule.get("resources", []) and "*" not in rule.get("resources", []):
            continue
        if verb not in rule.get("verbs", []) and "*" not in rule.get("verbs", []):
            continue
        names = rule.get("resourceNames")
        if names and (name is None or name not in names):
            continue
        return True
    return False


def make_tls(directory: Path, ip: str) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for ``ip`` (the fake API server's)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake kube CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(ip)), x509.DNSName("kubernetes.default.svc")]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    paths = directory / "ca.crt", directory / "server.crt", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


_SECRETS = re.compile(r"^/api/v1/namespaces/([a-z0-9-]+)/secrets(?:/([a-z0-9.-]+))?$")


class FakeApiServer(ThreadingHTTPServer):
    """core/v1 Secrets (get, create, merge-patch) for one token, authorized by ``rules``."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], token: str, namespace: str, rules: list[dict],
                 cert: Path, key: Path, state_file: Path | None = None) -> None:  # fmt: skip
        super().__init__(address, _Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        self.socket = ctx.wrap_socket(self.socket, server_side=True)
        self.token, self.namespace, self.rules = token, namespace, rules
        self.secrets: dict[str, dict] = {}
        self.log: list[tuple[str, str | None, int]] = []  # (verb, name, status)
        self.state_file = state_file
        self.lock = threading.Lock()

    def save(self) -> None:
        if self.state_file is not None:
            tmp = self.state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"secrets": self.secrets, "log": self.log}))
            tmp.replace(self.state_file)

    def data(self, name: str) -> dict[str, bytes]:
        return {k: base64.b64decode(v) for k, v in self.secrets[name].get("data", {}).items()}


class _Handler(BaseHTTPRequestHandler):
    server: FakeApiServer

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self, verb: str) -> None:
        srv = self.server
        match = _SECRETS.match(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}") if length else {}
        name = match.group(2) if match else None
        if verb == "create":
            name = body.get("metadata", {}).get("name")
        with srv.lock:
            status = self._decide(verb, match, name, body)
            srv.log.append((verb, name, status[0]))
            srv.save()
        self._reply(*status)

    def _decide(self, verb: str, match: re.Match | None, name: str | None, body: dict):
        srv = self.server
        if self.headers.get("Authorization") != f"Bearer {srv.token}":
            return 401, {"kind": "Status", "code": 401, "reason": "Unauthorized"}
        if match is None or (verb == "create") == bool(match.group(2)):
            return 404, {"kind": "Status", "code": 404, "reason": "NotFound"}
        if match.group(1) != srv.namespace or not rbac_allows(
            srv.rules, verb, "secrets", None if verb == "create" else name
        ):
            return 403, {"kind": "Status", "code": 403, "reason": "Forbidden"}
        if verb == "get":
            if name not in srv.secrets:
                return 404, {"kind": "Status", "code": 404, "reason": "NotFound"}
            return 200, srv.secrets[name]
        if verb == "create":
            if name in srv.secrets:
                return 409, {"kind": "Status", "code": 409, "reason": "AlreadyExists"}
            srv.secrets[name] = body
            return 201, body
        if name not in srv.secrets:
            return 404, {"kind": "Status", "code": 404, "reason": "NotFound"}
        if self.headers.get("Content-Type") != "application/merge-patch+json":
            return 415, {"kind": "Status", "code": 415}
        obj = srv.secrets[name]
        for key, value in (body.get("data") or {}).items():
            if value is None:
                obj.setdefault("data", {}).pop(key, None)
            else:
                obj.setdefault("data", {})[key] = value
        return 200, obj

    def do_GET(self) -> None:  # noqa: N802
        self._handle("get")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("create")

    def do_PATCH(self) -> None:  # noqa: N802
        self._handle("patch")


# --------------------------------------------------------------------------- cluster DNS

DNS_A, DNS_SRV, DNS_AAAA = 1, 33, 28


def cluster_dns_records(
    objs: list[dict], pods: list[Pod], domain: str = "cluster.local"
) -> dict[str, list]:
    """Fully qualified name -> records, as cluster DNS publishes them for Services: A
    ``<svc>.<ns>.svc.<domain>`` (the ClusterIP; here the first selected pod's address),
    for headless Services an A record per pod (and ``<hostname>.<svc>...`` for pods of
    the StatefulSet that names the Service), and SRV ``_<port>._<proto>.<svc>...`` for
    each named port: ``[priority, weight, port, target]`` lists. Ready or not: every pod
    runs here, which is what publishNotReadyAddresses gives."""
    records: dict[str, list] = {}
    for svc in objs:
        if svc["kind"] != "Service":
            continue
        ns, name = svc["metadata"]["namespace"], svc["metadata"]["name"]
        fqdn = f"{name}.{ns}.svc.{domain}"
        headless = svc["spec"].get("clusterIP") == "None"
        backends = service_backends(svc, pods)
        if not headless:
            backends = backends[:1]
        for pod in backends:
            records.setdefault(fqdn, []).append(pod.ip)
        for sp in svc["spec"]["ports"]:
            if "name" not in sp:
                continue
            srv = f"_{sp['name']}._{sp.get('protocol', 'TCP').lower()}.{fqdn}"
            for pod in backends:
                target, port = fqdn, sp["port"]
                if headless:
                    port = target_port(pod, sp.get("targetPort", sp["port"]))
                    sts = pod.owner if pod.owner["kind"] == "StatefulSet" else None
                    if sts is not None and sts["spec"].get("serviceName") == name:
                        target = f"{pod.name}.{fqdn}"
                        records.setdefault(target, []).append(pod.ip)
                records.setdefault(srv, []).append([0, 100, port, target])
    return records


def service_backends(svc: dict, pods: list[Pod]) -> list[Pod]:
    """The pods a Service selects (its namespace, its selector)."""
    selector = {"matchLabels": svc["spec"]["selector"]}
    return [
        p for p in pods
        if p.namespace == svc["metadata"]["namespace"] and selector_matches(selector, p.labels)
    ]  # fmt: skip


def service_endpoints(objs: list[dict], pods: list[Pod], name: str, port: int) -> list[tuple]:
    """(pod, container port) behind port ``port`` of Service ``name``: [] when the Service
    has no such port, selects no pod, or its targetPort names no container port."""
    (svc,) = [o for o in objs if o["kind"] == "Service" and o["metadata"]["name"] == name]
    out = []
    for sp in svc["spec"]["ports"]:
        if sp["port"] != port:
            continue
        for pod in service_backends(svc, pods):
            try:
                out.append((pod, target_port(pod, sp.get("targetPort", sp["port"]))))
            except ValueError:
                pass
    return out


def target_port(pod: Pod, target: int | str) -> int:
    """A Service's targetPort on ``pod``: a number, or the container port of that name."""
    if isinstance(target, int):
        return target
    named = [p["containerPort"] for p in pod.container_ports() if p.get("name") == target]
    if not named:
        raise ValueError(f"{pod.name}: no container port named {target}")
    return named[0]


def _dns_name(labels: str) -> bytes:
    out = b""
    for label in labels.strip(".").split("."):
        out += bytes([len(label)]) + label.encode()
    return out + b"\0"


def dns_answer(query: bytes, records: dict[str, list]) -> bytes:
    """The reply to one DNS query (A, AAAA, SRV; authoritative, no recursion): NXDOMAIN
    for an unknown name, an empty answer for a known name without records of that type."""
    qid, flags, qdcount = struct.unpack("!HHH", query[:6])
    pos, labels = 12, []
    while query[pos]:
        labels.append(query[pos + 1 : pos + 1 + query[pos]].decode().lower())
        pos += 1 + query[pos]
    qtype, _qclass = struct.unpack("!HH", query[pos + 1 : pos + 5])
    question = query[12 : pos + 5]
    name = ".".join(labels)
    found = records.get(name)
    answers = []
    for rec in found or []:
        if qtype == DNS_A and isinstance(rec, str):
            rtype, rdata = DNS_A, socket.inet_aton(rec)
        elif qtype == DNS_SRV and isinstance(rec, list):
            rtype, rdata = DNS_SRV, struct.pack("!HHH", *rec[:3]) + _dns_name(rec[3])
        else:
            continue
        answers.append(struct.pack("!HHHIH", 0xC00C, rtype, 1, 5, len(rdata)) + rdata)
    rcode = 3 if found is None else 0
    reply_flags = 0x8000 | 0x0400 | (flags & 0x0100) | rcode  # QR, AA, RD copied
    header = struct.pack("!HHHHHH", qid, reply_flags, 1 if qdcount else 0, len(answers), 0, 0)
    return header + question + b"".join(answers)


class DnsServer(socketserver.ThreadingUDPServer):
    """Cluster DNS for the federation test: ``records`` from :func:`cluster_dns_records`."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], records: dict[str, list]) -> None:
        self.records = records
        super().__init__(address, _DnsHandler)


class _DnsHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data, sock = self.request
        try:
            reply = dns_answer(data, self.server.records)  # type: ignore[attr-defined]
        except (IndexError, struct.error, UnicodeDecodeError):
            return  # not a query we understand: no answer, the client retries elsewhere
        sock.sendto(reply, self.client_address)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="stand-ins for the Kubernetes API and DNS")
    sub = parser.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dns", help="cluster DNS over UDP")
    d.add_argument("--host", required=True)
    d.add_argument("--port", type=int, default=53)
    d.add_argument("--records", required=True, help="JSON file: cluster_dns_records()")
    p = sub.add_parser("apiserver")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, default=443)
    p.add_argument("--token-file", required=True)
    p.add_argument("--namespace", required=True)
    p.add_argument("--rules", required=True, help="JSON file: the RBAC rules of the token")
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--state", required=True, help="JSON file rewritten after every request")
    args = parser.parse_args(argv)
    if args.cmd == "dns":
        dns_server = DnsServer((args.host, args.port), json.loads(Path(args.records).read_text()))
        print(f"cluster DNS on {args.host}:{args.port}", flush=True)
        dns_server.serve_forever()
        return 0
    server = FakeApiServer(
        (args.host, args.port),
        Path(args.token_file).read_text().strip(),
        args.namespace,
        json.loads(Path(args.rules).read_text()),
        Path(args.cert),
        Path(args.key),
        Path(args.state),
    )
    server.save()
    print(f"fake apiserver on {args.host}:{args.port}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
