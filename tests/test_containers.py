"""Container deployment (issue 4): hadolint, ``docker compose config`` with the real Compose
binary, and a real run: podman builds the images (CPU variant, debootstrap base), Compose
drives podman through its API socket with the CI override (host network, loopback ports),
2 SuperNodes x 2 rounds on the tiny model and synthetic shards.

Never skipped: a machine without podman, Compose, hadolint or the base image fails these
tests with the reason and the command that sets it up (``bash docker/ci-setup.sh``).
"""

from __future__ import annotations

import contextlib
import json
import os
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

from tests.host import tool

pytestmark = pytest.mark.containers

REPO = Path(__file__).resolve().parent.parent
SERVICES = ("superlink", "supernode", "serverapp", "fleet-proxy")
BASE_IMAGE = os.environ.get("FEDSD_BASE_IMAGE", "localhost/fedsd-base:bookworm")
TAG = os.environ.get("FEDSD_IMAGE_TAG", "ci")
SETUP_HINT = "set the machine up with: bash docker/ci-setup.sh .venv (as root)"
APP_UID = 10001


def _tool(name: str) -> str:
    return tool(name, f"the container tests need it; {SETUP_HINT}")


def _compose_cmd(*files: str) -> list[str]:
    cmd = [_tool("docker-compose")]
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
    assert {p.parent.name for p in dockerfiles} == set(SERVICES)
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
    # Control/Runtime side on an internal network; SuperNodes only on the fleet network.
    assert cfg["networks"]["backend"].get("internal") is True
    for i in (0, 1):
        node = services[f"supernode-{i}"]
        assert set(node["networks"]) == {"fleet"}
        assert node["environment"]["SUPERLINK_ADDRESS"] == "fedsd-superlink:9092"
        assert "fedsd-superlink" in cfg["services"]["fleet-proxy"]["networks"]["fleet"]["aliases"]
        devices = node["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
        shard = next(v for v in node["volumes"] if v["target"] == "/data/shard")
        assert shard["read_only"] is True and shard["source"].endswith(f"shard-{i}")
        key = next(v for v in node["volumes"] if v["target"] == "/certs")
        assert key["read_only"] is True and key["source"].endswith(f"node-{i}")
    assert set(services["superlink"]["networks"]) == {"backend"}
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
    assert {"backend", "fleet"} <= set(services["prometheus"]["networks"])
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
        [sys.executable, str(REPO / "docker" / "compose_nodes.py"), "4", "--gpus", "2"]
        + ["--out", str(override)],
        timeout=60,
    )
    env = {**os.environ, "FEDSD_NODES": "4"}
    res = _run(
        [_tool("docker-compose"), "-f", str(tmp_path / "compose.yaml"), "-f", str(override)]
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
    """Run the containers' HEALTHCHECKs every 2 s.

    Docker's daemon runs them itself; podman 4.3 schedules them with systemd timers, and
    with no systemd (CI machines) a container stays "starting" forever, so Compose's
    ``condition: service_healthy`` would never be met. This does what the timer would.
    """
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            res = subprocess.run(
                [podman, "ps", "-q", "--filter", f"label=com.docker.compose.project={project}"],
                capture_output=True,
                text=True,
            )
            procs = [
                subprocess.Popen(
                    [podman, "healthcheck", "run", cid],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for cid in res.stdout.split()
            ]
            for p in procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=30)
            stop.wait(2.0)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=40)


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


def _fedsd(*args: str, timeout: float = 300) -> None:
    _run([sys.executable, "-m", "fedsd.cli", *args], timeout=timeout)


def _wait_for_service(podman: str, project: str, service: str, timeout: float) -> tuple[int, str]:
    """Wait until the compose service's container has exited; its exit code and output."""
    labels = [
        "--filter",
        f"label=com.docker.compose.project={project}",
        "--filter",
        f"label=com.docker.compose.service={service}",
    ]
    deadline = time.monotonic() + timeout
    while True:
        ids = _run([podman, "ps", "-a", "-q", *labels], timeout=60).stdout.split()
        if ids:
            state = _run(
                [podman, "inspect", "-f", "{{.State.Status}} {{.State.ExitCode}}", ids[0]],
                timeout=60,
            ).stdout.split()
            if state and state[0] in ("exited", "stopped"):
                logs = _run([podman, "logs", ids[0]], timeout=60, check=False)
                return int(state[1]), logs.stdout + logs.stderr
        if time.monotonic() > deadline:
            ps = _run([podman, "ps", "-a", "--filter", labels[1]], timeout=60, check=False)
            pytest.fail(f"{service} did not exit within {timeout} s:\n{ps.stdout}")
        time.sleep(2)


@pytest.mark.heavy
@pytest.mark.timeout(3600)
def test_compose_up_trains_end_to_end(tmp_path, ci_images):
    podman = _podman()
    timings: dict[str, float] = {}

    # docker/build.sh, once per session (tests/conftest.py; tests/test_k8s.py uses them too)
    timings["build"] = ci_images.build_seconds
    print(ci_images.build_output)  # image, seconds, size: one line each

    root = tmp_path
    _fedsd("tiny-model", "--out", str(root / "models" / "tiny"))
    _fedsd("shards", "--source", "synthetic", "--num-shards", "2", "--out", str(root / "shards"))
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
        "FEDSD_CI_SUPERLINK_METRICS_PORT": _free_port(),
        "FEDSD_CI_SERVERAPP_METRICS_PORT": _free_port(),
        "FEDSD_CI_NODE0_METRICS_PORT": _free_port(),
        "FEDSD_CI_NODE1_METRICS_PORT": _free_port(),
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
            "FEDSD_ROUNDS": "2",
            "FEDSD_RUN_CONFIG": "resolution=64",
            "FEDSD_TIMEOUT": "900",
        }
        compose = _compose_cmd("compose.yaml", "compose.ci.yaml")
        try:
            with _health_ticker(podman, project):
                t0 = time.monotonic()
                _run([*compose, "up", "-d", "--no-build"], timeout=1200, env=env)
                timings["up"] = time.monotonic() - t0
                t0 = time.monotonic()
                # The launcher's own exit status and output, from podman: under podman 4.3
                # `compose run` exits 0 whatever the container did, and `compose wait` /
                # `compose logs` came back with 0 and no output once on a loaded machine.
                code, output = _wait_for_service(podman, project, "launcher", timeout=1800)
                timings["run"] = time.monotonic() - t0
                if code != 0:
                    tails = _run(
                        [*compose, "logs", "--no-color", "--tail", "40"],
                        timeout=60,
                        env=env,
                        check=False,
                    )
                    pytest.fail(f"launcher exited {code}\n{output[-6000:]}\n{tails.stdout}")
                assert "finished:completed" in output, output[-6000:]
                print("\n".join(ln for ln in output.splitlines() if "fedsd " in ln))
                adapter = out / "latest" / "pytorch_lora_weights.safetensors"
                assert adapter.is_file() and adapter.stat().st_size > 0
                history = json.loads((out / "history.json").read_text())
                rounds = history["rounds"] if isinstance(history, dict) else history
                assert len(rounds) == 2

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
        finally:
            t0 = time.monotonic()
            _run([*compose, "down", "-v", "--remove-orphans"], timeout=600, env=env, check=False)
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
