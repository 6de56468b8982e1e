"""TLS and SuperNode-authentication material for a Flower deployment.

Flower's SuperLink refuses to start without TLS (unless ``--insecure``) and, with
``--enable-supernode-auth``, only admits SuperNodes whose EC public key was registered.
``ensure_certs`` creates all of it with the ``cryptography`` library (no ``openssl`` CLI, so
it works in slim images and on CI) and is idempotent: valid material is reused byte for
byte, so re-running ``fedsd certs`` never invalidates keys that were already registered or
certificates already mounted into containers.

Layout under ``out``::

    ca.crt, ca.key                 self-signed CA (trust anchor for SuperNodes, CLI, SuperExec)
    superlink.crt, superlink.key   SuperLink server certificate signed by the CA
    nodes/node-<i>, node-<i>.pub   SuperNode auth keys (EC SECP384R1, OpenSSH format)
    superexec-auth.secret          the secret the SuperLink and the ServerApp SuperExec share
                                   (``--superexec-auth-secret-file``): only a SuperExec
                                   holding it may take a run's ServerApp task

Only this module's standard-library and ``cryptography`` imports are needed (no torch).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedsd.common.atomic import write_file

__all__ = [
    "DEFAULT_DNS_NAMES",
    "DEFAULT_IP_ADDRESSES",
    "CertMaterial",
    "NodeKey",
    "ca_is_valid",
    "ensure_certs",
    "ensure_node_keys",
    "ensure_superexec_secret",
    "generate_node_key",
    "server_cert_covers",
    "server_sans",
]

# Names every SuperLink certificate carries: loopback for local runs and the service names
# used by the compose file / Kubernetes manifests.
DEFAULT_DNS_NAMES: tuple[str, ...] = ("localhost", "superlink", "fedsd-superlink")
DEFAULT_IP_ADDRESSES: tuple[str, ...] = ("127.0.0.1", "::1")

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "superlink.crt"
SERVER_KEY = "superlink.key"
NODES_DIR = "nodes"
SUPEREXEC_SECRET = "superexec-auth.secret"

CA_DAYS = 3650
SERVER_DAYS = 825
# Material that expires within this margin is treated as expired and renewed.
RENEW_MARGIN = dt.timedelta(days=30)

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True)
class NodeKey:
    """A SuperNode's auth key pair (the public one is what ``flwr supernode register`` takes)."""

    private_key: Path
    public_key: Path


@dataclass(frozen=True)
class CertMaterial:
    """Paths of everything ``ensure_certs`` manages."""

    out: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    node_keys: tuple[NodeKey, ...]
    superexec_secret: Path


# --------------------------------------------------------------------------- public API


def ensure_certs(
    out: str | os.PathLike[str],
    hosts: Iterable[str] | None = (),
    nodes: int = 2,
    *,
    key_type: str = "ec",
    ca_days: int = CA_DAYS,
    server_days: int = SERVER_DAYS,
) -> CertMaterial:
    """Create (or reuse) the CA, the SuperLink certificate and ``nodes`` SuperNode keys.

    Idempotent: valid existing files are left untouched. The CA is renewed only when it is
    unreadable, expired or does not match its key (which also renews the server
    certificate); the server certificate is renewed when it does not cover the requested
    SANs, is (nearly) expired or was not issued by the CA. Node keys are only ever added.
    """
    if nodes < 0:
        raise ValueError(f"nodes must be >= 0, got {nodes}")
    if key_type not in ("ec", "rsa"):
        raise ValueError(f"key_type must be 'ec' or 'rsa', got {key_type!r}")
    hosts = tuple(hosts or ())
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    ca_cert_path, ca_key_path = root / CA_CERT, root / CA_KEY
    srv_cert_path, srv_key_path = root / SERVER_CERT, root / SERVER_KEY

    ca_renewed = False
    if not ca_is_valid(ca_cert_path, ca_key_path):
        ca_key = _new_private_key(key_type)
        ca_cert = _make_ca(ca_key, days=ca_days)
        _write_private(ca_key_path, _pem_private(ca_key))
        _write_public(ca_cert_path, ca_cert.public_bytes(serialization.Encoding.PEM))
        ca_renewed = True

    if ca_renewed or not _server_is_valid(srv_cert_path, srv_key_path, ca_cert_path, hosts):
        ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
        ca_key = _load_private(ca_key_path)
        assert ca_key is not None  # just validated or written
        srv_key = _new_private_key(key_type)
        srv_cert = _make_server_cert(srv_key, ca_cert, ca_key, hosts, days=server_days)
        _write_private(srv_key_path, _pem_private(srv_key))
        _write_public(srv_cert_path, srv_cert.public_bytes(serialization.Encoding.PEM))

    return CertMaterial(
        out=root,
        ca_cert=ca_cert_path,
        ca_key=ca_key_path,
        server_cert=srv_cert_path,
        server_key=srv_key_path,
        node_keys=ensure_node_keys(root / NODES_DIR, nodes),
        superexec_secret=ensure_superexec_secret(root / SUPEREXEC_SECRET),
    )


def ensure_superexec_secret(path: str | os.PathLike[str]) -> Path:
    """Create the SuperExec authentication secret at ``path`` unless it holds one: 32
    random bytes as 64 hex characters, mode 0600. Flower reads the file's exact bytes; the SuperLink
    and every SuperExec that may take its ServerApp tasks must be given the same file."""
    path = Path(path)
    try:
        current = path.read_bytes()
    except FileNotFoundError:
        current = b""
    if not current.strip():  # missing or empty (Flower refuses an empty one): a new one
        _write_private(path, secrets.token_hex(32).encode())
    return path


def ensure_node_keys(node_dir: str | os.PathLike[str], nodes: int) -> tuple[NodeKey, ...]:
    """Create (or reuse) ``node_dir/node-<i>`` and ``node-<i>.pub`` for i < ``nodes``.

    A valid private key is kept (its registration stays valid) and a missing or mismatching
    public half is restored from it; anything else is replaced by a new pair.
    """
    if nodes < 0:
        raise ValueError(f"nodes must be >= 0, got {nodes}")
    node_dir = Path(node_dir)
    keys = []
    for i in range(nodes):
        key = NodeKey(node_dir / f"node-{i}", node_dir / f"node-{i}.pub")
        _ensure_node_key(key)
        keys.append(key)
    return tuple(keys)


def server_sans(hosts: Iterable[str] = ()) -> list[x509.GeneralName]:
    """The SANs a SuperLink certificate must carry: the defaults plus ``hosts``.

    A host that parses as an IP address becomes an IP SAN (clients match IPs only against
    IP SANs), anything else a DNS SAN.
    """
    names: list[x509.GeneralName] = []
    seen: set[x509.GeneralName] = set()
    for host in (*DEFAULT_DNS_NAMES, *DEFAULT_IP_ADDRESSES, *hosts):
        name = _general_name(host)
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def server_cert_covers(
    cert: str | os.PathLike[str] | x509.Certificate,
    hosts: Iterable[str] = (),
    *,
    include_defaults: bool = True,
    margin: dt.timedelta = RENEW_MARGIN,
    now: dt.datetime | None = None,
) -> bool:
    """Whether the certificate lists every wanted SAN and is valid for at least ``margin``.

    With ``include_defaults`` the wanted SANs are ``server_sans(hosts)``, else only ``hosts``.
    """
    try:
        if not isinstance(cert, x509.Certificate):
            cert = x509.load_pem_x509_certificate(Path(cert).read_bytes())
        present = set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except (OSError, ValueError, x509.ExtensionNotFound):
        return False
    wanted = server_sans(hosts) if include_defaults else [_general_name(h) for h in hosts]
    if not set(wanted) <= present:
        return False
    return _time_valid(cert, margin=margin, now=now)


def ca_is_valid(
    ca_cert: str | os.PathLike[str],
    ca_key: str | os.PathLike[str],
    *,
    margin: dt.timedelta = RENEW_MARGIN,
) -> bool:
    """Whether the CA files exist, match each other, are a CA and will not expire soon."""
    try:
        cert = x509.load_pem_x509_certificate(Path(ca_cert).read_bytes())
    except (OSError, ValueError):
        return False
    key = _load_private(Path(ca_key))
    if key is None or not _same_public_key(cert.public_key(), key):
        return False
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    return bc.ca and _time_valid(cert, margin=margin)


def generate_node_key(
    private_key: str | os.PathLike[str], public_key: str | os.PathLike[str]
) -> None:
    """Write a new SuperNode auth key pair: EC SECP384R1, both halves in OpenSSH format.

    ``flower-supernode --auth-supernode-private-key`` loads the private half with
    ``load_ssh_private_key``; ``flwr supernode register`` wants the ``.pub`` half.
    """
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(
        Path(private_key),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    _write_public(Path(public_key), _ssh_public(key))


# --------------------------------------------------------------------------- internals


def _general_name(host: str) -> x509.GeneralName:
    host = host.strip()
    if not host:
        raise ValueError("empty host name")
    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return x509.DNSName(host.lower())


def _time_valid(
    cert: x509.Certificate, *, margin: dt.timedelta, now: dt.datetime | None = None
) -> bool:
    now = now or dt.datetime.now(dt.UTC)
    return cert.not_valid_before_utc <= now and cert.not_valid_after_utc - margin > now


def _new_private_key(key_type: str) -> PrivateKey:
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    return ec.generate_private_key(ec.SECP384R1())


def _pem_private(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _ssh_public(key: ec.EllipticCurvePrivateKey) -> bytes:
    return (
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + b"\n"
    )


def _load_private(path: Path) -> PrivateKey | None:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        return key
    return None


def _same_public_key(a: object, b: PrivateKey) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        return a.public_bytes(*fmt) == b.public_key().public_bytes(*fmt)  # type: ignore[attr-defined]
    except (AttributeError, ValueError):
        return False


def _hash_for(key: PrivateKey) -> hashes.HashAlgorithm:
    return hashes.SHA384() if isinstance(key, ec.EllipticCurvePrivateKey) else hashes.SHA256()


def _validity(days: int) -> tuple[dt.datetime, dt.datetime]:
    # Back-date a little so a peer with a slightly slow clock accepts a fresh certificate.
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    return now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)


def _make_ca(key: PrivateKey, *, days: int) -> x509.Certificate:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedsd"),
            x509.NameAttribute(NameOID.COMMON_NAME, "fedsd deployment CA"),
        ]
    )
    not_before, not_after = _validity(days)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), False)
        .sign(key, _hash_for(key))
    )


def _make_server_cert(
    key: PrivateKey,
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    hosts: Sequence[str],
    *,
    days: int,
) -> x509.Certificate:
    not_before, not_after = _validity(days)
    # A server certificate must not outlive its issuer.
    not_after = min(not_after, ca_cert.not_valid_after_utc)
    is_rsa = isinstance(key, rsa.RSAPrivateKey)
    return (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedsd"),
                    x509.NameAttribute(NameOID.COMMON_NAME, "fedsd-superlink"),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(server_sans(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=is_rsa,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, _hash_for(ca_key))
    )


def _server_is_valid(cert_path: Path, key_path: Path, ca_path: Path, hosts: Sequence[str]) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
    except (OSError, ValueError):
        return False
    key = _load_private(key_path)
    if key is None or not _same_public_key(cert.public_key(), key):
        return False
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return server_cert_covers(cert, hosts)


def _ensure_node_key(key: NodeKey) -> None:
    key.private_key.parent.mkdir(parents=True, exist_ok=True)
    try:
        private = serialization.load_ssh_private_key(key.private_key.read_bytes(), password=None)
    except (OSError, ValueError, UnsupportedAlgorithm):
        private = None
    if not isinstance(private, ec.EllipticCurvePrivateKey) or not isinstance(
        private.curve, ec.SECP384R1
    ):
        generate_node_key(key.private_key, key.public_key)
        return
    # Private half is fine: restore a missing or mismatching public half from it (keeping
    # the private key keeps any registration made with the old public key valid).
    expected = _ssh_public(private)
    try:
        current = key.public_key.read_bytes()
    except OSError:
        current = b""
    if current.split()[:2] != expected.split()[:2]:
        _write_public(key.public_key, expected)


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret so that it is never readable by others, not even for an instant."""
    _write_atomic(path, data, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    _write_atomic(path, data, 0o644)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(path, data, mode=mode)
