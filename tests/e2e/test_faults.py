"""Faults survived: a real TLS ``fedsd up --local`` (tiny model, synthetic shards, 64 px)
loses one component mid-round to a real SIGKILL, or its OUT disk fills up, and still
finishes every round.

The four faults run as parallel deployments in one test (they are independent), each on
its own OUT, ports and work dir. Three are killed one second after their round 1 was
saved, i.e. while round 2 is in flight. The fourth writes its OUT to a small tmpfs that a
filler file fills once round 1 is saved: round 2's checkpoint cannot be written, the run
stops naming round 1, and the same command resumes after round 1 once the filler is gone.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import synthetic_shards
from tests.e2e.test_deploy import _wait_no_leftovers
from tests.support.fault_runs import REPO, ROUND_DONE, run_up, saved_at, started_pid, up_argv

pytestmark = pytest.mark.e2e

# The link fails a killed node after <= 60 s (2 missed heartbeats) and lets it rejoin only
# then: later rounds are short, so the node fault gets some to come back in.
ROUNDS = {"supernode": 8, "superlink": 3, "serverapp": 3, "disk": 2}
PLAIN = "resolution=64 min-nodes=2 round-timeout=300.0"


@dataclass
class Fault:
    """One deployment, the component it loses, and what was seen."""

    name: str
    nodes: int
    out: Path
    lines: list[str] = field(default_factory=list)
    killed_at: float | None = None  # unix time
    killed_pid: int | None = None
    code: int | None = None

    @property
    def recovery(self) -> float | None:
        """Seconds from the kill to the next round saved (each round's adapter records the
        wall-clock time it was saved)."""
        after = [t for t in saved_at(self.out).values() if self.killed_at and t > self.killed_at]
        return min(after) - self.killed_at if after and self.killed_at else None


def _victim(fault: Fault) -> int | None:
    """The pid to kill: from the runner's `started NAME (pid N)` lines, or for the
    ServerApp the warm launcher's log (the ServerApp is forked there).

    The last ServerApp still alive: under load Flower's SuperExec may start a second
    ``flwr-serverapp`` for the run while the first waits for the launcher; the one that
    loses the run's token exits at once (seen in CI: a launcher that took 92 s to import
    forked both, and the later pid was already gone)."""
    if fault.name == "serverapp":
        logs = (fault.out / ".deploy" / "logs").glob("launcher-*.log")
        text = "".join(log.read_text() for log in logs)
        found = [int(p) for p in re.findall(r"started flwr-serverapp pid (\d+)", text)]
        alive = [pid for pid in found if Path(f"/proc/{pid}").exists()]
        return alive[-1] if alive else None
    return started_pid(
        fault.lines, {"supernode": "supernode-2", "superlink": "superlink"}[fault.name]
    )


def _run(fault: Fault, tiny_model: Path, shards: Path) -> None:
    def on_line(line: str) -> None:
        m = ROUND_DONE.search(line)
        if m and int(m.group(1)) == 1 and fault.killed_at is None:
            time.sleep(1.0)  # round 2 is in flight
            pid = _victim(fault)
            if pid is not None:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:  # gone on its own: "never killed" says so below
                    return
                fault.killed_pid, fault.killed_at = pid, time.time()

    argv = up_argv(
        fault.out,
        nodes=fault.nodes,
        rounds=ROUNDS[fault.name],
        model=tiny_model,
        shards=shards,
        run_config=PLAIN,
    )
    fault.code = run_up(argv, fault.lines, on_line)


# --------------------------------------------------------------------------- full disk


@dataclass
class DiskFault:
    """The full-disk deployment: two ``fedsd up`` runs of one command on one OUT."""

    out: Path  # a tmpfs
    work: Path  # --work-dir: the deployment's state, logs and caches stay off the tmpfs
    size: str = "4m"
    runs: list[list[str]] = field(default_factory=lambda: [[], []])
    codes: list[int | None] = field(default_factory=lambda: [None, None])
    at: dict[str, float] = field(default_factory=dict)  # unix times
    figures: dict[str, int] = field(default_factory=dict)
    left: dict = field(default_factory=dict)  # OUT as the full disk left it

    @property
    def filler(self) -> Path:
        return self.out / "filler"

    def fill(self, line: str) -> None:
        """Once round 1 is saved, leave room for one adapter and a half: round 2's
        round-2/ fits, its latest/ does not."""
        if "fedsd round 1/" not in line or self.filler.exists():
            return
        adapter = sum(-(-p.stat().st_size // 4096) * 4096 for p in (self.out / "round-1").iterdir())
        st = os.statvfs(self.out)
        free = st.f_bavail * st.f_frsize
        leave = adapter + adapter // 2
        with self.filler.open("wb") as fh:
            fh.write(b"\0" * max(0, free - leave))
            fh.flush()
            os.fsync(fh.fileno())
        self.figures.update(adapter=adapter, free_before=free, left=leave)
        self.at["filled"] = time.time()


def _mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"mount {' '.join(args)} failed: {done.stderr.strip()}"


def _snapshot(out: Path) -> dict:
    """What OUT holds: the recorded rounds, its entries, each round's adapter."""
    from fedsd.ml.model import load_adapter_arrays

    rounds = json.loads((out / "history.json").read_text())["rounds"]
    return {
        "rounds": [r["round"] for r in rounds],
        "entries": sorted(p.name for p in out.iterdir()),
        "adapters": {
            d.name: load_adapter_arrays(d)
            for d in out.iterdir()
            if d.is_dir() and (d / "fedsd_adapter.json").is_file()
        },
    }


def _run_disk(fault: DiskFault, tiny_model: Path, shards: Path) -> None:
    argv = up_argv(
        fault.out,
        nodes=2,
        rounds=ROUNDS["disk"],
        model=tiny_model,
        shards=shards,
        run_config=PLAIN,
        extra=("--work-dir", str(fault.work)),
    )
    fault.at["start"] = time.time()
    fault.codes[0] = run_up(argv, fault.runs[0], fault.fill)
    fault.at["stopped"] = time.time()
    fault.left = _snapshot(fault.out)
    fault.filler.unlink(missing_ok=True)  # space is back: the same command again
    fault.at["rerun"] = time.time()
    fault.codes[1] = run_up(argv, fault.runs[1])
    fault.at["finished"] = time.time()


def _check_disk(fault: DiskFault) -> str:
    """The full disk stopped the run naming round 1, left round 1 intact, and the same
    command resumed after it; returns the figures."""
    first, second = "".join(fault.runs[0]), "".join(fault.runs[1])
    assert "filled" in fault.at, f"round 1 was never saved:\n{first[-6000:]}"
    assert fault.codes[0] == 1, f"exit {fault.codes[0]}\n{first[-6000:]}"
    said = re.search(
        r"disk full writing (\S+) \(out-dir [^)]+\): [^;]+; the last good checkpoint is "
        r"round (\d+); free space and rerun the same command to resume",
        first,
    )
    assert said and said.group(2) == "1", first[-6000:]
    assert "resubmitting" not in first, first[-6000:]  # the app's own verdict: not retried
    left = fault.left
    assert left["rounds"] == [1], left["rounds"]
    assert not [e for e in left["entries"] if ".tmp" in e], left["entries"]
    one, latest = left["adapters"]["round-1"], left["adapters"]["latest"]
    assert sorted(one) == sorted(latest) and all(np.isfinite(v).all() for v in one.values())
    assert all(np.array_equal(one[k], latest[k]) for k in one)  # latest/ is still round 1
    assert fault.codes[1] == 0, second[-6000:]
    assert "resuming after round 1" in second, second[-6000:]
    done = _snapshot(fault.out)
    assert done["rounds"] == [1, 2], done["rounds"]
    assert all(np.array_equal(done["adapters"]["round-1"][k], one[k]) for k in one)
    assert all(np.isfinite(v).all() for a in done["adapters"].values() for v in a.values())
    saved = saved_at(fault.out)
    f, at = fault.figures, fault.at
    return (
        f"disk: tmpfs {fault.size}, adapter {f['adapter'] // 1024} KiB, "
        f"{f['left'] // 1024} KiB left after round 1; the run stopped "
        f"{at['stopped'] - at['filled']:.1f}s after the disk filled, writing {said.group(1)}; "
        f"the rerun saved round 2 {saved[2] - at['rerun']:.1f}s after it started "
        f"(finished in {at['finished'] - at['rerun']:.1f}s)"
    )


@pytest.mark.heavy
@pytest.mark.timeout(1200)  # four deployments side by side, each run bounded at 600 s
def test_killed_supernode_superlink_and_serverapp_and_a_full_disk_runs_finish(tiny_model, tmp_path):
    from fedsd.ml.model import load_adapter_arrays

    shards = synthetic_shards(tmp_path, 3, 12)
    faults = [
        Fault("supernode", 3, tmp_path / "out-supernode"),
        Fault("superlink", 2, tmp_path / "out-superlink"),
        Fault("serverapp", 2, tmp_path / "out-serverapp"),
    ]
    only = os.environ.get("FEDSD_FAULTS")  # e.g. "superlink" to run one while debugging
    faults = [f for f in faults if not only or f.name in only.split(",")]
    disk = DiskFault(tmp_path / "out-disk", tmp_path / "work-disk")
    root = os.geteuid() == 0  # mounting the small tmpfs needs it (CI runs as root)
    with_disk = root and (not only or "disk" in only.split(","))
    threads = [threading.Thread(target=_run, args=(f, tiny_model, shards)) for f in faults]
    if with_disk:
        disk.out.mkdir()
        _mount("-t", "tmpfs", "-o", f"size={disk.size}", "tmpfs", str(disk.out))
        threads.append(threading.Thread(target=_run_disk, args=(disk, tiny_model, shards)))
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=900)
        report = []
        for fault in faults:  # the measurements first, so that a failure still shows them
            print(f"{fault.name}: exit {fault.code}; next round saved {fault.recovery}s after")
        for fault in faults:
            said = "".join(fault.lines[-80:])
            assert fault.killed_at is not None, f"{fault.name}: never killed\n{said}"
            assert fault.code == 0, f"{fault.name}: exit {fault.code}\n{said}"
            rounds = json.loads((fault.out / "history.json").read_text())["rounds"]
            assert [r["round"] for r in rounds] == list(range(1, ROUNDS[fault.name] + 1)), said
            for r in range(1, ROUNDS[fault.name] + 1):
                adapter = load_adapter_arrays(fault.out / f"round-{r}")
                assert adapter and all(np.isfinite(v).all() for v in adapter.values())
            assert _wait_no_leftovers(fault.out / ".deploy") == [], fault.name
            text = "".join(fault.lines)
            if fault.name == "supernode":
                assert "restarted supernode-2" in text, said
                back = [r["round"] for r in rounds if r["round"] > 2 and r["nodes_replied"] == 3]
                assert back, rounds  # it trained again in a later round
            if fault.name == "superlink":
                assert "restarted superlink" in text, said
            if fault.name == "serverapp":
                assert "resubmitting" in text and "resuming after round" in text, said
            report.append(f"{fault.name}: next round saved {fault.recovery:.1f}s after the kill")
        if with_disk:
            report.append(_check_disk(disk))
            assert _wait_no_leftovers(disk.work) == [], "disk"
        print("\n".join(report))
        (tmp_path / "recovery.txt").write_text("\n".join(report) + "\n")
    finally:
        if with_disk:
            subprocess.run(["umount", str(disk.out)], timeout=60, check=False)
    if not root:
        pytest.skip(
            "the kill faults passed; the full-disk deployment was not run: it mounts a "
            "small tmpfs, which needs root (CI runs as root)"
        )


def test_resubmit_only_runs_lost_not_failed_by_the_app():
    from fedsd.deploy.submission import RunResult, resubmittable

    app_failed = RunResult(1, "7", "finished:failed", "ServerApp failed with exception: x")
    assert resubmittable(RunResult(1, "7", "lost", "the ServerApp process died"))
    assert not resubmittable(app_failed)  # bad config, too few nodes, budget, disk full
    assert resubmittable(app_failed, services_restarted=True)  # raised as the link died
    assert resubmittable(RunResult(1, "7", "finished:failed", "Task failed because ..."))
    assert not resubmittable(RunResult(1, "7", "finished:stopped", None))
    assert not resubmittable(RunResult(124, "7", "timeout", None))
    assert not resubmittable(RunResult(1, None, "not-submitted", None))


def test_supervisor_restarts_with_backoff_then_gives_up(tmp_path):
    """A service that keeps dying is restarted ``max_restarts`` times, each restart logged,
    then the deployment gives up naming it and the limit."""
    from fedsd.common.errors import DeployError
    from fedsd.deploy.local import LocalDeployment
    from fedsd.deploy.supervisor import RestartPolicy

    said: list[str] = []
    policy = RestartPolicy(max_restarts=2, backoff=0.1, max_backoff=0.2)
    assert [policy.delay(n) for n in range(3)] == [0.1, 0.2, 0.2]
    env = {"PYTHONPATH": str(REPO)}  # the recorder imports this checkout's fedsd
    dep = LocalDeployment(
        tmp_path / "w", 1, stream=said.append, restart=policy, metrics_port=1, extra_env=env
    )
    prom_dir = tmp_path / "w" / "metrics" / "metrics-serverapp"  # the ServerApp exporter's
    prom_dir.mkdir(parents=True)
    try:
        dep._start("flaky", [sys.executable, "-c", "raise SystemExit(3)"])
        deadline = time.monotonic() + 60
        with pytest.raises(DeployError, match=r"flaky exited with status 3 after 2 restart"):
            while time.monotonic() < deadline:
                dep.supervise()
                time.sleep(0.05)
        assert dep.restarts == {"flaky": 2}
        assert sum("restarted flaky" in line for line in said) == 2, said
        for recorder in dep.supervisor._recorders:
            recorder.wait(timeout=60)
        got = subprocess.run(
            [sys.executable, "-c", _READ_RESTARTS, str(prom_dir)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert got.stdout.strip() == "flaky 2.0", got.stdout + got.stderr
    finally:
        dep.stop()


_READ_RESTARTS = """
import sys
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
registry = CollectorRegistry()
MultiProcessCollector(registry, path=sys.argv[1])
for metric in registry.collect():
    for sample in metric.samples:
        if sample.name == "fedsd_service_restarts_total":
            print(sample.labels["service"], sample.value)
"""
