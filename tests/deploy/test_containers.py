"""Container deployment (issue 4): hadolint, ``docker compose config`` with the real Compose
binary, and a real run: podman builds the images (CPU variant, debootstrap base), Compose
drives podman through its API socket with the CI override (host network, loopback ports)
and scripts/compose_nodes.py's third node, 3 SuperNodes x 2 rounds (min-nodes 2) on the
tiny model and synthetic shards; `compose kill` takes one SuperNode down in round 1 and
the run still completes; `compose start` brings it back and it rejoins with its key.

Never skipped: a machine without podman, Compose, hadolint or the base image fails these
tests with the reason and the command that sets it up (``bash docker/ci-setup.sh``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.host import compose_binary, container_states, tool, wait_for_exit

pytestmark = pytest.mark.containers

REPO = Path(__file__).resolve().parents[2]
SERVICES = ("superlink", "supernode", "serverapp", "fleet-proxy")
BASE_IMAGE = os.environ.get("FEDSD_BASE_IMAGE", "localhost/fedsd-base:bookworm")
TAG = os.environ.get("FEDSD_IMAGE_TAG", "ci")
SETUP_HINT = "set the machine up with: bash docker/ci-setup.sh .venv (as root)"
APP_UID = 10001


def _tool(name: str) -> str:
    return tool(name, f"the container tests need it; {SETUP_HINT}")


@functools.cache
def _compose() -> str:
    return compose_binary()


def _compose_cmd(*files: str) -> list[str]:
    cmd = [_compose()]
    for f in files:
        cmd += ["-f", str(REPO / f)]
    return cmd


def _run(cmd: list[str], *, timeout: float, env: dict[str, str] | None = None, check=True):
    res = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL
    )
    if check and res.returncode != 0:
        pytest.fail(f"`{' '.join(cmd)}` exited {res.returncode}:\n{res.stdout}\n{res.stderr}")
    return res


# --------------------------------------------------------------------------- static checks


def test_hadolint_every_dockerfile():
    dockerfiles = sorted(REPO.glob("services/*/Dockerfile"))
    # supernode and serverapp: the two targets of services/app/Dockerfile
    assert {p.parent.name for p in dockerfiles} == {"app", "superlink", "fleet-proxy"}
    app = (REPO / "services/app/Dockerfile").read_text()
    assert {"FROM base AS supernode", "FROM base AS serverapp"} <= set(app.splitlines())
    # A build argument reaches a stage's RUN only where the stage names it: every stage
    # that runs pip (finish-image.sh installs fedsd, fetching its build dependencies)
    # must see the pip settings, or a CI build (local wheels, host CA) reaches for PyPI.
    for stage in app.split("\nFROM ")[1:]:
        if "RUN " in stage:
            declared = set(re.findall(r"^ARG (\w+)", stage, flags=re.M))
            assert {"PIP_CERT", "PIP_FIND_LINKS", "PIP_INDEX_URL"} <= declared, stage[:60]
    res = _run([_tool("hadolint"), *map(str, dockerfiles)], timeout=120, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def _config(*files: str, env: dict[str, str] | None = None, profiles: tuple = ()) -> dict:
    args = [a for p in profiles for a in ("--profile", p)]
    res = _run([*_compose_cmd(*files), *args, "config", "--format", "json"], timeout=60, env=env)
    return json.loads(res.stdout)


def test_compose_config_is_valid_and_hardened():
    cfg = _config("compose.yaml")
    services = cfg["services"]
    assert {
        "certs",
        "superlink",
        "fleet-proxy",
        "register",
        "serverapp",
        "supernode-0",
        "supernode-1",
        "launcher",
    } <= set(services)
    for name, svc in services.items():
        assert svc.get("read_only") is True, name
        assert svc.get("cap_drop") == ["ALL"], name
        assert "no-new-privileges:true" in svc.get("security_opt", []), name
    # Control/Runtime side on an internal network; each SuperNode only on its own network
    # (test_compose_supernodes_share_no_network), where fleet-proxy answers its name.
    assert cfg["networks"]["backend"].get("internal") is True
    for i in (0, 1):
        node = services[f"supernode-{i}"]
        assert set(node["networks"]) == {f"node-{i}"}
        assert node["environment"]["SUPERLINK_ADDRESS"] == "fedsd-superlink:9092"
        proxy_nets = cfg["services"]["fleet-proxy"]["networks"]
        assert "fedsd-superlink" in proxy_nets[f"node-{i}"]["aliases"]
        devices = node["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
        shard = next(v for v in node["volumes"] if v["target"] == "/data/shard")
        assert shard["read_only"] is True and shard["source"].endswith(f"shard-{i}")
        key = next(v for v in node["volumes"] if v["target"] == "/certs")
        assert key["read_only"] is True and key["source"].endswith(f"node-{i}")
    assert set(services["superlink"]["networks"]) == {"backend"}
    # The SuperExec secret (certs/superexec/, made by certs): the SuperLink and the
    # ServerApp SuperExec only, read-only, where the entrypoints look for it.
    holders = {
        name
        for name, svc in services.items()
        for v in svc.get("volumes", [])
        if v.get("source", "").endswith("/superexec")
    }
    assert holders == {"superlink", "serverapp"}
    for name in holders:
        (mount,) = [v for v in services[name]["volumes"] if v["source"].endswith("/superexec")]
        assert mount["target"] == "/run/secrets/fedsd" and mount["read_only"] is True
    assert services["superlink"]["restart"] == "unless-stopped"
    assert any(v["target"] == "/data" for v in services["superlink"]["volumes"])
    dep = services["launcher"]["depends_on"]
    assert dep["serverapp"]["condition"] == "service_healthy"
    assert services["superlink"]["depends_on"]["certs"]["condition"] == (
        "service_completed_successfully"
    )


def test_compose_monitoring_matches_the_prometheus_config():
    """Profile `monitoring`: Prometheus and Grafana, hardened, published on loopback only,
    pinned images; every exporter's port in compose is the one prometheus.yml scrapes."""
    import yaml

    cfg = _config("compose.yaml", profiles=("monitoring",))
    services = cfg["services"]
    for name in ("prometheus", "grafana", "superlink-exporter"):
        svc = services[name]
        assert svc.get("read_only") is True and svc.get("cap_drop") == ["ALL"], name
        assert "no-new-privileges:true" in svc.get("security_opt", []), name
    for name in ("prometheus", "grafana"):
        image = services[name]["image"]
        assert ":" in image and not image.endswith(":latest"), image
        assert all(p["host_ip"] == "127.0.0.1" for p in services[name]["ports"]), name
    assert {"backend", "node-0", "node-1"} <= set(services["prometheus"]["networks"])
    grafana_env = services["grafana"]["environment"]  # no admin, so no default password
    assert grafana_env["GF_SECURITY_DISABLE_INITIAL_ADMIN_CREATION"] == "true"
    assert "GF_SECURITY_ADMIN_PASSWORD" not in grafana_env
    assert (
        "profiles" in services["prometheus"]
        and "prometheus" not in _config("compose.yaml")["services"]
    )
    scraped = yaml.safe_load((REPO / "docker" / "prometheus" / "prometheus.yml").read_text())
    addresses = {
        t
        for job in scraped["scrape_configs"]
        for sc in job["static_configs"]
        for t in sc["targets"]
    }
    served = {
        f"{name}:{services[name]['environment']['FEDSD_METRICS_PORT']}"
        for name in ("superlink-exporter", "serverapp", "supernode-0", "supernode-1")
    }
    assert addresses == served


def _check_node_networks(cfg: dict, nodes: int) -> None:
    """No two SuperNodes share a network; each node's networks hold only the node,
    fleet-proxy (its way to the SuperLink, answering fedsd-superlink there) and Prometheus
    (which scrapes its exporter): no node reaches another's exporter or Runtime API."""
    services = cfg["services"]
    members: dict[str, set[str]] = {}
    for name, svc in services.items():
        for net in svc.get("networks") or {}:
            members.setdefault(net, set()).add(name)
    node_names = [f"supernode-{i}" for i in range(nodes)]
    assert {n for n in services if n.startswith("supernode-")} == set(node_names)
    for node in node_names:
        nets = set(services[node]["networks"])
        assert nets, node
        for net in nets:
            assert members[net] <= {node, "fleet-proxy", "prometheus"}, (node, net, members[net])
            aliases = services["fleet-proxy"]["networks"][net]["aliases"]
            assert "fedsd-superlink" in aliases, (node, net)
        for other in node_names:
            if other != node:
                assert not nets & set(services[other]["networks"]), (node, other)
        if "prometheus" in services:
            assert nets & set(services["prometheus"]["networks"]), node


def test_compose_supernodes_share_no_network(tmp_path):
    """compose.yaml (with the monitoring profile) and compose_nodes.py's 4-node override:
    each SuperNode on its own network with fleet-proxy and Prometheus only."""
    _check_node_networks(_config("compose.yaml", profiles=("monitoring",)), 2)
    _check_node_networks(_config("compose.yaml"), 2)
    (tmp_path / "compose.yaml").symlink_to(REPO / "compose.yaml")
    override = tmp_path / "compose.nodes.yaml"
    _run(
        [sys.executable, str(REPO / "scripts" / "compose_nodes.py"), "4", "--out", str(override)],
        timeout=60,
    )
    res = _run(
        [_compose(), "-f", str(tmp_path / "compose.yaml"), "-f", str(override)]
        + ["--project-directory", str(REPO), "--profile", "monitoring", "config"]
        + ["--format", "json"],
        timeout=60,
        env={**os.environ, "FEDSD_NODES": "4"},
    )
    _check_node_networks(json.loads(res.stdout), 4)
    # The checker itself: two nodes on one network, or a stranger on a node's, are caught.
    bad = _config("compose.yaml", profiles=("monitoring",))
    bad["services"]["supernode-1"]["networks"]["node-0"] = None
    with pytest.raises(AssertionError):
        _check_node_networks(bad, 2)
    bad = _config("compose.yaml")
    bad["services"]["serverapp"]["networks"]["node-1"] = None
    with pytest.raises(AssertionError):
        _check_node_networks(bad, 2)


def test_compose_ci_override_uses_only_the_host_network():
    cfg = _config("compose.yaml", "compose.ci.yaml")
    for name, svc in cfg["services"].items():
        if name == "certs":
            assert svc["network_mode"] == "none"
            continue
        assert svc.get("network_mode") == "host", name
        assert not svc.get("networks"), name
        assert not svc.get("ports"), name
        assert "deploy" not in svc, name


def test_compose_nodes_override_adds_nodes(tmp_path):
    override = tmp_path / "compose.nodes.yaml"
    # compose resolves `extends: {file: compose.yaml}` next to the override: keep it there.
    (tmp_path / "compose.yaml").symlink_to(REPO / "compose.yaml")
    _run(
        [sys.executable, str(REPO / "scripts" / "compose_nodes.py"), "4", "--gpus", "2"]
        + ["--out", str(override)],
        timeout=60,
    )
    env = {**os.environ, "FEDSD_NODES": "4"}
    res = _run(
        [_compose(), "-f", str(tmp_path / "compose.yaml"), "-f", str(override)]
        + ["--project-directory", str(REPO), "config", "--format", "json"],
        timeout=60,
        env=env,
    )
    services = json.loads(res.stdout)["services"]
    for i in range(4):
        node = services[f"supernode-{i}"]
        assert node["environment"]["FEDSD_NODE_INDEX"] == str(i)
        assert node["environment"]["FEDSD_NUM_NODES"] == "4"
        sources = {v["target"]: v["source"] for v in node["volumes"]}
        assert sources["/data/shard"].endswith(f"shard-{i}")
        assert sources["/certs"].endswith(f"node-{i}")
        assert sources["/data/cache"] == f"node-{i}-cache"
    assert services["supernode-3"]["deploy"]["resources"]["reservations"]["devices"][0][
        "device_ids"
    ] == ["1"]
    assert {f"supernode-{i}" for i in range(4)} <= set(services["launcher"]["depends_on"])
    assert services["certs"]["environment"]["FEDSD_NUM_NODES"] == "4"


def test_image_requirements_match_pyproject():
    import tomllib

    with (REPO / "pyproject.toml").open("rb") as fh:
        wanted = tomllib.load(fh)["project"]["dependencies"]
    lines = (REPO / "docker" / "requirements.txt").read_text().splitlines()
    got = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    assert got == wanted, "regenerate docker/requirements.txt from pyproject.toml"
    constraints = (REPO / "docker" / "constraints.txt").read_text().lower()
    for req in wanted:
        name, _, version = req.partition("==")
        if name != "torch":
            assert f"{name.lower()}=={version}" in constraints.replace("_", "-"), req


# --------------------------------------------------------------------------- the harness


def test_compose_binary_reports_failures():
    """The Compose the tests run exits non-zero when Compose fails (pip's wrapper did not:
    a failed `up -d` once read as success and the test waited 30 min for a dead launcher)."""
    binary = _compose()
    res = _run([binary, "-f", str(REPO / "nonexistent.yaml"), "config"], timeout=60, check=False)
    assert res.returncode != 0, res.stdout + res.stderr


def test_wait_fails_fast_on_a_container_never_started_or_a_dead_dependency():
    """The run waits fail within seconds, not at their deadline, when the run cannot finish:
    the awaited container was never started, or a service it needs has stopped."""
    podman = _podman()
    tag = f"fedsd-waittest-{os.getpid()}"
    never = _run([podman, "create", "--label", tag, BASE_IMAGE, "sleep", "600"], timeout=120)
    dead = _run([podman, "run", "-d", "--label", tag, BASE_IMAGE, "true"], timeout=120)
    alive = _run([podman, "run", "-d", "--label", tag, BASE_IMAGE, "sleep", "600"], timeout=120)
    never_id, dead_id, alive_id = (r.stdout.strip() for r in (never, dead, alive))
    try:
        t0 = time.monotonic()
        with pytest.raises(pytest.fail.Exception, match="still created"):
            wait_for_exit(podman, never_id, 600, start_within=4, evidence=lambda: "EVIDENCE")
        assert time.monotonic() - t0 < 60
        t0 = time.monotonic()
        with pytest.raises(pytest.fail.Exception, match="which the run needs") as err:
            wait_for_exit(podman, alive_id, 600, watch=[dead_id], evidence=lambda: "EVIDENCE")
        assert time.monotonic() - t0 < 60
        assert "EVIDENCE" in str(err.value) and "podman ps -a" in str(err.value)
    finally:
        ids = _run([podman, "ps", "-aq", "--filter", f"label={tag}"], timeout=60).stdout.split()
        _run([podman, "rm", "-f", "-t", "0", *ids], timeout=120, check=False)


# --------------------------------------------------------------------------- the real run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _podman() -> str:
    podman = _tool("podman")
    res = _run([podman, "image", "exists", BASE_IMAGE], timeout=60, check=False)
    if res.returncode != 0:
        pytest.fail(f"base image {BASE_IMAGE} not found; {SETUP_HINT}")
    return podman


@contextlib.contextmanager
def _podman_service(podman: str, root: Path) -> Iterator[str]:
    """``podman system service`` on a private socket: what Compose talks to."""
    sock = root / "podman.sock"
    log = (root / "podman-service.log").open("wb")
    proc = subprocess.Popen(
        [podman, "system", "service", "--time=0", f"unix://{sock}"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                service_log = (root / "podman-service.log").read_text()
                pytest.fail(f"podman system service did not start: {service_log}")
            time.sleep(0.2)
        yield f"unix://{sock}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=15)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


@contextlib.contextmanager
def _health_ticker(podman: str, project: str) -> Iterator[None]:
    """Run each running container's HEALTHCHECK every ``interval`` of its own, as Docker's
    daemon does.

    Podman 4.3 schedules health checks with systemd timers; with no systemd (CI machines) a
    container stays "starting" forever and Compose's ``condition: service_healthy`` is
    never met. This does what the timer would, no more often than the container asks (a
    check every 2 s for every container loaded the machine it was timing).
    """
    stop = threading.Event()
    interval: dict[str, float] = {}  # container id -> seconds between checks
    due: dict[str, float] = {}

    def loop() -> None:
        while not stop.is_set():
            res = subprocess.run(
                [podman, "ps", "-q", "--filter", f"label=com.docker.compose.project={project}"],
                capture_output=True,
                text=True,
            )
            now = time.monotonic()
            ids = [cid for cid in res.stdout.split() if due.get(cid, 0) <= now]
            for cid in ids:
                if cid not in interval:
                    ns = subprocess.run(
                        [podman, "inspect", "-f", "{{.Config.Healthcheck.Interval}}", cid],
                        capture_output=True,
                        text=True,
                    ).stdout.strip()
                    interval[cid] = int(ns) / 1e9 if ns.isdigit() and int(ns) > 0 else 30.0
                due[cid] = now + interval[cid]
            procs = [
                subprocess.Popen(
                    [podman, "healthcheck", "run", cid],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for cid in ids
            ]
            for p in procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=60)
            stop.wait(1.0)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=70)


def _https_status(url: str, ca: Path, method: str = "GET") -> int:
    ctx = ssl.create_default_context(cafile=str(ca))
    req = urllib.request.Request(
        url,
        method=method,
        data=b"" if method == "POST" else None,
        headers={"Content-Type": "application/protobuf"},
    )
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _wait_for_log(podman: str, container: str, marker: str, timeout: float, evidence) -> None:
    """Wait until ``container`` has logged ``marker``; fail at once if it exits first."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        logs = _run([podman, "logs", container], timeout=120, check=False)
        if marker in logs.stdout + logs.stderr:
            return
        status, code, _ = container_states(podman, [container]).get(container, ("?", -1, 0))
        if status in ("exited", "stopped"):
            pytest.fail(f"{container} exited {code} before logging {marker!r}\n{evidence()}")
        time.sleep(2)
    pytest.fail(f"{container} did not log {marker!r} within {timeout:.0f} s\n{evidence()}")


def _fedsd(*args: str, timeout: float = 300) -> None:
    _run([sys.executable, "-m", "fedsd.cli", *args], timeout=timeout)


def _project_containers(podman: str, project: str) -> dict[str, str]:
    """compose service -> container id, for every container of the project."""
    res = _run(
        [podman, "ps", "-a", "--filter", f"label=com.docker.compose.project={project}"]
        + ["--format", '{{.ID}} {{index .Labels "com.docker.compose.service"}}'],
        timeout=120,
    )
    return {svc: cid for cid, svc in (ln.split() for ln in res.stdout.splitlines() if ln)}


ONE_SHOT = ("certs", "register")  # exit 0 before `up -d` returns; the launcher runs on


def _check_started(podman: str, project: str, up_output: str) -> dict[str, str]:
    """After ``up -d`` returned 0 every service has been started: the one-shots have exited
    0, the others run. A container still "created" means Compose gave up on it (once, its
    failure was hidden behind exit status 0): fail now, with Compose's own output."""
    ids = _project_containers(podman, project)
    states = container_states(podman, list(ids.values()))
    wrong = {}
    for svc, cid in sorted(ids.items()):
        status, code, _ = states.get(cid, ("missing", -1, 0))
        ok = (status, code) == ("exited", 0) if svc in ONE_SHOT else status == "running"
        if svc == "launcher":
            ok = status in ("running", "exited")
        if not ok:
            wrong[svc] = f"{status} (exit {code})"
    if wrong or "launcher" not in ids:
        ps = _run([podman, "ps", "-a"], timeout=120, check=False).stdout
        pytest.fail(
            f"`compose up -d` returned 0 but not every service was started: {wrong or ids}\n"
            f"--- compose up -d output\n{up_output}\n--- podman ps -a\n{ps}"
        )
    return ids


@pytest.mark.heavy
@pytest.mark.timeout(3600)
def test_compose_up_trains_end_to_end(tmp_path, ci_images):
    podman = _podman()
    timings: dict[str, float] = {}

    # docker/build.sh, once per session (tests/conftest.py; tests/deploy/test_k8s.py uses them too)
    timings["build"] = ci_images.build_seconds
    print(ci_images.build_output)  # image, seconds, size: one line each

    root = tmp_path
    _fedsd("tiny-model", "--out", str(root / "models" / "tiny"))
    _fedsd("shards", "--source", "synthetic", "--num-shards", "3", "--out", str(root / "shards"))
    # The third node: scripts/compose_nodes.py's CI override, next to links to the compose
    # files it extends (Compose resolves `extends: {file: compose.yaml}` beside it).
    files = root / "compose"
    files.mkdir()
    for name in ("compose.yaml", "compose.ci.yaml"):
        (files / name).symlink_to(REPO / name)
    nodes_override = files / "compose.nodes.yaml"
    _run(
        [sys.executable, str(REPO / "scripts" / "compose_nodes.py"), "3", "--ci"]
        + ["--out", str(nodes_override)],
        timeout=60,
    )
    out, certs = root / "out", root / "certs"
    out.mkdir()
    certs.mkdir()
    os.chown(out, APP_UID, APP_UID)  # the ServerApp writes here as uid 10001
    for path in (root / "models", root / "shards"):  # read by uid 10001
        for p in [path, *path.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)

    project = f"fedsdtest{os.getpid()}"
    ports = {
        "FEDSD_CI_SUPERLINK_PORT": _free_port(),
        "FEDSD_CI_PROXY_PORT": _free_port(),
        "FEDSD_CI_PROXY_HEALTH_PORT": _free_port(),
        "FEDSD_CI_SUPEREXEC_HEALTH_PORT": _free_port(),
        "FEDSD_CI_NODE0_PORT": _free_port(),
        "FEDSD_CI_NODE0_HEALTH_PORT": _free_port(),
        "FEDSD_CI_NODE1_PORT": _free_port(),
        "FEDSD_CI_NODE1_HEALTH_PORT": _free_port(),
        "FEDSD_CI_NODE2_PORT": _free_port(),
        "FEDSD_CI_NODE2_HEALTH_PORT": _free_port(),
        "FEDSD_CI_SUPERLINK_METRICS_PORT": _free_port(),
        "FEDSD_CI_SERVERAPP_METRICS_PORT": _free_port(),
        "FEDSD_CI_NODE0_METRICS_PORT": _free_port(),
        "FEDSD_CI_NODE1_METRICS_PORT": _free_port(),
        "FEDSD_CI_NODE2_METRICS_PORT": _free_port(),
    }
    with _podman_service(podman, root) as docker_host:
        env = {
            **os.environ,
            **{k: str(v) for k, v in ports.items()},
            "DOCKER_HOST": docker_host,
            "COMPOSE_BAKE": "false",
            "DOCKER_BUILDKIT": "0",
            "COMPOSE_PROJECT_NAME": project,
            "FEDSD_IMAGE_PREFIX": "localhost/fedsd",
            "FEDSD_TAG": TAG,
            "FEDSD_CERTS_DIR": str(certs),
            "FEDSD_SHARDS": str(root / "shards"),
            "FEDSD_MODELS": str(root / "models"),
            "FEDSD_MODEL": "/models/tiny",
            "FEDSD_OUT": str(out),
            "FEDSD_NODES": "3",
            "FEDSD_ROUNDS": "2",
            # min-nodes 2: the run goes on without the node killed below
            "FEDSD_RUN_CONFIG": "resolution=64 min-nodes=2",
            # 2 rounds at 64 px: ~1 min idle, a few under load; the killed node's round
            # waits for the SuperLink to fail it (<= 60 s)
            "FEDSD_TIMEOUT": "900",  # 3 nodes x 2 rounds and a kill: 10 min at load 60
        }
        compose = [_compose(), "--project-directory", str(REPO)]
        for name in ("compose.yaml", "compose.ci.yaml", "compose.nodes.yaml"):
            compose += ["-f", str(files / name)]
        try:
            with _health_ticker(podman, project):
                t0 = time.monotonic()
                # The dependency waits are bounded by compose.ci.yaml's health start periods
                # (300 s): past them a dependency is unhealthy and `up` fails with the reason.
                up = _run([*compose, "up", "-d", "--no-build"], timeout=900, env=env, check=False)
                up_output = f"exit {up.returncode}\n{up.stdout}\n{up.stderr}"
                if up.returncode != 0:
                    ps = _run([podman, "ps", "-a"], timeout=120, check=False).stdout
                    pytest.fail(f"`compose up -d` failed: {up_output}\n--- podman ps -a\n{ps}")
                timings["up"] = time.monotonic() - t0
                ids = _check_started(podman, project, up_output)
                t0 = time.monotonic()

                def evidence() -> str:
                    tails = _run(
                        [*compose, "logs", "--no-color", "--tail", "40"],
                        timeout=120,
                        env=env,
                        check=False,
                    )
                    return f"--- compose up -d output\n{up_output}\n--- logs\n{tails.stdout}"

                # `docker compose kill` of a SuperNode while round 1 is in flight (the
                # ServerApp has started and sampled the three nodes).
                deadline = float(env["FEDSD_TIMEOUT"]) + 60
                _wait_for_log(podman, ids["launcher"], "fedsd run: ", deadline, evidence)
                time.sleep(2)
                _run([*compose, "kill", "supernode-2"], timeout=120, env=env)
                killed_at = time.monotonic()

                # The launcher's own exit status and output, from podman (Compose reports the
                # run by its exit status only). Deadline: the launcher's own FEDSD_TIMEOUT.
                services = [
                    cid
                    for svc, cid in ids.items()
                    if svc not in (*ONE_SHOT, "launcher", "supernode-2")
                ]
                code = wait_for_exit(
                    podman,
                    ids["launcher"],
                    deadline,
                    watch=services,
                    max_restarts=2,  # a blip is survivable; a crash loop is not
                    evidence=evidence,
                )
                logs = _run([podman, "logs", ids["launcher"]], timeout=120, check=False)
                output = logs.stdout + logs.stderr
                timings["run"] = time.monotonic() - t0
                timings["run_after_kill"] = time.monotonic() - killed_at
                if code != 0:
                    pytest.fail(f"launcher exited {code}\n{output[-6000:]}\n{evidence()}")
                assert "finished:completed" in output, output[-6000:]
                assert "resubmitting" not in output, output[-6000:]  # a node is no lost run
                print("\n".join(ln for ln in output.splitlines() if "fedsd " in ln))
                adapter = out / "latest" / "pytorch_lora_weights.safetensors"
                assert adapter.is_file() and adapter.stat().st_size > 0
                history = json.loads((out / "history.json").read_text())
                rounds = history["rounds"] if isinstance(history, dict) else history
                # Every round completed: round 1 with the killed node failed, round 2
                # without it (the SuperLink had dropped it).
                assert [r["round"] for r in rounds] == [1, 2], rounds
                assert [r["nodes_replied"] for r in rounds] == [2, 2], rounds
                assert rounds[0]["nodes_sampled"] == 3 and rounds[0]["nodes_failed"] == 1
                # `kill` stops a container for good in Docker and Podman alike (restart
                # policies apply to containers that exit on their own): down, not restarted.
                state = container_states(podman, [ids["supernode-2"]])[ids["supernode-2"]]
                assert state[0] == "exited" and state[2] == 0, state

                # The SuperNodes' entry point passes the Fleet API and /health only.
                ca = certs / "ca.crt"
                proxy = f"https://127.0.0.1:{ports['FEDSD_CI_PROXY_PORT']}"
                link = f"https://127.0.0.1:{ports['FEDSD_CI_SUPERLINK_PORT']}"
                assert _https_status(f"{proxy}/health", ca) == 200
                for path in (
                    "/v1/control/list-runs",
                    "/v1/control/register-node",
                    "/v1/runtime/acquire-task",
                    "/v1/fleet/../control/list-runs",
                    "/v1/fleet/%2e%2e/control/list-runs",
                ):
                    assert _https_status(proxy + path, ca, "POST") == 403, path
                # ...while the same Control request straight to the SuperLink is served, and a
                # Fleet request passes the proxy (the SuperLink itself refuses it: no node auth).
                assert _https_status(f"{link}/v1/control/list-runs", ca, "POST") == 200
                assert _https_status(f"{proxy}/v1/fleet/get-run", ca, "POST") == 401

                # Every service's metrics exporter serves what its processes recorded.
                def scrape(port_var: str) -> str:
                    port = ports[port_var]
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as resp:
                        return resp.read().decode()

                assert "fedsd_server_rounds_completed_total{" in scrape(
                    "FEDSD_CI_SERVERAPP_METRICS_PORT"
                )
                for i in (0, 1):
                    assert "fedsd_node_train_steps_total{" in scrape(
                        f"FEDSD_CI_NODE{i}_METRICS_PORT"
                    )
                link_metrics = scrape("FEDSD_CI_SUPERLINK_METRICS_PORT")
                assert "fedsd_superlink_up 1.0" in link_metrics
                assert 'fedsd_superlink_runs{status="completed"} 1.0' in link_metrics

                # `compose start` brings the killed node back: it rejoins with its key
                # (the SuperLink's state is on its volume) and is listed online again.
                t0 = time.monotonic()
                _run([*compose, "start", "supernode-2"], timeout=300, env=env)
                online = ""
                while time.monotonic() - t0 < 240:
                    online = next(
                        (
                            ln
                            for ln in scrape("FEDSD_CI_SUPERLINK_METRICS_PORT").splitlines()
                            if ln.startswith('fedsd_superlink_nodes{status="online"}')
                        ),
                        "",
                    )
                    if online.endswith(" 3.0"):
                        break
                    time.sleep(3)
                timings["rejoin"] = time.monotonic() - t0
                assert online.endswith(" 3.0"), f"{online}\n{evidence()}"
        finally:
            t0 = time.monotonic()
            _run([*compose, "down", "-v", "--remove-orphans"], timeout=300, env=env, check=False)
            timings["down"] = time.monotonic() - t0
        left = _run(
            [podman, "ps", "-a", "-q", "--filter", f"label=com.docker.compose.project={project}"],
            timeout=60,
        )
        assert left.stdout.strip() == "", f"containers left after down: {left.stdout}"
        vols = _run(
            [
                podman,
                "volume",
                "ls",
                "-q",
                "--filter",
                f"label=com.docker.compose.project={project}",
            ],
            timeout=60,
        )
        assert vols.stdout.strip() == "", f"volumes left after down -v: {vols.stdout}"
    print("timings (s):", json.dumps({k: round(v, 1) for k, v in timings.items()}))
