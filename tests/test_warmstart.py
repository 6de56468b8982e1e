"""Warm ClientApp starts: the shim forks flwr-clientapp from the launcher, or runs the
real one without it; forked children never share random streams."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from fedsd.warmstart import SOCKET_ENV, install_shim, reseed_after_fork


def _child_draws(read_fd, write_fd):
    import numpy as np
    import torch

    pid = os.fork()
    if pid == 0:
        reseed_after_fork()
        os.write(write_fd, f"{torch.rand(1).item()!r} {np.random.rand()!r}\n".encode())
        os._exit(0)
    os.waitpid(pid, 0)
    return os.read(read_fd, 200).decode()


def test_forked_children_draw_different_random_numbers():
    import numpy as np
    import torch

    torch.manual_seed(0)
    np.random.seed(0)
    r, w = os.pipe()
    first, second = _child_draws(r, w), _child_draws(r, w)
    assert first != second


def test_shim_runs_the_real_clientapp_without_a_launcher(tmp_path):
    shim = install_shim(tmp_path / "bin")
    env = {k: v for k, v in os.environ.items() if k != SOCKET_ENV}
    proc = subprocess.run([str(shim), "--help"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and "Run a Flower ClientApp" in proc.stdout


def test_shim_forks_the_clientapp_from_the_launcher(tmp_path):
    sock = tmp_path / "l.sock"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "fedsd.cli", "app-launcher", "--socket", str(sock)]
        + ["--preload", "numpy", "flwr.supernode.cli"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert launcher.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        shim = install_shim(tmp_path / "bin")
        env = {**os.environ, SOCKET_ENV: str(sock)}
        ok = subprocess.run([str(shim), "--help"], capture_output=True, text=True, env=env)
        assert ok.returncode == 0 and "Run a Flower ClientApp" in ok.stdout
        bad = subprocess.run([str(shim), "--no-such-flag"], capture_output=True, text=True, env=env)
        assert bad.returncode == 2 and "flwr-clientapp: error:" in bad.stderr
        assert oct(sock.stat().st_mode & 0o777) == "0o600"
    finally:
        launcher.terminate()
        log, _ = launcher.communicate(timeout=30)
    assert log.count("started flwr-clientapp pid") == 2  # both came from the launcher
    assert not sock.exists()


@pytest.mark.parametrize("mode", ["hooks", "ew", "functorch"])
def test_mode_names_are_accepted_by_privacy_config(mode):
    from fedsd.privacy import PrivacyConfig

    assert PrivacyConfig(dp_grad_sample_mode=mode).dp_grad_sample_mode == mode
