"""The certs Job of the Kubernetes manifests (k8s/10-certs.yaml): create fedsd's Secrets
when they are missing, through the Kubernetes API with the pod's ServiceAccount token.

    python -m fedsd.deploy.containers.k8s_certs   (serverapp image: ``entrypoint.sh k8s-certs``)

Secrets (namespace of the pod):

    fedsd-tls           kubernetes.io/tls: tls.crt, tls.key (the SuperLink certificate,
                        fedsd.deploy.certs) and ca.crt: mounted by the SuperLink and the fleet proxy
    fedsd-ca            ca.crt: the ServerApp SuperExec, the launcher, the SuperNodes
    fedsd-node-keys     node-<i>: SuperNode i's authentication key (OpenSSH, EC P-384)
    fedsd-node-pubkeys  node-<i>.pub: what the launcher registers with the SuperLink
    fedsd-superexec-auth
                        superexec-auth: the secret the SuperLink and the ServerApp
                        SuperExec share (--superexec-auth-secret-file), mounted by those
                        two pods only

Idempotent, like ``fedsd certs``: existing material is kept byte for byte (the SuperExec
secret too), missing node keys are added when FEDSD_NUM_NODES grows (nothing is removed),
fedsd-ca follows the ca.crt of fedsd-tls. The CA's private key exists only in this pod's
memory-backed /tmp and is discarded: to reissue the certificate, delete fedsd-tls (and
the Job) and apply again (node keys are unaffected). With FEDSD_MANAGE_TLS=0 another
issuer (e.g. cert-manager) owns fedsd-tls: the Job waits for it and only copies its ca.crt.

Settings (environment; defaults in brackets): FEDSD_NUM_NODES [2], FEDSD_CERT_HOSTS
(extra SuperLink certificate names, space-separated) [], FEDSD_MANAGE_TLS [1],
FEDSD_TLS_WAIT (seconds to wait for an external fedsd-tls) [600];
KUBERNETES_SERVICE_HOST/PORT and the ServiceAccount files as the kubelet provides them.
Needs only: create Secrets, get/patch these five (k8s/02-rbac.yaml). Standard library and
fedsd.deploy.certs (cryptography) only.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from fedsd.common.health import poll_until
from fedsd.deploy.certs import (
    ensure_certs,
    ensure_node_keys,
    ensure_superexec_secret,
    server_cert_covers,
)

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
TLS_POLL_SECONDS = 5.0  # FEDSD_MANAGE_TLS=0: how often to look for the issued Secret
TLS, CA, NODE_KEYS, NODE_PUBKEYS = "fedsd-tls", "fedsd-ca", "fedsd-node-keys", "fedsd-node-pubkeys"
SUPEREXEC, SUPEREXEC_KEY = "fedsd-superexec-auth", "superexec-auth"
LABELS = {
    "app.kubernetes.io/name": "fedsd",
    "app.kubernetes.io/instance": "fedsd",
    "app.kubernetes.io/part-of": "fedsd",
    "app.kubernetes.io/managed-by": "fedsd-certs",
}


def log(message: str) -> None:
    print(f"fedsd k8s-certs: {message}", flush=True)


class ApiError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class SecretsApi:
    """The few calls on core/v1 Secrets that the Job needs."""

    def __init__(self, base: str, token: str, namespace: str, ca: str | None) -> None:
        self.base = base.rstrip("/")
        self.token = token
        self.namespace = namespace
        self.ctx = ssl.create_default_context(cafile=ca)

    @classmethod
    def in_cluster(cls, sa_dir: Path | None = None) -> SecretsApi:
        sa_dir = sa_dir or SA_DIR
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise ApiError(0, "KUBERNETES_SERVICE_HOST is not set: not running in a pod?")
        if ":" in host:
            host = f"[{host}]"
        token = (sa_dir / "token").read_text().strip()
        namespace = (sa_dir / "namespace").read_text().strip()
        return cls(f"https://{host}:{port}", token, namespace, str(sa_dir / "ca.crt"))

    def _call(self, method: str, path: str, body: dict | None = None, ctype: str = "") -> dict:
        url = f"{self.base}/api/v1/namespaces/{self.namespace}/secrets{path}"
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = ctype or "application/json"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, context=self.ctx, timeout=30) as resp:  # noqa: S310
                return json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            raise ApiError(exc.code, f"{method} {url}: {detail}") from None

    def get(self, name: str) -> dict[str, bytes] | None:
        """The Secret's data (decoded), or None when it does not exist."""
        try:
            obj = self._call("GET", f"/{name}")
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise
        return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}

    def create(self, name: str, data: dict[str, bytes], kind: str = "Opaque") -> None:
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name, "namespace": self.namespace, "labels": LABELS},
            "type": kind,
            "data": _encode(data),
        }
        self._call("POST", "", body)

    def patch(self, name: str, data: dict[str, bytes]) -> None:
        self._call("PATCH", f"/{name}", {"data": _encode(data)}, "application/merge-patch+json")


def _encode(data: dict[str, bytes]) -> dict[str, str]:
    return {k: base64.b64encode(v).decode() for k, v in data.items()}


def ensure_secret(
    api: SecretsApi, name: str, wanted: dict[str, bytes], kind: str = "Opaque"
) -> None:
    """Create ``name`` with ``wanted`` or patch the keys whose value differs; say which."""
    current = api.get(name)
    if current is None:
        try:
            api.create(name, wanted, kind)
            log(f"created Secret {name} ({', '.join(sorted(wanted))})")
            return
        except ApiError as exc:
            if exc.status != 409:  # 409: created meanwhile (another run of the Job)
                raise
            current = api.get(name) or {}
    changed = {k: v for k, v in wanted.items() if current.get(k) != v}
    if changed:
        api.patch(name, changed)
        log(f"updated Secret {name} ({', '.join(sorted(changed))})")
    else:
        log(f"Secret {name} is up to date")


def ensure_tls(api: SecretsApi, work: Path, hosts: list[str], manage: bool) -> bytes:
    """fedsd-tls: created with a new CA when missing; returns its ca.crt."""
    wait = float(os.environ.get("FEDSD_TLS_WAIT", "600"))
    tls = api.get(TLS)
    if tls is None and not manage:
        log(f"FEDSD_MANAGE_TLS=0: waiting for Secret {TLS} (cert-manager?)")
        tls = poll_until(lambda: api.get(TLS), wait, TLS_POLL_SECONDS)
        if tls is None:
            raise ApiError(0, f"Secret {TLS} did not appear within {wait:.0f}s")
    if tls is None:
        material = ensure_certs(work / "tls", hosts=hosts, nodes=0)
        data = {
            "tls.crt": material.server_cert.read_bytes(),
            "tls.key": material.server_key.read_bytes(),
            "ca.crt": material.ca_cert.read_bytes(),
        }
        try:
            api.create(TLS, data, "kubernetes.io/tls")
            log(f"created Secret {TLS} (new CA; its key is not kept)")
            return data["ca.crt"]
        except ApiError as exc:
            if exc.status != 409:
                raise
            tls = api.get(TLS) or {}
    if "ca.crt" not in tls:
        raise ApiError(0, f"Secret {TLS} has no ca.crt (an issuer must provide it)")
    if not server_cert_covers_pem(tls.get("tls.crt", b""), work, hosts):
        log(
            f"warning: Secret {TLS} exists but its certificate does not cover "
            f"{' '.join(hosts) or 'the default names'} or expires within 30 days; delete the "
            f"Secret and run the Job again to reissue it"
        )
    else:
        log(f"Secret {TLS} exists and covers the names")
    return tls["ca.crt"]


def server_cert_covers_pem(pem: bytes, work: Path, hosts: list[str]) -> bool:
    path = work / "existing.crt"
    path.write_bytes(pem)
    return server_cert_covers(path, hosts)


def ensure_node_secrets(api: SecretsApi, work: Path, nodes: int) -> None:
    node_dir = work / "nodes"
    node_dir.mkdir(parents=True, exist_ok=True)
    existing = api.get(NODE_KEYS) or {}
    for name, value in existing.items():
        if name.startswith("node-") and "/" not in name:
            fd = os.open(node_dir / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(value)
    keys = ensure_node_keys(node_dir, nodes)
    ensure_secret(api, NODE_KEYS, {k.private_key.name: k.private_key.read_bytes() for k in keys})
    ensure_secret(api, NODE_PUBKEYS, {k.public_key.name: k.public_key.read_bytes() for k in keys})


def ensure_superexec_secret_k8s(api: SecretsApi, work: Path) -> None:
    """fedsd-superexec-auth: a new secret when missing or empty, else kept as it is."""
    path = work / SUPEREXEC_KEY
    current = (api.get(SUPEREXEC) or {}).get(SUPEREXEC_KEY, b"")
    if current:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(current)
    ensure_superexec_secret(path)
    ensure_secret(api, SUPEREXEC, {SUPEREXEC_KEY: path.read_bytes()})


def main() -> int:
    env = os.environ
    nodes = int(env.get("FEDSD_NUM_NODES", "2"))
    hosts = env.get("FEDSD_CERT_HOSTS", "").split()
    manage = env.get("FEDSD_MANAGE_TLS", "1") != "0"
    try:
        api = SecretsApi.in_cluster()
        with tempfile.TemporaryDirectory(prefix="fedsd-certs-") as tmp:
            work = Path(tmp)
            ca = ensure_tls(api, work, hosts, manage)
            ensure_secret(api, CA, {"ca.crt": ca})
            ensure_node_secrets(api, work, nodes)
            ensure_superexec_secret_k8s(api, work)
    except (ApiError, OSError, ValueError) as exc:
        log(f"error: {exc}")
        return 1
    log(
        f"done: {TLS}, {CA}, {NODE_KEYS} and {NODE_PUBKEYS} hold material for {nodes} "
        f"node(s); {SUPEREXEC} holds the SuperExec secret"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
