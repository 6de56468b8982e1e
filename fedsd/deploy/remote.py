"""A deployment whose SuperLink runs elsewhere (compose, Kubernetes): the launcher's view."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL

from fedsd.common.errors import DeployError
from fedsd.common.health import poll_until, probe_health, wait_healthy
from fedsd.deploy.local import DEFAULT_STARTUP_TIMEOUT, LocalDeployment
from fedsd.deploy.submission import StreamFn, Submitter


class RemoteDeployment(LocalDeployment):
    """A SuperLink that runs elsewhere (compose, Kubernetes), driven through the flwr CLI
    only: what the launcher (fedsd.deploy.containers.launch) submits runs to and resubmits
    lost runs on, with ``submit_until_done`` as ``fedsd up`` does. Nothing is started or
    supervised here.

    The ServerApp is not visible from here: a run whose ServerApp died is failed by the
    SuperLink once it missed its heartbeats (``No heartbeat received from the task``, at
    most about a minute), which ``resubmittable`` counts as lost. The SuperLink is probed
    instead (``GET /health``, every ``probe_interval`` s while a run is in flight): a
    refused connection or an unknown name (nothing serves the address: the SuperLink died
    or is being restarted) counts as an outage at once, any other failure (a timeout on a
    loaded host) once it lasted ``patience`` s: by default two heartbeat intervals (60 s),
    Flower's own rule for a node gone offline. (10 s was too short: on a 2-core CI host
    running four deployments, TLS handshakes to a live SuperLink timed out for longer, and
    the launcher abandoned a healthy run.) A run in flight during an outage is lost,
    as with a restarted SuperLink under ``fedsd up``: once the SuperLink answers again it
    is stopped, and its ServerApp, which may have outlived the outage, gets ``stop_settle``
    s (a heartbeat interval) to learn of the stop and exit before the resubmitted run's
    ServerApp resumes from the same OUT.
    """

    WHO = "fedsd launch"
    LINK_LOST = "the SuperLink stopped answering while the run was in flight"

    def __init__(
        self,
        address: str,
        ca_cert: str | os.PathLike[str],
        nodes: int = 2,
        *,
        work_dir: str | os.PathLike[str] | None = None,
        stream: StreamFn = print,
        startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
        probe_interval: float = 2.0,
        patience: float = 2.0 * HEARTBEAT_DEFAULT_INTERVAL,
        stop_settle: float = float(HEARTBEAT_DEFAULT_INTERVAL),
    ) -> None:
        work = work_dir if work_dir is not None else tempfile.mkdtemp(prefix="fedsd-launch-")
        super().__init__(work, nodes, stream=stream, startup_timeout=startup_timeout)
        self.remote_address = address
        self.ca_cert = Path(ca_cert)
        self.probe_interval = probe_interval
        self.patience = patience
        self.stop_settle = stop_settle
        self._next_probe = 0.0
        self._down_since: float | None = None
        self._outage_counted = False
        self.runs = _RemoteSubmitter(self)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._write_connection(self.ca_cert)

    @property
    def address(self) -> str:
        return self.remote_address

    def probe(self) -> str | None:
        """None when ``GET /health`` answers 200, else why not; ``refused: ...`` when
        nothing serves the address."""
        return probe_health(self.address, str(self.ca_cert))

    def wait_healthy(self, timeout: float = DEFAULT_STARTUP_TIMEOUT) -> None:
        wait_healthy(self.address, self.probe, timeout, 1.0)

    def supervise(self) -> None:
        """Probe the SuperLink (at most every ``probe_interval`` s) and count an outage
        as a SuperLink restart, once per outage."""
        now = time.monotonic()
        if now < self._next_probe:
            return
        why = self.probe()
        self._next_probe = time.monotonic() + self.probe_interval
        if why is None:
            self._link_up()
            return
        if self._down_since is None:
            self._down_since = now
        if self._outage_counted:
            return
        if why.startswith("refused") or now - self._down_since >= self.patience:
            self._outage_counted = True
            self.restarts["superlink"] = self.restarts.get("superlink", 0) + 1
            self._log(
                f"the SuperLink at {self.address} does not answer ({why}): the run in "
                "flight counts as lost"
            )

    def _link_up(self) -> None:
        if self._down_since is not None:
            self._log(f"the SuperLink at {self.address} answers again")
        self._down_since, self._outage_counted = None, False


class _RemoteSubmitter(Submitter):
    """Submissions to a ``RemoteDeployment``: a lost run is abandoned through the
    SuperLink, the only part of the deployment visible from here."""

    deployment: RemoteDeployment

    def abandon(self, run_id: str) -> str | None:
        """Once the SuperLink answers again: stop the lost run, wait until it is listed as
        finished, and give its ServerApp ``stop_settle`` s to exit. Returns the run's
        final status (``finished:completed`` when it completed after all)."""
        dep = self.deployment
        try:
            dep.wait_healthy(dep.startup_timeout)
        except DeployError as exc:
            dep._log(f"error: {exc}")
            return None
        dep._link_up()
        status: str | None = None
        stopped = False

        def finished() -> str | None:
            nonlocal status, stopped
            try:
                status, _ = dep.control.run_status(run_id)
            except DeployError:
                pass
            if status is not None and status.startswith("finished"):
                return status
            if not stopped:
                dep.control.stop_run(run_id)
                stopped = True
            return None

        if poll_until(finished, 30, 1.0) is None:
            return status
        if status == "finished:stopped":
            dep._log(
                f"stopped run {run_id}; giving its ServerApp {dep.stop_settle:g}s to exit "
                "before the run is resubmitted"
            )
            time.sleep(dep.stop_settle)
        return status
