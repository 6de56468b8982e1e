"""The Flower control client of one deployment.

Requests (register a node, list nodes, a run's status, stop a run) go through Flower's own
Control API client in-process (``fedsd.common.control_api``): a ``flwr`` process per request
cost ~2 s of CPU, and under load ``flwr stop`` and concurrent registrations missed their
deadlines. ``flwr()`` still runs any other ``flwr`` command against the same connection
(``FLWR_HOME/config.toml``, ``fedsd.common.flwr_config``).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from fedsd.common.control_api import ControlApi
from fedsd.common.errors import DeployError
from fedsd.deploy.certs import NodeKey
from fedsd.deploy.processes import executable

CONNECTION = "local"  # the connection name in FLWR_HOME/config.toml


class FlowerControl:
    """``flwr`` commands against one connection, with the deployment's environment
    (its FLWR_HOME) and working directory."""

    def __init__(
        self, env: Mapping[str, str], cwd: str | os.PathLike[str], connection: str = CONNECTION
    ) -> None:
        self.env = env  # the deployment's own dict: later changes to it apply here too
        self.cwd = Path(cwd)
        self.connection = connection
        self._api: ControlApi | None = None

    def flwr(
        self, *args: str, timeout: float = 60.0, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """Run ``flwr ARGS`` (our FLWR_HOME); ``check``: raise ``DeployError`` on failure."""
        argv = [executable("flwr"), *args]
        try:
            res = subprocess.run(
                argv,
                env=dict(self.env),
                cwd=self.cwd,
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as exc:
            raise DeployError(f"`flwr {' '.join(args)}` timed out after {timeout:.0f}s") from exc
        if check and res.returncode != 0:
            raise DeployError(
                f"`flwr {' '.join(args)}` failed ({res.returncode}): {res.stdout}{res.stderr}"
            )
        return res

    def api(self) -> ControlApi:
        """The in-process Control API client of this connection (``FLWR_HOME`` read now:
        the deployment may have moved it since)."""
        home = self.env.get("FLWR_HOME")
        if self._api is None or self._api.flwr_home != home:
            self._api = ControlApi(self.connection, home)
        return self._api

    def register_nodes(self, keys: Sequence[NodeKey]) -> dict[str, str]:
        """Register node public keys, one in-process request each (a ``flwr`` process per
        key costs ~2 s of CPU; Flower's client bounds each request at 30 s). Returns
        ``{public key: registered | already registered}``; the first refusal raises."""
        return {str(k.public_key): self.register_node(k.public_key) for k in keys}

    def register_node(self, public_key: str | os.PathLike[str]) -> str:
        """Register one key; returns ``registered`` or ``already registered`` (not an error)."""
        return self.api().register_node(public_key)

    def list_nodes(self) -> list[dict[str, str]]:
        """Every node the SuperLink knows, as ``flwr supernode list`` (``node-id``, ``status``)."""
        return [{"node-id": i, "status": st} for i, st in self.api().list_nodes()]

    def run_status(self, run_id: str) -> tuple[str | None, str | None]:
        """``(status, details)`` of a run, as ``flwr ls --run-id`` shows them."""
        return self.api().run_status(run_id)

    def stop_run(self, run_id: str, *, check: bool = False) -> None:
        """Stop a run (``flwr stop``); a failure raises only with ``check`` (unchecked: the
        run may be gone already)."""
        try:
            self.api().stop_run(run_id)
        except DeployError:
            if check:
                raise
