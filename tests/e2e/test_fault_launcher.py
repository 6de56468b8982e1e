"""The compose/Kubernetes launcher (fedsd.deploy.containers.launch run) stops the run when
it gives up, and resubmits a run that was lost.

No containers: the launcher runs as a real process, as the images run it (`python -m
fedsd.deploy.containers.launch run`, settings in FEDSD_* variables), against a real
local TLS deployment. It gives up once on FEDSD_TIMEOUT and once on SIGTERM (`docker
compose stop`, a deleted Job); each time it must stop the run with `flwr stop`, print
the status the SuperLink reports and exit non-zero, and the SuperLink must list the run
as finished:stopped. In another deployment, the run it drives loses its ServerApp
(SIGKILL) and then its SuperLink (SIGKILL, restarted as compose's restart policy would);
the launcher resubmits it once or twice (the run may survive the SuperLink's outage) and
it completes, every round once. The decisions
themselves (what is lost, the limit, the outage rule) are unit-tested on scripted
outcomes.
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
from pathlib import Path
from queue import Empty, Queue

import pytest

from fedsd.deploy.submission import SUBMIT_GRACE_S
from tests.conftest import node_configs, synthetic_shards

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def _launcher(
    dep, tiny_model, out: Path, tmp: Path, timeout: str, rounds: str = "50"
) -> subprocess.Popen:
    from fedsd.deploy.run_config import find_app_dir

    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "TMPDIR": str(tmp),
        "SUPERLINK_ADDRESS": dep.address,
        "FEDSD_CA_CERT": str(dep.certs.ca_cert),
        "FEDSD_NUM_NODES": "2",
        "FEDSD_ROUNDS": rounds,  # by default far more than the launcher waits for
        "FEDSD_MODEL": str(tiny_model),
        "FEDSD_OUT_DIR": str(out),
        "FEDSD_RUN_CONFIG": "resolution=64",
        "FEDSD_TIMEOUT": timeout,
        "FEDSD_APP_DIR": str(find_app_dir()),
        "FEDSD_STARTUP_TIMEOUT": "60",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "fedsd.deploy.containers.launch", "run"],
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


def test_launcher_gives_up_stopping_the_run_and_resubmits_a_lost_run(tiny_model, tmp_path):
    """Two deployments side by side (most of each case is waiting: for the timeout, for
    the SuperLink to notice a dead ServerApp, for a stopped ServerApp to exit): one for
    giving up (_stops_the_run), one for resubmission (_resubmits_a_lost_run)."""
    cases = {"stop": _stops_the_run, "resubmit": _resubmits_a_lost_run}
    failures: dict[str, BaseException] = {}
    took: dict[str, float] = {}

    def run(name: str) -> None:
        t0 = time.monotonic()
        try:
            cases[name](tiny_model, tmp_path / name)
        except BaseException as exc:  # noqa: BLE001 - re-raised below, with its traceback
            failures[name] = exc
        took[name] = time.monotonic() - t0

    threads = [threading.Thread(target=run, args=(name,)) for name in cases]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=1200)
    print("case seconds:", json.dumps({k: round(v, 1) for k, v in took.items()}))
    for name, exc in failures.items():
        raise AssertionError(f"case {name} failed") from exc
    assert set(took) == set(cases)


def _stops_the_run(tiny_model, tmp_path: Path) -> None:
    """FEDSD_TIMEOUT, then SIGTERM: each time `flwr stop`, the status read back, non-zero."""
    from fedsd.deploy.local import LocalDeployment

    tmp_path.mkdir()
    shards = synthetic_shards(tmp_path, 2, 16)
    configs = node_configs(shards, 2, tmp_path)
    with LocalDeployment(
        tmp_path / "deploy", 2, node_configs=configs, stream=lambda _: None, warm_apps=True
    ) as dep:
        dep.start()

        # 1. FEDSD_TIMEOUT: the launcher gives up, stops the run, exits 124.
        t0 = time.monotonic()
        proc = _launcher(dep, tiny_model, tmp_path / "out-timeout", tmp_path, "20")
        # 20 s, the submission's grace if the timeout falls mid-upload, `flwr stop` and its
        # 30 s settle
        output, _ = proc.communicate(timeout=20 + SUBMIT_GRACE_S + 30 + 60)
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


# --------------------------------------------------------------------------- resubmission

ROUND_DONE = re.compile(r"fedsd round (\d+)/\d+: ")


def _kill_serverapp(dep) -> list[int]:
    """SIGKILL the ServerApp of the run in flight: the process the warm launcher forked
    (it logs the pid) and what the SuperExec started (the shim waiting for it, or the
    plain ServerApp when the launcher was not ready yet)."""
    log = "".join(p.read_text() for p in dep.log_dir.glob("launcher-*.log"))
    forked = [int(p) for p in re.findall(r"started flwr-serverapp pid (\d+)", log)]
    pids = [p for p in forked[-1:] if Path(f"/proc/{p}").exists()] + dep.serverapp_pids()
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return pids


def _resubmits_a_lost_run(tiny_model, tmp_path: Path) -> None:
    """3 rounds. Round 1 saved: SIGKILL the ServerApp (the SuperLink fails the run once
    it missed its heartbeats; resubmission 1). Round 2 saved: SIGKILL the SuperLink and
    restart it on its state as compose would (the launcher sees it refuse connections;
    once it is back the run is stopped and resubmitted, unless round 3 completed first).
    The run completes, exit 0, every round once and in order, each resubmission logged
    and resumed after the last round."""
    from fedsd.deploy.local import LocalDeployment
    from fedsd.deploy.supervisor import RestartPolicy

    tmp_path.mkdir()
    shards = synthetic_shards(tmp_path, 2, 12)
    configs = node_configs(shards, 2, tmp_path)
    out = tmp_path / "out"
    with LocalDeployment(
        tmp_path / "deploy",
        2,
        node_configs=configs,
        stream=lambda _: None,
        warm_apps=True,
        restart=RestartPolicy(backoff=2.0),
    ) as dep:
        dep.start()
        t0 = time.monotonic()
        proc = _launcher(dep, tiny_model, out, tmp_path, "900", rounds="3")
        lines: list[str] = []
        kills: dict[str, float] = {}
        queue: Queue[str | None] = Queue()
        reader = threading.Thread(target=_read_lines, args=(proc, queue), daemon=True)
        reader.start()
        try:
            deadline = time.monotonic() + 900
            while time.monotonic() < deadline:
                if (
                    "superlink" in kills
                    and not dep.restarts.get("superlink")
                    and (
                        "does not answer" in "".join(lines[-20:])
                        or time.monotonic() - kills["superlink"] > 60
                    )
                ):
                    # compose's restart policy, done by fedsd up's supervisor (in this
                    # thread: its children die with the thread that started them), on
                    # the same port and state database; once the launcher saw the outage
                    # (its probe runs every 2 s: a faster restart may go unseen, and the
                    # run then simply goes on), so that the outage path is what is tested
                    dep.supervise()
                try:
                    line = queue.get(timeout=0.2)
                except Empty:
                    continue
                if line is None:
                    break
                lines.append(line)
                m = ROUND_DONE.search(line)
                done = int(m.group(1)) if m else 0
                if done == 1 and "serverapp" not in kills:
                    time.sleep(1.0)  # round 2 in flight
                    assert _kill_serverapp(dep), "no ServerApp process to kill"
                    kills["serverapp"] = time.monotonic()
                elif done == 2 and "superlink" not in kills:
                    time.sleep(1.0)  # round 3 in flight
                    os.kill(dep.services["superlink"].pid, signal.SIGKILL)
                    kills["superlink"] = time.monotonic()
            code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        output = "".join(lines)
        print(f"launcher exited {code} after {time.monotonic() - t0:.1f}s")
        said = [ln.strip() for ln in lines if "fedsd launch:" in ln or "resuming" in ln]
        print("\n".join(said))
        assert set(kills) == {"serverapp", "superlink"}, output[-4000:]
        assert dep.restarts.get("superlink") == 1, output[-4000:]
        assert code == 0, output[-4000:]
        assert "No heartbeat received from the task; resubmitting (1/3)" in output, said
        assert re.search(r"the SuperLink at \S+ does not answer \(refused", output), said
        assert "resubmitting (3/3)" not in output, said
        assert "finished:completed" in output
        # The ServerApp outlives the SuperLink's outage. When the restarted SuperLink
        # answers, the launcher stops the run and resubmits it (lost), unless round 3
        # completed before the launcher asked (survived): both are right, a race
        # between the launcher's probe and the last round.
        lost = "resubmitting (2/3)" in output
        print("outage outcome:", "lost and resubmitted" if lost else "survived")
        if not lost:
            assert "answers again" in output, said
        assert output.count("fedsd resuming after round") == (2 if lost else 1), said
        rounds = json.loads((out / "history.json").read_text())["rounds"]
        assert [r["round"] for r in rounds] == [1, 2, 3]
        runs = re.findall(r"Successfully started run (\d+)", output)
        assert len(set(runs)) == (3 if lost else 2), runs
        for run_id in runs[:-1]:  # the lost ones are finished, not left running
            status, _ = dep.run_status(run_id)
            assert status is not None and status.startswith("finished:"), (run_id, status)


def _read_lines(proc: subprocess.Popen, queue: Queue[str | None]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        queue.put(line)
    queue.put(None)


class _Scripted:
    """A deployment whose runs end as scripted: (status, details, link outage during it)."""

    WHO = "fedsd launch"

    def __init__(self, outcomes: list[tuple[str, str | None, bool]]) -> None:
        self.outcomes = list(outcomes)
        self.restarts: dict[str, int] = {}
        self.submitted = 0

    def submit(self, app, overrides, *, timeout=None):
        from fedsd.deploy.submission import RunResult

        status, details, outage = self.outcomes.pop(0)
        self.submitted += 1
        if outage:
            self.restarts["superlink"] = self.restarts.get("superlink", 0) + 1
        code = 0 if status == "finished:completed" else (124 if status == "timeout" else 1)
        return RunResult(code, str(self.submitted), status, details)


LOST = ("lost", "the SuperLink stopped answering while the run was in flight", True)
NO_HEARTBEAT = ("finished:failed", "No heartbeat received from the task", False)
APP_FAILED = ("finished:failed", "ServerApp failed with exception: too few nodes", False)
DONE = ("finished:completed", None, False)


@pytest.mark.parametrize(
    ("outcomes", "limit", "submits", "final", "gave_up"),
    [
        ([NO_HEARTBEAT, LOST, DONE], 3, 3, "finished:completed", False),  # the e2e case
        ([NO_HEARTBEAT] * 3, 2, 3, "finished:failed", True),  # the limit
        ([LOST, DONE], 0, 1, "lost", True),  # FEDSD_MAX_RESUBMITS=0: never
        ([APP_FAILED, DONE], 3, 1, "finished:failed", False),  # the app's own verdict
        ([(*APP_FAILED[:2], True), DONE], 3, 2, "finished:completed", False),  # link died
        ([("finished:stopped", None, False), DONE], 3, 1, "finished:stopped", False),
        ([("timeout", None, False), DONE], 3, 1, "timeout", False),
    ],
)
def test_launcher_resubmission_decisions(outcomes, limit, submits, final, gave_up):
    from fedsd.deploy.submission import submit_until_done

    dep = _Scripted(outcomes)
    said: list[str] = []
    result = submit_until_done(
        dep, Path("app"), {}, limit, said.append, time.monotonic(), None,
        limit="FEDSD_MAX_RESUBMITS",
    )  # fmt: skip
    assert (dep.submitted, result.status) == (submits, final), said
    resubmitted = [s for s in said if "resubmitting" in s]
    assert len(resubmitted) == submits - 1, said
    for n, line in enumerate(resubmitted, 1):
        assert line.startswith(f"fedsd launch: run {n} ended as ") and f"({n}/{limit})" in line
    limit_line = (
        f"fedsd launch: run {submits} lost {submits} time(s); resubmission limit "
        f"(FEDSD_MAX_RESUBMITS {limit}) reached"
    )
    assert [s for s in said if "resubmission limit" in s] == ([limit_line] if gave_up else [])


def test_launcher_outage_rule_and_max_resubmits_setting(tmp_path):
    """A refused connection or an unknown name counts as a SuperLink outage at once (one
    count per outage); a timeout only once it lasted ``patience``. FEDSD_MAX_RESUBMITS is
    an integer >= 0 (default 3)."""
    import socket

    from fedsd.config import ConfigError
    from fedsd.deploy.certs import ensure_certs
    from fedsd.deploy.remote import RemoteDeployment

    ca = ensure_certs(tmp_path / "certs", nodes=0).ca_cert
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{sock.getsockname()[1]}"
    said: list[str] = []
    dep = RemoteDeployment(closed, ca, work_dir=tmp_path / "w", stream=said.append)
    assert dep.probe().startswith("refused:")
    assert RemoteDeployment("nonexistent.invalid:9092", ca, work_dir=tmp_path / "w2").probe(
    ).startswith("refused:")  # fmt: skip
    config = (tmp_path / "w" / "flwr-home" / "config.toml").read_text()
    assert f'address = "{closed}"' in config and str(ca) in config

    answers: list[str | None] = []
    dep.probe = lambda: answers.pop(0)  # type: ignore[method-assign]
    dep.probe_interval, dep.patience = 0.0, 0.3
    answers += ["timed out", "timed out"]
    dep.supervise()
    dep.supervise()
    assert dep.restarts == {}  # a slow link is not yet an outage
    time.sleep(0.35)
    answers += ["timed out", "timed out"]
    dep.supervise()
    dep.supervise()
    assert dep.restarts == {"superlink": 1}  # once it lasted patience; counted once
    answers += [None, "refused: [Errno 111] Connection refused", "refused: again"]
    dep.supervise()
    dep.supervise()
    dep.supervise()
    assert dep.restarts == {"superlink": 2}  # back, then down again: a new outage
    assert sum("does not answer" in s for s in said) == 2 and "answers again" in said[1]

    from fedsd.deploy.containers import launch

    assert launch.max_resubmits_setting({}) == 3
    assert launch.max_resubmits_setting({"FEDSD_MAX_RESUBMITS": "0"}) == 0
    for bad in ("-1", "two", "1.5"):
        with pytest.raises(ConfigError, match="FEDSD_MAX_RESUBMITS"):
            launch.max_resubmits_setting({"FEDSD_MAX_RESUBMITS": bad})
