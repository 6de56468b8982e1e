"""The Flower control client of one deployment: the ``flwr`` CLI, run as a subprocess, and
for node registration Flower's Control API client in-process.

``fedsd up --local`` and the launchers (``fedsd.deploy.containers.launch``) drive their
SuperLink's Control API with their own FLWR_HOME holding the ``local`` connection
(``fedsd.common.flwr_config``). ``flwr ... --format json`` exits 0
even when the command failed, so each answer is read from its JSON, not its exit status.
Registration, many requests at once, goes in-process (``fedsd.common.control_api``).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

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

    def list_nodes(self) -> list[dict[str, Any]]:
        """``flwr supernode list`` as dicts (node-id, status, ...)."""
        res = self.flwr("supernode", "list", self.connection, "--format", "json")
        payload = _json_payload(res.stdout)
        if not payload or not payload.get("success"):
            raise DeployError(f"`flwr supernode list` failed: {res.stdout}{res.stderr}")
        return list(payload.get("nodes", []))

    def run_status(self, run_id: str) -> tuple[str | None, str | None]:
        """``(status, status-details)`` of a run from ``flwr ls --run-id``."""
        res = self.flwr("ls", self.connection, "--run-id", str(run_id), "--format", "json")
        payload = _json_payload(res.stdout) or {}
        for run in payload.get("runs", []):
            if str(run.get("run-id")) == str(run_id):
                return run.get("status"), run.get("status-details")
        return None, None

    def stop_run(self, run_id: str, timeout: float = 30.0) -> None:
        """``flwr stop RUN_ID``; a failure is not an error (the run may be gone already)."""
        try:
            self.flwr("stop", str(run_id), self.connection, timeout=timeout)
        except DeployError:
            pass


def _json_payload(text: str) -> dict[str, Any] | None:
    start = text.find("{")
    if start < 0:
        return None
    try:
        data = json.loads(text[start:])
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None
