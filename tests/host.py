"""What the container and Kubernetes tests need from the host: its commands, and the :ci
images, built once per test session even with several pytest-xdist workers.

The container test and the Kubernetes federation test run the same images; whichever
needs them first builds them (docker/build.sh, podman's layer cache makes a second build a
few seconds per image) under a host-wide lock, so two workers never build side by side."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LOCK = Path("/tmp/fedsd-image-build.lock")


def build_images(tag: str, timeout: float = 3000) -> str:
    """Build (or refresh from cache) every image with ``docker/build.sh --tag TAG``.
    Returns build.sh's report: one line per image with its build seconds and size."""
    with LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        t0 = time.monotonic()
        res = subprocess.run(
            ["bash", str(REPO / "docker" / "build.sh"), "--tag", tag],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if res.returncode != 0:
            raise RuntimeError(
                f"docker/build.sh --tag {tag} exited {res.returncode}:\n{res.stdout}\n{res.stderr}"
            )
        return f"{res.stdout}built in {time.monotonic() - t0:.0f} s"


def tool(name: str, hint: str) -> str:
    """A command from this venv (it need not be activated) or PATH; fail, never skip,
    saying how to get it (``hint``)."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"`{name}` not found: {hint}")
    return found
