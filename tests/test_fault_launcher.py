"""The compose/Kubernetes launcher (docker/launch.py run) stops the run when it gives up.

No containers: the launcher runs as a real process, as the images run it (`python
launch.py run`, settings in FEDSD_* variables), against a real local TLS deployment. It
gives up once on FEDSD_TIMEOUT and once on SIGTERM (`docker compose stop`, a deleted
Job); each time it must stop the run with `flwr stop`, print the status the SuperLink
reports and exit non-zero, and the SuperLink must list the run as finished:stopped.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import node_configs, synthetic_shards

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]


def _launcher(dep, tiny_model, out: Path, tmp: Path, timeout: str) -> subprocess.Popen:
    from fedsd.deploy import find_app_dir

    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "TMPDIR": str(tmp),
        "SUPERLINK_ADDRESS": dep.address,
        "FEDSD_CA_CERT": str(dep.certs.ca_cert),
        "FEDSD_NUM_NODES": "2",
        "FEDSD_ROUNDS": "50",  # far more than the launcher waits for
        "FEDSD_MODEL": str(tiny_model),
        "FEDSD_OUT_DIR": str(out),
        "FEDSD_RUN_CONFIG": "resolution=64",
        "FEDSD_TIMEOUT": timeout,
        "FEDSD_APP_DIR": str(find_app_dir()),
        "FEDSD_STARTUP_TIMEOUT": "30",
    }
    return subprocess.Popen(
        [sys.executable, str(ROOT / "docker" / "launch.py"), "run"],
        env=env,
        cwd=tmp,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _stopped_run(dep, output: str) -> str:
    """The run the launcher says it stopped; the SuperLink must list it finished:stopped."""
    m = re.search(r"giving up \(.*\): stopping run (\d+)", output)
    assert m, output[-3000:]
    run_id = m.group(1)
    assert f"run {run_id} stopped: status finished:stopped" in output, output[-3000:]
    status, _ = dep.run_status(run_id)
    assert status == "finished:stopped"
    return run_id


def test_launcher_stops_the_run_on_timeout_and_on_sigterm(tiny_model, tmp_path):
    from fedsd.deploy import LocalDeployment

    shards = synthetic_shards(tmp_path, 2, 16)
    configs = node_configs(shards, 2, tmp_path)
    with LocalDeployment(
        tmp_path / "deploy", 2, node_configs=configs, stream=lambda _: None, warm_apps=True
    ) as dep:
        dep.start()

        # 1. FEDSD_TIMEOUT: the launcher gives up, stops the run, exits 124.
        t0 = time.monotonic()
        proc = _launcher(dep, tiny_model, tmp_path / "out-timeout", tmp_path, "20")
        output, _ = proc.communicate(timeout=120)
        print(f"timeout case: launcher exited {proc.returncode} after {time.monotonic() - t0:.1f}s")
        assert proc.returncode == 124, output[-3000:]
        first = _stopped_run(dep, output)

        # 2. SIGTERM once the run is going: the same, exit 128+15.
        proc = _launcher(dep, tiny_model, tmp_path / "out-sigterm", tmp_path, "")
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "Successfully started run" in line:
                break
        time.sleep(3)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=90)
        output = "".join(lines) + rest
        print(f"SIGTERM case: launcher exited {proc.returncode} {time.monotonic() - t0:.1f}s later")
        assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
        assert "SIGTERM" in output
        second = _stopped_run(dep, output)
        assert second != first
