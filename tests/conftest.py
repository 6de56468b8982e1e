"""Shared fixtures. Everything is built in code: nothing is downloaded."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.images import build_images

REPO = Path(__file__).resolve().parent.parent

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
    from fedsd.model import write_tiny_pipeline

    return write_tiny_pipeline(tmp_path_factory.mktemp("tiny-model") / "model", seed=0)


@pytest.fixture(scope="session")
def bare_app_dir() -> Path:
    """A trivial Message-API Flower app (no torch), for deployment tests and benchmarks."""
    return Path(__file__).parent / "fixtures" / "bare_app"


# The slowest files first (measured on a 2-core machine), so that pytest-xdist starts them
# at once and the quick files fill the other workers around them; the rest keep their order.
SLOWEST_FIRST = [
    "test_containers.py",  # image builds and a compose run through podman: ~12 min cold
    "test_k8s.py",  # the manifests' pods as a federation: ~3 min
    "test_privacy_e2e_secagg.py",
    "test_privacy_e2e_dp.py",
    "test_secagg_dropout.py",
    "test_e2e.py",
    "test_observability.py",
    "test_deploy.py",
    "test_metrics.py",
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
    )
