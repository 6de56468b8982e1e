"""Shared fixtures. Everything is built in code: nothing is downloaded."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.host import build_images

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
# One OpenMP thread per process: the tests run ServerApp, SuperNodes and ClientApps side
# by side on a 2-core machine, where spinning OpenMP threads of several torch processes
# slow each other down by an order of magnitude.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random SD pipeline in diffusers format (not a real model)."""
    from fedsd.ml.model import write_tiny_pipeline
    from fedsd.quality.extractors import MODEL_SUBDIR, write_tiny_extractors

    model = write_tiny_pipeline(tmp_path_factory.mktemp("tiny-model") / "model", seed=0)
    write_tiny_extractors(model / MODEL_SUBDIR, seed=0)  # as `fedsd tiny-model` does
    return model


@pytest.fixture(scope="session")
def bare_app_dir() -> Path:
    """A trivial Message-API Flower app (no torch), for deployment tests and benchmarks."""
    return Path(__file__).resolve().parents[0] / "fixtures" / "bare_app"


# The slowest files first, so that pytest-xdist starts them at once and the quick files
# fill the workers around them; the rest keep their order. Seconds: CI runs on a 2-core
# machine, 4 workers (each file takes ~3x its time alone). Starting with the DP file and
# both SecAgg+ fault deployments instead put the load average at 70 and made the compose
# and fault runs miss their bounds; this is the order of the fastest run (pytest 22.5 min),
# but for the hung-node test, moved to the end.
SLOWEST_FIRST = [
    "test_containers.py",  # a compose run through podman: 600-750 s
    "test_k8s.py",  # the manifests' pods as a federation: 560-850 s
    "test_privacy_ledger_e2e.py",  # three DP-SGD ups on one OUT, and a refusal: 290-370 s
    "test_privacy_e2e_secagg.py",  # five modes, one deployment: 330-400 s
    "test_privacy_e2e_dp.py",  # five modes, one deployment: 650-940 s (310 s alone)
    "test_faults.py",  # four deployments, three SIGKILLs and a full disk: 280-450 s
    "test_secagg_dropout.py",  # two SecAgg+ deployments, 5 and 3 rounds: 400-570 s
    "test_fault_launcher.py",  # launcher runs stopped, and one resubmitted: 290-400 s
    "test_integrity_e2e.py",  # five nodes (three rogue), two runs: 270-410 s
    "test_e2e.py",  # fedsd up, a restart, Prometheus: 250-300 s
    "test_observability.py",
    "test_deploy.py",
    "test_metrics.py",
    # A 40 s round deadline that healthy nodes must meet: late, when the load has eased
    # (it missed it at load 36, in the third place of its worker).
    "test_fault_hung_node.py",  # 200-260 s
]


def pytest_collection_modifyitems(config, items):
    def key(item):
        name = item.path.name
        rank = SLOWEST_FIRST.index(name) if name in SLOWEST_FIRST else len(SLOWEST_FIRST)
        # Within a file, `heavy` tests first: xdist hands a worker its next file once two
        # or fewer of its tests are pending, which must not happen behind a long test.
        return (rank, item.get_closest_marker("heavy") is None)

    items.sort(key=key)  # stable: the order inside a file is kept otherwise


@dataclass(frozen=True)
class CiImages:
    """The images docker/build.sh built: service name -> image reference."""

    images: dict[str, str]
    build_seconds: float
    build_output: str
    base: str  # what they are built on (tests/support/k8s_federation.py adds Prometheus to it)


@pytest.fixture(scope="session")
def ci_images() -> CiImages:
    """The CPU images (localhost/fedsd-<service>:$FEDSD_IMAGE_TAG, default ci), built once
    per test session with docker/build.sh (podman): the container test and the Kubernetes
    test share them. Fails, never skips, on a machine without podman or the base image."""
    hint = "set the machine up with: bash docker/ci-setup.sh .venv (as root)"
    podman = shutil.which("podman")
    if podman is None:
        pytest.fail(f"`podman` not found: the image build needs it; {hint}")
    base = os.environ.get("FEDSD_BASE_IMAGE", "localhost/fedsd-base:bookworm")
    if subprocess.run([podman, "image", "exists", base], timeout=60).returncode != 0:
        pytest.fail(f"base image {base} not found; {hint}")
    tag = os.environ.get("FEDSD_IMAGE_TAG", "ci")
    t0 = time.monotonic()
    try:
        output = build_images(tag)  # host-wide lock: one xdist worker builds, others reuse
    except RuntimeError as exc:
        pytest.fail(str(exc))
    services = ("superlink", "supernode", "serverapp", "fleet-proxy")
    return CiImages(
        {svc: f"localhost/fedsd-{svc}:{tag}" for svc in services},
        time.monotonic() - t0,
        output,
        base,
    )


_SHARD_CACHE: dict[tuple[int, int], Path] = {}


def synthetic_shards(root: Path, nodes: int, images: int) -> Path:
    """``fedsd shards --source synthetic`` into ``root/shards``: ``nodes`` shards of
    ``images`` images each. Made once per test process and size by a real process, as a
    user runs it (~6 CPU-s, flwr-datasets' import), then copied: the files are the
    same for the same arguments (seeded), and each test gets its own copy."""
    key = (nodes, images)
    if key not in _SHARD_CACHE:
        made = Path(tempfile.mkdtemp(prefix=f"fedsd-shards-{nodes}x{images}-")) / "shards"
        atexit.register(shutil.rmtree, made.parent, True)
        subprocess.run(
            [sys.executable, "-m", "fedsd.cli", "shards", "--source", "synthetic"]
            + ["--num-shards", str(nodes), "--synthetic-images", str(images), "--out", str(made)],
            check=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
            timeout=300,
        )
        _SHARD_CACHE[key] = made
    shards = root / "shards"
    shutil.copytree(_SHARD_CACHE[key], shards)
    return shards


def changed_app_copy(app: Path, dst: Path, parts: tuple[str, ...] = ()) -> Path:
    """A copy of the Flower app ``app`` (only ``parts`` of it, when given) with one byte
    added to one of its Python sources: another app, whose FAB hashes differently."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    if parts:
        dst.mkdir(parents=True)
        for part in parts:
            src = app / part
            if src.is_dir():
                shutil.copytree(src, dst / part, ignore=ignore)
            else:
                shutil.copy2(src, dst / part)
    else:
        shutil.copytree(app, dst, ignore=ignore)
    source = sorted(dst.rglob("*.py"))[-1]
    source.write_bytes(source.read_bytes() + b"#")
    return dst


def node_configs(shards: Path, nodes: int, cache: Path) -> list[dict]:
    """The SuperNodes' node config for ``LocalDeployment``: shard i for node i."""
    return [
        {"partition-id": i, "shard-dir": str(shards / f"shard-{i}"), "cache-dir": str(cache)}
        for i in range(nodes)
    ]


# --------------------------------------------------------------------------- one real run


def free_port_block(n: int) -> int:
    """A base port with ``n`` free ports after it, below Linux's ephemeral range (32768+):
    fixed ports in that range can be taken by any outgoing connection's source port."""
    import random
    import socket

    for _ in range(50):
        base = random.randrange(20000, 32000 - n)
        socks = []
        try:
            for p in range(base, base + n):
                sk = socket.socket()
                socks.append(sk)
                sk.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for sk in socks:
                sk.close()
    raise RuntimeError("no block of free ports")


E2E_NODES = 2
# DP-SGD with a fixed noise multiplier, so every round reports epsilon, and a target far
# above it: the budget is exported (fedsd_*_epsilon_budget) and never reached.
# Image quality of the base model and of every round, with the tiny stand-in extractors.
E2E_RUN_CONFIG = (
    "resolution=64 learning-rate=0.001 dp-noise-multiplier=1.0 dp-target-epsilon=1000 "
    "eval-every=1 eval-steps=2 eval-images-per-class=2"
)


@dataclass
class E2ERun:
    """``fedsd up --local`` through the CLI, watched by a real Prometheus when installed."""

    returncode: int
    stdout: str  # stdout and stderr, in order
    out: Path
    shards: Path
    metrics_base: int
    prometheus: str | None  # http://127.0.0.1:PORT, None when prometheus is not installed
    prometheus_error: str | None
    started: float  # unix time: every SuperNode online
    finished: float  # unix time: the run's final status printed, before the teardown


def fedsd_up_argv(tiny_model, shards, out, rounds: int, metrics_base: int) -> list[str]:
    """The e2e tests' `fedsd up --local` command line."""
    return [
        sys.executable,
        "-m",
        "fedsd.cli",
        "up",
        "--local",
        "--nodes",
        str(E2E_NODES),
        "--rounds",
        str(rounds),
        "--model",
        str(tiny_model),
        "--shards",
        str(shards),
        "--out",
        str(out),
        "--privacy",
        "dp-sample",
        "--run-config",
        E2E_RUN_CONFIG,
        "--timeout",
        "600",
        "--metrics-port",
        str(metrics_base),
    ]


def run_fedsd_up(argv: list[str]) -> tuple[int, str, float, float]:
    """Run it; return (exit status, output, unix time all nodes were online, unix time the
    final status was printed)."""
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    lines, started, finished = [], 0.0, 0.0
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if not started and "SuperNode(s) online" in line:
            started = time.time()
        if "fedsd up: run " in line and (" finished:" in line or " ended as " in line):
            finished = time.time()
    code = proc.wait(timeout=700)
    return code, "".join(lines), started, finished or time.time()


@contextlib.contextmanager
def prometheus_server(root: Path, port: int, targets: list) -> Iterator[tuple[str | None, str]]:
    """A real Prometheus on 127.0.0.1:port scraping ``targets`` every second, with the
    repository's alert rules; yields (url or None, why not)."""
    from fedsd.observability.scrape import ALERTS, prometheus_config

    binary = shutil.which("prometheus")
    if binary is None:
        yield None, "prometheus is not installed: run bash docker/ci-observability.sh (root)"
        return
    root.mkdir(parents=True, exist_ok=True)
    config = root / "prometheus.yml"
    config.write_text(
        prometheus_config(targets, scrape_interval="1s", rule_files=(str(ALERTS),)),
        encoding="utf-8",
    )
    log = (root / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={root / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                yield None, f"prometheus did not start: {(root / 'prometheus.log').read_text()}"
                return
            time.sleep(0.2)
        yield url, ""
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="session")
def e2e_run(tiny_model, tmp_path_factory) -> Iterator[E2ERun]:
    """`fedsd up --local --nodes 2 --rounds 2` once, through the real CLI, with DP-SGD and
    metrics on explicit free ports, scraped by a real Prometheus (tests/e2e/test_e2e.py and
    tests/e2e/test_observability.py share it: one deployment for both)."""
    from fedsd.observability.scrape import MetricsPorts, targets

    root = tmp_path_factory.mktemp("e2e")
    shards = synthetic_shards(root, E2E_NODES, 24)
    # base: SuperLink exporter, +1 ServerApp, +2 Prometheus, +10+i SuperNode i
    base = free_port_block(MetricsPorts(0).node(E2E_NODES))
    out = root / "out"
    scrape = targets(E2E_NODES, "127.0.0.1", base)
    with prometheus_server(root / "prometheus", base + 2, scrape) as (url, why):
        code, output, started, finished = run_fedsd_up(
            fedsd_up_argv(tiny_model, shards, out, 2, base)
        )
        yield E2ERun(code, output, out, shards, base, url, why or None, started, finished)
