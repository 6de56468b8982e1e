"""Certificates and the local deployment runner, against real Flower processes on 127.0.0.1.

The process tests start a real TLS SuperLink with SuperNode authentication; the end-to-end
ones run the trivial ``tests/fixtures/bare_app`` Flower app (no torch, nothing downloaded)
through ``fedsd.deploy.up.run_local``. Ports are picked by the OS, so tests can run in parallel.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from fedsd.common.errors import ConfigError, DeployError, OutInUse, ShardsError
from fedsd.deploy.certs import (
    DEFAULT_DNS_NAMES,
    DEFAULT_IP_ADDRESSES,
    ca_is_valid,
    ensure_certs,
    server_cert_covers,
)
from fedsd.deploy.local import LocalDeployment
from fedsd.deploy.out_lock import LOCK_NAME, hold_out_lock
from fedsd.deploy.pinning import REFUSAL_MARK, fab_hash_of
from fedsd.deploy.run_config import (
    build_run_config,
    check_shards,
    find_app_dir,
    format_config_pairs,
    parse_run_config,
)
from fedsd.deploy.up import run_local
from fedsd.observability.scrape import MetricsPorts
from fedsd.privacy.node_policy import POLICY_KEYS
from tests.conftest import changed_app_copy, free_port_block, synthetic_shards

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- helpers


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _sans(cert_path: Path) -> set[x509.GeneralName]:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)


def _verify(material, name: x509.GeneralName) -> None:
    ca = x509.load_pem_x509_certificate(material.ca_cert.read_bytes())
    leaf = x509.load_pem_x509_certificate(material.server_cert.read_bytes())
    verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(name)
    verifier.verify(leaf, [])


def _leftovers(marker: Path) -> list[str]:
    """Live (non-zombie) processes whose environment mentions ``marker`` (our work dir).

    Every process the runner starts, and everything those start (SuperExec, ServerApp,
    ClientApp), inherits FLWR_HOME under the work dir, so this finds grandchildren too.
    """
    needle = str(marker).encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                state = fh.read().rsplit(b")", 1)[1].split()[0]
            if state == b"Z":
                continue
            with open(f"/proc/{entry}/environ", "rb") as fh:
                if needle not in fh.read():
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read().replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{entry}: {cmdline}")
        except (OSError, IndexError):
            continue
    return found


def _wait_no_leftovers(marker: Path, timeout: float = 15.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while (left := _leftovers(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def _wait_exit(proc: subprocess.Popen, timeout: float) -> int | None:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


needs_proc = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")


# --------------------------------------------------------------------------- certificates


def test_certs_sans_chain_and_usages(tmp_path):
    material = ensure_certs(tmp_path / "certs", hosts=["superlink.example.org", "10.1.2.3"])

    sans = _sans(material.server_cert)
    for dns in (*DEFAULT_DNS_NAMES, "superlink.example.org"):
        assert x509.DNSName(dns) in sans
    for ip in (*DEFAULT_IP_ADDRESSES, "10.1.2.3"):
        assert x509.IPAddress(ipaddress.ip_address(ip)) in sans
    assert x509.DNSName("10.1.2.3") not in sans  # an IP host must be an IP SAN

    # The CA verifies the server certificate for every name clients use.
    _verify(material, x509.DNSName("localhost"))
    _verify(material, x509.DNSName("superlink.example.org"))
    _verify(material, x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    with pytest.raises(VerificationError):
        _verify(material, x509.DNSName("not-in-the-cert.example.org"))

    ca = x509.load_pem_x509_certificate(material.ca_cert.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    leaf = x509.load_pem_x509_certificate(material.server_cert.read_bytes())
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert server_cert_covers(material.server_cert, ["superlink.example.org", "10.1.2.3"])
    assert not server_cert_covers(material.server_cert, ["other.example.org"])
    assert not server_cert_covers(
        material.server_cert, now=dt.datetime.now(dt.UTC) + dt.timedelta(days=3650)
    )
    assert ca_is_valid(material.ca_cert, material.ca_key)


def test_certs_keys_are_private_and_node_keys_are_openssh_p384(tmp_path):
    material = ensure_certs(tmp_path / "certs", nodes=3)
    secrets = [material.ca_key, material.server_key, *(k.private_key for k in material.node_keys)]
    for path in [*secrets, material.superexec_secret]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    # The SuperExec secret: 32 random bytes in hex, its own per deployment.
    secret = material.superexec_secret.read_bytes()
    assert re.fullmatch(rb"[0-9a-f]{64}", secret), secret
    assert ensure_certs(tmp_path / "other", nodes=0).superexec_secret.read_bytes() != secret
    material.superexec_secret.write_bytes(b"")  # an empty one (Flower refuses it) is renewed
    assert re.fullmatch(
        rb"[0-9a-f]{64}", ensure_certs(tmp_path / "certs").superexec_secret.read_bytes()
    )
    assert [k.private_key.name for k in material.node_keys] == ["node-0", "node-1", "node-2"]
    for key in material.node_keys:
        private = serialization.load_ssh_private_key(key.private_key.read_bytes(), None)
        public = serialization.load_ssh_public_key(key.public_key.read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert isinstance(private.curve, ec.SECP384R1)
        assert key.private_key.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
        assert key.public_key.read_text().startswith("ecdsa-sha2-nistp384 ")
        assert public.public_numbers() == private.public_key().public_numbers()


def test_certs_idempotent_and_incremental(tmp_path):
    out = tmp_path / "certs"
    ensure_certs(out, hosts=["a.example.org"], nodes=2)
    first = _snapshot(out)

    ensure_certs(out, hosts=["a.example.org"], nodes=2)
    assert _snapshot(out) == first  # nothing rewritten

    ensure_certs(out, hosts=["a.example.org"], nodes=4)  # more nodes: keys added only
    grown = _snapshot(out)
    assert {k: v for k, v in grown.items() if k in first} == first
    assert {"nodes/node-2", "nodes/node-2.pub", "nodes/node-3", "nodes/node-3.pub"} <= set(grown)

    material = ensure_certs(out, hosts=["a.example.org", "b.example.org"], nodes=4)
    after = _snapshot(out)
    changed = {k for k in after if after[k] != grown[k]}
    assert changed == {"superlink.crt", "superlink.key"}  # CA and node keys kept
    assert x509.DNSName("b.example.org") in _sans(material.server_cert)
    _verify(material, x509.DNSName("b.example.org"))

    # A damaged public node key is restored from its private half (registrations stay valid).
    material.node_keys[0].public_key.unlink()
    ensure_certs(out, hosts=["a.example.org", "b.example.org"], nodes=4)
    assert _snapshot(out) == after


def test_certs_new_ca_reissues_server_cert(tmp_path):
    out = tmp_path / "certs"
    ensure_certs(out, nodes=1)
    before = _snapshot(out)
    (out / "ca.key").write_bytes(b"garbage")
    material = ensure_certs(out, nodes=1)
    after = _snapshot(out)
    assert after["ca.crt"] != before["ca.crt"]
    assert after["superlink.crt"] != before["superlink.crt"]
    assert after["nodes/node-0"] == before["nodes/node-0"]
    _verify(material, x509.DNSName("localhost"))


# --------------------------------------------------------------------------- run config


def test_parse_run_config_matches_flower_toml_semantics():
    parsed = parse_run_config(
        ["num-server-rounds=3 lora-variant='ffa' learning-rate=5e-5", 'out-dir="/a b/c" x=true']
    )
    assert parsed == {
        "num-server-rounds": 3,
        "lora-variant": "ffa",
        "learning-rate": 5e-5,
        "out-dir": "/a b/c",
        "x": True,
    }
    assert parse_run_config(format_config_pairs(parsed)) == parsed
    with pytest.raises(ConfigError):
        parse_run_config("lora-variant=ffa")  # bare words are not TOML values
    with pytest.raises(ConfigError):
        parse_run_config("no-equals-sign")


def test_build_run_config_maps_cli_options_and_validates(tmp_path):
    app = find_app_dir()
    assert (app / "pyproject.toml").is_file()
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    overrides, effective = build_run_config(
        app, "lora-rank=4", rounds=2, model=str(model_dir), out=tmp_path / "out"
    )
    assert overrides == {
        "lora-rank": 4,
        "num-server-rounds": 2,
        "model": str(model_dir.resolve()),
        "out-dir": str((tmp_path / "out").resolve()),
    }
    assert effective["batch-size"] == 4  # defaults from [tool.flwr.app.config]
    hub, _ = build_run_config(app, model="segmind/tiny-sd")
    assert hub["model"] == "segmind/tiny-sd"  # not a directory: left as a hub id

    with pytest.raises(ConfigError, match="lora-rank"):
        build_run_config(app, {"lora-rank": 0})
    with pytest.raises(ConfigError, match="num-server-rounds"):
        build_run_config(app, rounds=0)
    with pytest.raises(ConfigError, match="no-such-key"):
        build_run_config(app, "no-such-key=1")


def test_check_shards_names_missing_shard(tmp_path):
    for i in (0, 2):
        (tmp_path / f"shard-{i}" / "train").mkdir(parents=True)
        (tmp_path / f"shard-{i}" / "train" / "metadata.jsonl").write_text("")
    assert check_shards(tmp_path, 1) == tmp_path.resolve()
    with pytest.raises(ShardsError, match=r"shard-1.*fedsd shards --num-shards 3"):
        check_shards(tmp_path, 3)
    with pytest.raises(ShardsError, match="does not exist"):
        check_shards(tmp_path / "nope", 1)


def test_invalid_config_fails_before_any_process(tmp_path, bare_app_dir):
    with pytest.raises(ConfigError, match="num-server-rounds"):
        run_local(1, None, tmp_path / "out", "num-server-rounds=0", app_dir=bare_app_dir)
    with pytest.raises(ShardsError):
        run_local(2, tmp_path / "missing", tmp_path / "out", app_dir=bare_app_dir)
    assert not (tmp_path / "out").exists()


def test_cli_up_errors(tmp_path, capsys):
    from fedsd.cli import main

    assert main(["up", "--nodes", "2", "--out", str(tmp_path / "o")]) == 2
    assert "--local" in capsys.readouterr().err
    code = main(
        ["up", "--local", "--shards", str(tmp_path / "shards"), "--out", str(tmp_path / "o")]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "shard" in err and "fedsd shards" in err
    (tmp_path / "shards" / "shard-0" / "train").mkdir(parents=True)
    (tmp_path / "shards" / "shard-0" / "train" / "metadata.jsonl").write_text("")
    code = main(
        [
            "up",
            "--local",
            "--nodes",
            "1",
            "--shards",
            str(tmp_path / "shards"),
            "--out",
            str(tmp_path / "o"),
            "--run-config",
            "lora-rank=0",
        ]
    )
    assert code == 2
    assert "lora-rank" in capsys.readouterr().err
    assert not (tmp_path / "o" / ".deploy").exists()


# --------------------------------------------------------------------------- real SuperLink


@pytest.fixture(scope="module")
def superlink(tmp_path_factory):
    """A running TLS SuperLink with SuperNode auth; node-0 and node-2 are registered."""
    work = tmp_path_factory.mktemp("superlink")
    dep = LocalDeployment(work, nodes=3, stream=lambda _line: None, startup_timeout=60)
    try:
        dep.ensure_certs()
        dep.start_superlink()
        dep.write_connection()
        keys = dep.certs.node_keys
        outcome = dep.register_nodes([keys[0], keys[2]])
        assert set(outcome.values()) == {"registered"}
        yield dep
    finally:
        dep.stop()


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_registered_node_connects_and_reregistration_is_harmless(superlink):
    dep = superlink
    # Registering an already registered key (a re-run on the same state.db) is not an error.
    assert dep.control.register_node(dep.certs.node_keys[0].public_key) == "already registered"
    assert dep.control.run_status("987654321") == (None, None)  # a run the SuperLink never had
    svc = dep.start_supernode(0, name="supernode-good", extra_args=["--max-retries", "3"])
    try:
        ids = dep.wait_nodes_online(timeout=60)
        assert set(ids) == {"supernode-good"}
        online = [n for n in dep.control.list_nodes() if n["status"] == "online"]
        assert [n["node-id"] for n in online] == [ids["supernode-good"]]
    finally:
        svc.stop(grace=5)
        dep.services.pop(svc.name)


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_unregistered_node_is_refused(superlink):
    dep = superlink
    svc = dep.start_supernode(
        1,  # node-1's key exists but was never registered
        name="intruder",
        extra_args=["--max-retries", "2", "--max-wait-time", "20"],
    )
    try:
        code = _wait_exit(svc.process, timeout=90)
        assert code not in (None, 0), "an unregistered SuperNode must not stay connected"
        log = svc.log_since_start()
        assert "Failed to activate SuperNode" in log
        assert "SuperNode ID:" not in log
        superlink_log = dep.services["superlink"].log_since_start()
        assert "No SuperNode found with the given public key" in superlink_log
    finally:
        svc.stop(grace=5)
        dep.services.pop(svc.name)


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_node_with_wrong_ca_cannot_connect(superlink, tmp_path):
    dep = superlink
    other = ensure_certs(tmp_path / "other-ca", nodes=0)  # an unrelated CA
    svc = dep.start_supernode(
        2,  # a registered key: the refusal must come from TLS, not from node auth
        root_certificates=other.ca_cert,
        name="wrong-ca",
        extra_args=["--max-retries", "2", "--max-wait-time", "20"],
    )
    try:
        code = _wait_exit(svc.process, timeout=90)
        assert code not in (None, 0)
        log = svc.log_since_start()
        assert "CERTIFICATE_VERIFY_FAILED" in log
        assert "SuperNode ID:" not in log
    finally:
        svc.stop(grace=5)
        dep.services.pop(svc.name)


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_superexec_without_the_secret_is_refused_the_run(superlink, bare_app_dir):
    """The SuperLink holds the SuperExec secret (--superexec-auth-secret-file): a SuperExec
    that reaches the Runtime API without it is refused the run's ServerApp task (HTTP 401)
    and launches nothing; the run stays pending until the deployment's own SuperExec, which
    holds the secret, takes it."""
    from fedsd.deploy.control import CONNECTION
    from fedsd.deploy.processes import executable

    dep = superlink
    rogue_argv = [executable("flower-superexec"), "--runtime-api-address", dep.address]
    rogue_argv += ["--root-certificates", str(dep.certs.ca_cert)]
    res = dep.flwr(
        "run", str(bare_app_dir), CONNECTION, "--run-config", "num-server-rounds=1", timeout=90
    )
    m = re.search(r"Successfully started run (\d+)", res.stdout)
    assert m, res.stdout + res.stderr
    run_id = m.group(1)
    rogue = dep._start("rogue-superexec", rogue_argv)
    try:
        code = _wait_exit(rogue.process, timeout=60)
        log = dep.services["superlink"].log_since_start()
        assert "SuperExec authentication failed" in log, log[-3000:]
        assert "flwr-serverapp" not in rogue.log_since_start()
        assert code is not None, rogue.log_since_start()  # it gave up, launching nothing
        assert dep.run_status(run_id)[0] == "pending"
        exe = dep.start_superexec()
        deadline = time.monotonic() + 90
        while (status := dep.run_status(run_id)[0]) == "pending":
            assert time.monotonic() < deadline, exe.log_since_start()
            time.sleep(1.0)
        assert status in ("starting", "running", "finished:completed"), status
    finally:
        dep.control.stop_run(run_id, check=True)
        for name in ("rogue-superexec", "superexec"):
            svc = dep.services.pop(name, None)
            if svc is not None:
                svc.stop(grace=5)


def test_superlink_health_rejects_unknown_ca(superlink, tmp_path):
    import ssl
    import urllib.request

    other = ensure_certs(tmp_path / "other-ca", nodes=0)
    ctx = ssl.create_default_context(cafile=str(other.ca_cert))
    with pytest.raises(OSError, match="CERTIFICATE_VERIFY_FAILED"):
        urllib.request.urlopen(f"https://{superlink.address}/health", context=ctx, timeout=10)
    ok = ssl.create_default_context(cafile=str(superlink.certs.ca_cert))
    with urllib.request.urlopen(f"https://{superlink.address}/health", context=ok, timeout=10) as r:
        assert r.status == 200


# --------------------------------------------------------------------------- full runs


@pytest.mark.e2e
@needs_proc
@pytest.mark.timeout(240)
def test_run_local_bare_app_two_nodes(tmp_path, bare_app_dir):
    lines: list[str] = []
    work = tmp_path / "work"
    start = time.monotonic()
    code = run_local(
        2,
        None,
        tmp_path / "out",
        {"num-server-rounds": 2},
        app_dir=bare_app_dir,
        work_dir=work,
        stream=lines.append,
        timeout=180,
    )
    elapsed = time.monotonic() - start
    text = "\n".join(lines)
    assert code == 0, text
    assert "fedsd round 1/2: 2 replies, partitions=[0, 1]" in text  # node-config reached apps
    assert "fedsd round 2/2: 2 replies" in text
    assert "finished:completed" in text
    assert _wait_no_leftovers(work) == []
    # The connection the runner wrote, and the services it logged.
    config = (work / "flwr-home" / "config.toml").read_text()
    assert 'default = "local"' in config and "root-certificates" in config
    logs = {p.name for p in (work / "logs").glob("*.log")}
    assert {"superlink.log", "superexec.log", "supernode-0.log", "supernode-1.log"} <= logs
    print(f"bare app, 2 nodes, 2 rounds: {elapsed:.1f}s end to end")


@pytest.mark.e2e
@needs_proc
@pytest.mark.timeout(240)
def test_run_local_failing_server_app(tmp_path, bare_app_dir):
    lines: list[str] = []
    work = tmp_path / "work"
    code = run_local(
        2,
        None,
        tmp_path / "out",
        "num-server-rounds=3 fail-in-round=1",
        app_dir=bare_app_dir,
        work_dir=work,
        stream=lines.append,
        timeout=180,
    )
    text = "\n".join(lines)
    assert code != 0, text
    assert "failing on purpose" in text
    assert "finished:failed" in text
    assert _wait_no_leftovers(work) == []


_READ_REFUSALS = """
import sys
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
registry = CollectorRegistry()
MultiProcessCollector(registry, path=sys.argv[1])
for metric in registry.collect():
    for sample in metric.samples:
        if sample.name == "fedsd_server_node_refusals_total":
            print(sample.labels["reason"], sample.value)
"""


def _no_fab_installed(node_homes: Path) -> None:
    """Flower extracts a FAB into FLWR_HOME/apps/ before it loads it: nothing there means
    nothing of the refused app was installed, let alone run."""
    homes = sorted(node_homes.iterdir())
    assert len(homes) == 2, homes
    for home in homes:
        apps = home / "apps"
        assert not apps.exists() or not any(apps.iterdir()), list(apps.rglob("*"))


@pytest.mark.e2e
@needs_proc
@pytest.mark.timeout(420)
def test_nodes_refuse_an_app_they_did_not_pin(tmp_path, tiny_model, bare_app_dir):
    """Two real TLS deployments side by side, each submitting an app one byte away from
    the one its nodes pinned; every node refuses it before installing it, the server names
    the refusals and the run fails at once:

    1. ``fedsd up --local`` (tiny model, 64 px, 1 round) with a changed copy of fedsd
       (``--app-dir``) and nodes pinned to fedsd's own FAB (``--node-config
       trusted-apps=...``);
    2. a ``LocalDeployment`` of the bare app with the default pin (``self``, the
       deployment's app), submitted a changed copy of the bare app; its node 0 starts
       ClientApps without a launcher, node 1 forks them from a warm launcher (both ways a
       ClientApp can start).
    """
    from fedsd.deploy.run_config import find_app_dir

    t0 = time.monotonic()
    fedsd_app = find_app_dir()
    pinned = fab_hash_of(fedsd_app)
    other = changed_app_copy(fedsd_app, tmp_path / "fedsd-copy", ("pyproject.toml", "fedsd"))
    submitted = fab_hash_of(other)
    assert submitted != pinned
    shards, out = synthetic_shards(tmp_path, 2, 8), tmp_path / "out"
    base = free_port_block(MetricsPorts(0).node(2))
    argv = [sys.executable, "-m", "fedsd.cli", "up", "--local", "--nodes", "2", "--rounds", "1"]
    argv += ["--model", str(tiny_model), "--shards", str(shards), "--out", str(out)]
    argv += ["--run-config", "resolution=64", "--app-dir", str(other)]
    argv += ["--node-config", f'trusted-apps="{pinned}"', "--metrics-port", str(base)]
    argv += ["--timeout", "300"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    up_log = tmp_path / "fedsd-up.log"
    with up_log.open("w") as sink:
        up = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    try:
        # 2. meanwhile: the bare app, default pin
        bare_other = changed_app_copy(bare_app_dir, tmp_path / "bare_app")
        bare_pinned, bare_submitted = fab_hash_of(bare_app_dir), fab_hash_of(bare_other)
        lines: list[str] = []
        with LocalDeployment(
            tmp_path / "bare", 2, app_dir=bare_app_dir, stream=lines.append, startup_timeout=120
        ) as dep:
            start_node = dep.start_supernode

            def launcher_for_node_1(index, **kwargs):
                dep.warm_apps = index == 1
                return start_node(index, **kwargs)

            dep.start_supernode = launcher_for_node_1
            dep.start()
            launcher = dep.log_dir / "launcher-apps.log"
            deadline = time.monotonic() + 180
            while "listening on" not in launcher.read_text():
                assert dep.services["launcher-apps"].alive(), launcher.read_text()
                assert time.monotonic() < deadline, launcher.read_text()
                time.sleep(0.5)
            res = dep.submit(bare_other, {"num-server-rounds": 1}, timeout=200)
            # two refusals below, one ClientApp from node 1's launcher, none for node 0
            assert launcher.read_text().count("started flwr-clientapp pid") == 1
            assert "launcher-0" not in dep.services
        bare_took = time.monotonic() - t0
        said = "\n".join(lines)
        assert res.status == "finished:failed", said
        assert REFUSAL_MARK in str(res.details) and bare_submitted in str(res.details), said
        for i in range(2):
            log = (tmp_path / "bare" / "logs" / f"supernode-{i}.log").read_text()
            assert f"FAB sha256 {bare_submitted} is not one of them" in log, log[-3000:]
            assert f"node config trusted-apps: {bare_pinned} (self)" in log, log[-3000:]
        _no_fab_installed(tmp_path / "bare" / "node-home")

        up.wait(timeout=360)
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    took = time.monotonic() - t0
    said = up_log.read_text()
    # 1. fedsd up: told in advance, then every node refuses, named and counted by the server
    assert up.returncode == 1, said[-6000:]
    assert f"the nodes run only these apps (FAB sha256): {pinned} (trusted-apps)" in said
    assert f"FAB sha256 {submitted}) is not one of them: every node will refuse" in said
    refusals = re.findall(
        r"round 1: node (\d+) refused the run \(app-not-trusted\): .*"
        + f"{REFUSAL_MARK}: .*FAB sha256 {submitted} is not one of them",
        said,
    )
    assert len(set(refusals)) == 2, said[-6000:]
    assert re.search(r"fedsd up: run \d+ ended as finished:failed: .*2 refused the run", said), (
        said[-6000:]
    )
    assert not (out / "round-1").exists()
    work = out / ".deploy"
    caches = sorted((work / "cache").iterdir())
    assert len(caches) == 2 and not any(list(c.rglob("*")) for c in caches)  # no image read
    _no_fab_installed(work / "node-home")
    for i in range(2):
        log = (work / "logs" / f"supernode-{i}.log").read_text()
        assert f"fedsd node: {REFUSAL_MARK}" in log and submitted in log, log[-3000:]
    got = subprocess.run(
        [sys.executable, "-c", _READ_REFUSALS, str(work / "metrics" / "metrics-serverapp")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    counts = dict(line.split() for line in got.stdout.splitlines())
    expected = {"app-not-trusted": "2.0", **{rule: "0.0" for rule in POLICY_KEYS}}
    assert counts == expected, got.stdout + got.stderr
    forks = sum(p.read_text().count("started flwr-clientapp") for p in work.glob("logs/launcher-*"))
    print(
        f"refused runs: bare app {bare_took:.1f}s, fedsd up {took:.1f}s (in parallel); "
        f"fedsd up's ClientApps: {forks} of 2 forked by a launcher (a race, not checked)"
    )


@pytest.mark.e2e
@needs_proc
@pytest.mark.timeout(240)
def test_sigterm_stops_every_process(tmp_path, bare_app_dir):
    work = tmp_path / "work"
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from fedsd.deploy.up import run_local
        sys.exit(run_local(2, None, {str(tmp_path / "out")!r}, "num-server-rounds=100",
                           app_dir={str(bare_app_dir)!r}, work_dir={str(work)!r},
                           stream=lambda line: print(line, flush=True), timeout=200))
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 150
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            if re.search(r"fedsd round 1/", line) or time.monotonic() > deadline:
                break
        assert any("fedsd round 1/" in line for line in seen), "".join(seen)
        assert _leftovers(work), "the deployment should be running"
        proc.send_signal(signal.SIGTERM)
        code = _wait_exit(proc, timeout=60)
        seen.append(proc.stdout.read())
        assert code == 128 + signal.SIGTERM, "".join(seen)
        assert _wait_no_leftovers(work) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_out_lock_is_exclusive_names_the_holder_and_dies_with_it(tmp_path):
    out = tmp_path / "out"
    with hold_out_lock(out):
        assert (out / LOCK_NAME).read_text().strip() == str(os.getpid())
        said = f"{out} is in use by another fedsd up (pid {os.getpid()})"
        with pytest.raises(OutInUse, match=re.escape(said)):
            with hold_out_lock(out):
                pass
    with hold_out_lock(out):  # released at the end of the block
        pass


@pytest.mark.e2e
@needs_proc
@pytest.mark.timeout(400)
def test_second_fedsd_up_on_one_out_is_refused_and_changes_nothing(tmp_path, tiny_model):
    """Two real ``fedsd up --local`` on one OUT: the second is refused at once naming the
    first's pid, and the first run's state.db, certificates and connection stay as they were
    (without the lock, --no-metrics let the second move the live state.db aside)."""
    shards, out = synthetic_shards(tmp_path, 2, 8), tmp_path / "out"
    work = out / ".deploy"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-m", "fedsd.cli", "up", "--local", "--nodes", "2"]
    argv += ["--rounds", "50", "--model", str(tiny_model), "--shards", str(shards)]
    argv += ["--out", str(out), "--run-config", "resolution=64", "--no-metrics"]
    argv += ["--timeout", "300"]
    first = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        env=env,
        start_new_session=True,
    )
    seen: list[str] = []
    try:
        assert first.stdout is not None
        for line in first.stdout:  # every service up: state.db, certs and connection exist
            seen.append(line)
            if "SuperNode(s) online" in line:
                break
        assert any("SuperNode(s) online" in line for line in seen), "".join(seen)
        assert (out / LOCK_NAME).read_text().strip() == str(first.pid)
        kept = [work / n for n in ("ca.crt", "superlink.crt", "superlink.key")]
        kept.append(work / "flwr-home" / "config.toml")
        before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in kept}
        db = (work / "state.db").stat()

        t0 = time.monotonic()
        second = subprocess.run(
            argv, capture_output=True, text=True, cwd=REPO, env=env, timeout=120
        )
        refused_in = time.monotonic() - t0
        said = second.stdout + second.stderr
        assert second.returncode == 2, said
        assert f"{out} is in use by another fedsd up (pid {first.pid})" in said, said
        assert first.poll() is None, "the first run must go on"
        assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in kept} == before
        assert (work / "state.db").stat().st_ino == db.st_ino
        assert not (work / "state.previous.db").exists()
        assert (out / LOCK_NAME).read_text().strip() == str(first.pid)

        first.send_signal(signal.SIGTERM)
        code = _wait_exit(first, timeout=90)
        seen.append(first.stdout.read())
        assert code == 128 + signal.SIGTERM, "".join(seen)
        assert _wait_no_leftovers(work) == []
        with hold_out_lock(out):  # the lock died with its holder
            pass
        print(f"second fedsd up refused in {refused_in:.2f}s (exit {second.returncode})")
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()


def test_deploy_error_when_superlink_cannot_start(tmp_path):
    dep = LocalDeployment(tmp_path / "w", nodes=1, stream=lambda _l: None, startup_timeout=30)
    dep.ensure_certs()
    dep.certs.server_key.write_bytes(b"not a key")  # SuperLink cannot load its TLS key
    try:
        with pytest.raises(DeployError, match="superlink"):
            dep.start_superlink(attempts=1)
    finally:
        dep.stop()
