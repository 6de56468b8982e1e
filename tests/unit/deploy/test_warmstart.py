"""Warm ClientApp starts: the shim forks flwr-clientapp from the launcher, or runs the
real one without it; forked children never share random streams."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from fedsd.deploy.warmstart import SOCKET_ENV, install_shim, reseed_after_fork


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


def test_shim_waits_for_a_launcher_that_is_still_importing(tmp_path):
    """A shim started while its launcher imports (announced, alive, not yet listening) is
    forked by it once it listens, instead of importing everything again beside it; with a
    dead launcher's announcement left behind it starts at once in a fresh interpreter."""
    sock = tmp_path / "l.sock"
    shim = install_shim(tmp_path / "bin")
    env = {**os.environ, SOCKET_ENV: str(sock)}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "fedsd.cli", "app-launcher", "--socket", str(sock)]
        + ["--preload", "numpy", "torch", "flwr.supernode.cli"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        announced = tmp_path / "l.sock.pid"
        deadline = time.monotonic() + 60
        while not announced.exists():
            assert launcher.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        assert not sock.exists()  # still importing torch
        ok = subprocess.run([str(shim), "--help"], capture_output=True, text=True, env=env)
        assert ok.returncode == 0 and "Run a Flower ClientApp" in ok.stdout
    finally:
        launcher.terminate()
        log, _ = launcher.communicate(timeout=30)
    assert log.count("started flwr-clientapp pid") == 1, log  # forked, not run cold
    assert not announced.exists() and not sock.exists()
    announced.write_text(f"{launcher.pid}\n")  # a launcher that died: no wait
    t0 = time.monotonic()
    cold = subprocess.run(
        [str(shim), "--help"],
        capture_output=True,
        text=True,
        env={**env, "FEDSD_LAUNCHER_WAIT": "600"},
    )
    assert cold.returncode == 0 and time.monotonic() - t0 < 300


@pytest.mark.parametrize("mode", ["hooks", "ew", "functorch"])
def test_mode_names_are_accepted_by_privacy_config(mode):
    from fedsd.privacy import PrivacyConfig

    assert PrivacyConfig(dp_grad_sample_mode=mode).dp_grad_sample_mode == mode


def test_local_services_share_one_launcher_unless_their_environments_differ(tmp_path):
    """fedsd up --local: the ServerApp and the SuperNodes fork their apps from one launcher
    (one torch import for all) when their environments agree but for what is each one's
    own (FLWR_HOME, metrics directory, app pins), which stays out of the launcher; other
    torch threads get another; a node given its own launcher (an environment that changes
    the interpreter) gets it."""
    from fedsd.deploy.local import APP_OWN_ENV, LocalDeployment

    dep = LocalDeployment(tmp_path / "deploy", 3, warm_apps=True)
    started: dict[str, dict[str, str]] = {}

    def record(name, argv, env):
        assert argv[-3:] == ["app-launcher", "--socket", str(dep._launcher_socket(name))]
        started[name] = dict(env)
        dep.services[name] = None  # what _start registers
        return None

    dep._start = record
    base = {**dep.env, "PROMETHEUS_MULTIPROC_DIR": "/m/server"}
    server = dep.app_launcher("flwr-serverapp", base)
    nodes = [
        dep.app_launcher("flwr-clientapp", {**base, "FLWR_HOME": f"/h/{i}", "FEDSD_APP_DIR": "/a"})
        for i in (0, 1)
    ]
    threads = dep.app_launcher("flwr-clientapp", {**base, "OMP_NUM_THREADS": "7"})
    rogue = dep.app_launcher("flwr-clientapp", {**base, "PYTHONPATH": "/r"}, own="launcher-2")
    assert list(started) == ["launcher-apps", "launcher-apps-2", "launcher-2"]
    sock = str(dep._launcher_socket("launcher-apps"))
    assert server[SOCKET_ENV] == nodes[0][SOCKET_ENV] == nodes[1][SOCKET_ENV] == sock
    assert server["PATH"].split(os.pathsep)[0].endswith("flwr-serverapp")
    assert nodes[0]["PATH"].split(os.pathsep)[0].endswith("flwr-clientapp")
    assert threads[SOCKET_ENV] == str(dep._launcher_socket("launcher-apps-2"))
    assert rogue[SOCKET_ENV] == str(dep._launcher_socket("launcher-2"))
    assert not set(APP_OWN_ENV) & set(started["launcher-apps"])
    assert started["launcher-2"]["PYTHONPATH"] == "/r"


def test_a_bad_launcher_wait_is_refused_with_the_setting_named(tmp_path, monkeypatch):
    from fedsd.deploy.warmstart import WAIT_ENV, _wait_while_starting

    sock = tmp_path / "l.sock"
    (tmp_path / "l.sock.pid").write_text(f"{os.getpid()}\n")  # a live launcher, starting
    monkeypatch.setenv(WAIT_ENV, "soon")
    with pytest.raises(SystemExit, match="FEDSD_LAUNCHER_WAIT='soon' is not a number"):
        _wait_while_starting(str(sock))
