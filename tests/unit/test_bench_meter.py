"""bench/common.ProcessMeter, which bench/scale.py's memory and CPU figures come from:
real processes, counted by the service they descend from."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# bench/common.py by path: the bench directory stays off sys.path (its module names are
# generic: common, quality, scale).
_SPEC = importlib.util.spec_from_file_location(
    "fedsd_bench_common", Path(__file__).resolve().parents[2] / "bench" / "common.py"
)
_BENCH = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(_BENCH)
ProcessMeter, service_role = _BENCH.ProcessMeter, _BENCH.service_role

# A parent that starts a child which holds 64 MB and burns CPU until killed.
CHILD = "b = b'x' * (64 * 2**20)\nwhile True: sum(range(10000))"
PARENT = (
    "import subprocess, sys, time\n"
    f"subprocess.Popen([sys.executable, '-c', {CHILD!r}])\n"
    "time.sleep(60)"
)


@dataclass
class _Service:
    pid: int


def test_service_roles_drop_the_index():
    assert service_role("supernode-12") == "supernode"
    assert service_role("launcher-apps-2") == "launcher-apps"
    assert service_role("superlink") == "superlink"
    assert service_role("metrics-node-0") == "metrics-node"


def test_meter_counts_a_services_descendants():
    proc = subprocess.Popen([sys.executable, "-c", PARENT], start_new_session=True)
    try:
        services = {"supernode-0": _Service(proc.pid)}
        with ProcessMeter(services, interval=0.2) as meter:
            time.sleep(1.5)
            first = meter.cpu()["supernode"]
            time.sleep(1.0)
            second = meter.cpu()["supernode"]
        assert second - first > 0.3  # the child's busy loop counts for its service
        assert meter.peak_pss["supernode"] > 64 * 2**20  # and so does its memory
    finally:
        subprocess.run(["pkill", "-KILL", "-s", str(proc.pid)], check=False)
        proc.kill()
        proc.wait()
