"""Supervision of a local deployment's services: restart what died, as compose's
``restart:`` policy and a Kubernetes pod do, and give up after a service's last restart.

``Supervisor`` holds the policy and the bookkeeping (restarts per service, when each is
due, the SuperLink's memory of a dead node's session); starting a process again as it was
started is the deployment's job (``LocalDeployment.respawn``).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE

from fedsd.common.errors import DeployError
from fedsd.deploy.processes import Service

if TYPE_CHECKING:
    from fedsd.deploy.local import LocalDeployment

DEFAULT_MAX_RESTARTS = 5
# How long the SuperLink keeps a dead node's session (it refuses the key meanwhile): two
# missed heartbeats, from Flower's own constants, plus a margin.
NODE_SESSION_SECONDS = float(HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL + 2)


@dataclass(frozen=True)
class RestartPolicy:
    """What the supervisor does when a service dies, as compose's ``restart:`` and a
    Kubernetes pod do: restart it after ``backoff`` seconds, doubling per restart up to
    ``max_backoff``; after ``max_restarts`` restarts of one service the run aborts.
    ``max_restarts=0`` turns supervision off (a dead service ends the run at once)."""

    max_restarts: int = DEFAULT_MAX_RESTARTS
    backoff: float = 2.0
    max_backoff: float = 60.0

    def delay(self, restarts: int) -> float:
        """Seconds to wait before restart number ``restarts + 1``."""
        return min(self.max_backoff, self.backoff * 2.0**restarts)


class Supervisor:
    """Restarts the dead services of one ``LocalDeployment`` under a ``RestartPolicy``."""

    def __init__(self, deployment: LocalDeployment, policy: RestartPolicy | None = None) -> None:
        self.deployment = deployment
        self.policy = policy if policy is not None else RestartPolicy()
        self.restarts: dict[str, int] = {}  # service name -> restarts so far
        self._due: dict[str, float] = {}  # dead service -> when its restart is due
        self._died: dict[str, float] = {}  # when a service awaiting restart was found dead
        self._session_until: dict[str, float] = {}  # node -> its old session surely expired
        self._recorders: list[subprocess.Popen[bytes]] = []

    def supervise(self) -> None:
        """Restart what died, as compose's restart policy and Kubernetes would.

        A dead service is restarted with its own argv and environment (a SuperNode with its
        key, the SuperLink on the same port and state database, so the nodes' registrations
        survive and they reconnect) once its backoff has passed; the run goes on meanwhile,
        the ServerApp carrying on with the nodes it has. Raises ``DeployError`` once a
        service died after its last allowed restart. The SuperLink comes first: the others
        need it to start.
        """
        self._reap_recorders()
        services = self.deployment.services
        now = time.monotonic()
        order = sorted(services, key=lambda n: n != "superlink")
        for name in order:
            svc = services[name]
            code = svc.poll()
            if code is None:
                continue
            count = self.restarts.get(name, 0)
            refused = name.startswith("supernode") and now < self._session_until.get(name, 0)
            if refused and name not in self._due:
                # The SuperLink keeps a SIGKILLed node's session online until two heartbeats
                # (2 x 30 s) are missed and refuses its key until then (ApiError 2004, exit
                # 305): retried every 2 s inside that window, not counted as restarts.
                self._due[name] = now + 2.0
                continue
            if count >= self.policy.max_restarts and not refused:
                self._due.pop(name, None)
                raise DeployError(
                    f"{name} exited with status {code} after {count} restart(s), the limit "
                    f"(--max-restarts {self.policy.max_restarts}); giving up. "
                    f"Log {svc.log_path}:\n{svc.log_tail()}"
                )
            due = self._due.get(name)
            if due is None:
                delay = self.policy.delay(count)
                self._died[name] = now
                self._due[name] = now + delay
                self.deployment._log(
                    f"{name} (pid {svc.pid}) exited with status {code}; restart in {delay:g}s"
                )
                continue
            if now >= due:
                del self._due[name]
                self._restart_service(svc, code, counted=not refused)

    def _restart_service(self, svc: Service, code: int, *, counted: bool = True) -> None:
        dep = self.deployment
        name = svc.name
        if counted:
            self.restarts[name] = self.restarts.get(name, 0) + 1
            if name.startswith("supernode"):
                died = self._died.pop(name, time.monotonic())
                self._session_until[name] = died + NODE_SESSION_SECONDS
        new = dep.respawn(svc)
        if not counted:
            return
        dep._log(
            f"restarted {name} (pid {new.pid}; restart {self.restarts[name]}/"
            f"{self.policy.max_restarts}; it had exited with status {code})"
        )
        self._record_restart(name)
        if name == "superlink":
            with contextlib.suppress(DeployError):  # a failed start is the next death
                dep.wait_healthy(timeout=dep.startup_timeout)

    def _record_restart(self, name: str) -> None:
        """Count the restart in ``fedsd_service_restarts_total{service}``, written to the
        ServerApp exporter's multiprocess files (the runner itself serves no metrics)."""
        dep = self.deployment
        if dep.metrics is None:
            return
        env = {
            **dep.env,
            "PROMETHEUS_MULTIPROC_DIR": str(dep.work_dir / "metrics" / "metrics-serverapp"),
        }
        code = f"from fedsd.observability.metrics import record_service_restart as r; r({name!r})"
        self._recorders.append(
            subprocess.Popen(
                [sys.executable, "-c", code],
                env=env,
                cwd=dep.work_dir,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )

    def _reap_recorders(self) -> None:
        self._recorders = [p for p in self._recorders if p.poll() is None]
