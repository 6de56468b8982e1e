"""Submitting a run to a deployment and watching it to its end: ``flwr run --stream``
relayed, the verdict read back with ``flwr ls``, a lost run stopped and resubmitted.

``flwr run --stream`` exits 0 even when the ServerApp fails, so the verdict comes from
the run's status (``finished:completed`` or not). A run whose ServerApp died, or that was
in flight while the SuperLink went away, is *lost*: stopped here and resubmitted by
``submit_until_done`` (the ServerApp resumes after the last round saved in OUT). A run the
app failed itself is not. ``fedsd up`` (a ``LocalDeployment``) and the launchers
(``fedsd.deploy.containers.launch``, a ``RemoteDeployment``) share all of it.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedsd.common.errors import DeployError
from fedsd.common.health import poll_until
from fedsd.deploy.fab import stage_app
from fedsd.deploy.processes import Service, executable, pump_lines, stop_services
from fedsd.deploy.run_config import format_config_pairs

if TYPE_CHECKING:
    from fedsd.deploy.local import LocalDeployment

EXIT_TIMEOUT = 124
DEFAULT_MAX_RESUBMITS = 3
# A timeout that falls while `flwr run` is still building and uploading the FAB waits this
# much longer for the run id, so that the run it creates is stopped rather than orphaned.
SUBMIT_GRACE_S = 60.0

StreamFn = Callable[[str], None]

# What `flwr run` prints once the SuperLink accepted the run.
RUN_ID_RE = re.compile(r"Successfully started run (\d+)")


@dataclass
class RunResult:
    """Outcome of one submitted run."""

    exit_code: int
    run_id: str | None = None
    status: str | None = None
    details: str | None = None
    seconds: float = 0.0


class Submitter:
    """Submits runs to one deployment and watches each to its end.

    ``abandon`` is what a lost run needs here, where the ServerApp processes are ours:
    the run stopped and its ServerApp gone. A deployment whose ServerApp runs elsewhere
    (``fedsd.deploy.remote``) brings its own.
    """

    def __init__(self, deployment: LocalDeployment) -> None:
        self.deployment = deployment

    def submit(
        self,
        app_dir: str | os.PathLike[str],
        overrides: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> RunResult:
        """``flwr run APP local --stream``: relay its output, then read the run's final status.

        ``flwr run --stream`` exits 0 even when the ServerApp fails, so the verdict comes
        from ``flwr ls --run-id`` (``finished:completed`` or not).
        """
        dep = self.deployment
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout
        connection = dep.control.connection
        # What the FAB holds, copied aside (fedsd.deploy.fab): `flwr run` packs the same FAB
        # without walking the app directory's virtualenv (seconds at every submission).
        staged = stage_app(app_dir, dep.work_dir / "app")
        argv = [executable("flwr"), "run", str(staged), connection, "--stream"]
        if overrides:
            argv += ["--run-config", format_config_pairs(overrides)]
        shown = [*argv[1:2], str(Path(app_dir).resolve()), *argv[3:]]
        dep._log(f"submitting: {' '.join(shown)} (its FAB's files staged in {staged})")
        run_log = dep.log_dir / "flwr-run.log"
        proc = subprocess.Popen(
            argv,
            env=dep.env,
            cwd=dep.work_dir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        cli = Service("flwr-run", argv, run_log, proc)
        lines: queue.Queue[str | None] = queue.Queue()
        reader = threading.Thread(target=pump_lines, args=(proc.stdout, lines), daemon=True)
        reader.start()
        run_id: str | None = None
        submit_grace = False  # the deadline was extended once to learn the run id
        watch = AppWatch(dep, dep.restarts.get("superlink", 0))
        try:
            with run_log.open("a", encoding="utf-8") as log:
                while not watch.lost():
                    try:
                        line = lines.get(timeout=0.5)
                    except queue.Empty:
                        line = ""
                    if line is None:
                        break
                    if line:
                        log.write(line)
                        log.flush()
                        text = line.rstrip("\n")
                        dep.stream(text)
                        if run_id is None and (m := RUN_ID_RE.search(text)):
                            run_id = m.group(1)
                    overdue = deadline is not None and time.monotonic() > deadline
                    if overdue or (submit_grace and run_id is not None):
                        if run_id is None and not submit_grace and proc.poll() is None:
                            # Killing `flwr run` mid-upload could leave a run behind that
                            # nobody can stop without its id: let the submission finish.
                            submit_grace = True
                            deadline = time.monotonic() + SUBMIT_GRACE_S
                            dep._log(
                                "timeout reached while the app is still being submitted; "
                                f"waiting up to {SUBMIT_GRACE_S:.0f}s for its run id so that "
                                "the run can be stopped"
                            )
                            continue
                        dep._log(f"run timed out after {timeout:.0f}s")
                        return RunResult(EXIT_TIMEOUT, run_id, "timeout", None, timeout or 0)
                    dep.supervise()
            if proc.poll() is None and not watch.seen:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=30)  # the stream ended: the CLI exits
        finally:
            stop_services([cli], grace=2.0)
            reader.join(timeout=2)
        if run_id is None:
            return RunResult(
                proc.returncode or 1,
                run_id,
                "not-submitted",
                f"`flwr run` exited with {proc.returncode}",
                time.monotonic() - start,
            )
        # The stream also ends when the SuperLink went away, or the ServerApp died
        status, details = self.wait_run_finished(run_id, deadline=deadline, watch=watch)
        code = 0 if status == "finished:completed" else 1
        if status is None:
            code = EXIT_TIMEOUT
        return RunResult(code, run_id, status, details, time.monotonic() - start)

    def wait_run_finished(
        self,
        run_id: str,
        *,
        deadline: float | None = None,
        watch: AppWatch | None = None,
    ) -> tuple[str | None, str | None]:
        """Poll the run's status until it finished, its ServerApp is gone, or ``deadline``.

        A run whose ServerApp process died (killed, or lost with the SuperLink) would only
        be failed by the SuperLink after two missed heartbeats (60 s); it is stopped here
        instead and reported as ``lost``, which ``fedsd up`` resubmits.
        """
        dep = self.deployment
        watch = watch if watch is not None else AppWatch(dep, dep.restarts.get("superlink", 0))
        settle = time.monotonic() + 30  # without a status at all (no link), give up then
        last: tuple[str | None, str | None] = (None, None)

        def verdict() -> tuple[str | None, str | None] | None:
            nonlocal settle, last
            dep.supervise()
            try:
                last = dep.control.run_status(run_id)
            except DeployError:
                last = (None, None)
            status = last[0]
            if status and status.startswith("finished"):
                return last
            if watch.lost(force=True):
                if self.abandon(run_id) == "finished:completed":
                    return "finished:completed", None  # it completed as the link went away
                if watch.link_restarted():
                    return "lost", dep.LINK_LOST
                return "lost", "the ServerApp process died before the run finished"
            now = time.monotonic()
            if status:
                settle = now + 30
            return last if now > settle else None

        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        got = poll_until(verdict, left, 1.0)
        return got if got is not None else last

    def abandon(self, run_id: str) -> str | None:
        """Stop a lost run and make sure its ServerApp is gone before a resubmission
        resumes from the same OUT (two ServerApps must never write it). Returns the run's
        final status when known (here: None)."""
        dep = self.deployment
        dep.control.stop_run(run_id)
        gone = poll_until(lambda: True if not dep.serverapp_pids() else None, 20, 0.5)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in dep.serverapp_pids():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)  # the warm-start shim relays SIGTERM to the ServerApp
            if not gone and sig == signal.SIGTERM:
                time.sleep(5)
        return None


class AppWatch:
    """Tells when the ServerApp process of the submitted run is gone: seen alive once (or
    never seen after ``patience``), then no ``flwr-serverapp`` process for ``patience``."""

    def __init__(
        self, deployment: LocalDeployment, link_restarts: int = 0, patience: float = 5.0
    ) -> None:
        self.deployment = deployment
        self.link_restarts = link_restarts
        self.patience = patience
        self.seen = False
        self.since = time.monotonic()  # last time it was alive (or the watch started)
        self._checked = 0.0

    def link_restarted(self) -> bool:
        """Messages of the round in flight may be gone with a restarted SuperLink, and the
        ServerApp would wait for their replies until round-timeout: the run counts as lost
        (resubmitted, resuming after the last saved round)."""
        return self.deployment.restarts.get("superlink", 0) > self.link_restarts

    def lost(self, *, force: bool = False) -> bool:
        if self.link_restarted():
            return True
        now = time.monotonic()
        if not force and now - self._checked < 1.0:
            return False
        self._checked = now
        if self.deployment.serverapp_pids():
            self.seen = True
            self.since = now
            return False
        return self.seen and now - self.since > self.patience


def submit_until_done(
    deployment: LocalDeployment,
    app: Path,
    overrides: Mapping[str, Any],
    max_resubmits: int,
    stream: StreamFn,
    start: float,
    timeout: float | None,
    *,
    limit: str = "--max-resubmits",
) -> RunResult:
    """Submit, and resubmit a run that was lost rather than failed by the app: the
    ServerApp resumes after the last round in OUT/history.json, so only the in-flight round
    is redone. ``fedsd up`` and the compose/Kubernetes launcher
    (fedsd.deploy.containers.launch, with a ``RemoteDeployment``) share it; ``limit``
    names the setting in what is logged."""
    who = deployment.WHO
    resubmits = 0
    while True:
        restarts = sum(deployment.restarts.values())
        remaining = None if timeout is None else max(1.0, timeout - (time.monotonic() - start))
        result = deployment.submit(app, overrides, timeout=remaining)
        link_lost = sum(deployment.restarts.values()) > restarts
        if result.exit_code == 0 or not resubmittable(result, link_lost):
            return result
        if resubmits >= max_resubmits:
            stream(
                f"{who}: run {result.run_id} lost {resubmits + 1} time(s); "
                f"resubmission limit ({limit} {max_resubmits}) reached"
            )
            return result
        resubmits += 1
        stream(
            f"{who}: run {result.run_id} ended as {result.status}"
            f"{f': {result.details}' if result.details else ''}; resubmitting "
            f"({resubmits}/{max_resubmits}), it resumes after the last saved round"
        )


def resubmittable(result: RunResult, services_restarted: bool = False) -> bool:
    """Whether a run that did not complete was lost (resubmit) rather than failed by the
    app's own verdict (bad config, budget spent, too few nodes, disk full: never retried).

    Flower records an exception the ServerApp raised as ``ServerApp failed with exception:
    ...``; that is the app's verdict unless a service died meanwhile (an exception from a
    SuperLink that went away). A ServerApp process that died is ``lost``; a timeout and a
    run stopped by the user are not retried either.
    """
    if result.status == "lost":
        return True
    if result.status in (None, "timeout", "not-submitted") or result.exit_code == EXIT_TIMEOUT:
        return False
    if result.status == "finished:failed":
        own = str(result.details or "").startswith("ServerApp failed with exception")
        return services_restarted or not own
    return False
