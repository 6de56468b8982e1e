"""Flower's Control API client, in-process: what ``flwr supernode register``, ``flwr supernode
list`` and ``flwr ls`` send, without a ``flwr`` process per call.

Every ``flwr`` CLI start costs about 2 s of CPU in imports; on a loaded 2-core machine five
concurrent ``flwr supernode register`` processes missed a 90 s deadline, where the same five
requests from one process take milliseconds. The client is Flower's own
(``init_http_client_from_connection``), built from a ``[superlink.<name>]`` connection of
``$FLWR_HOME/config.toml``, exactly as the CLI builds it.

Flower reads ``FLWR_HOME`` from the environment (the connection, the account credentials), so
each client is built and used with this API's ``FLWR_HOME`` set, and the caller's restored
after: one process may talk to several deployments.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedsd.common.errors import DeployError

_ENV_LOCK = threading.RLock()  # os.environ is process-wide: one FLWR_HOME at a time


class RefusedError(DeployError):
    """The SuperLink answered, and refused the request (its answer is in the message)."""

    def __init__(self, message: str, http_status: int) -> None:
        super().__init__(message)
        self.http_status = http_status


class ControlApi:
    """The Control API of the SuperLink behind connection ``name`` of ``flwr_home``
    (``None``: this process's ``FLWR_HOME``; the default connection when ``name`` is None)."""

    def __init__(
        self, name: str | None = None, flwr_home: str | os.PathLike[str] | None = None
    ) -> None:
        self.flwr_home = None if flwr_home is None else str(flwr_home)
        with self._home():
            from flwr.cli.flower_config import read_superlink_connection

            self.connection = read_superlink_connection(name)
        if not self.connection.address or self.connection.address.startswith(":"):
            # flwr treats ":local:" addresses as "start a simulation SuperLink": never here.
            raise ValueError(
                f"connection {self.connection.name!r} has no SuperLink address "
                f"({self.connection.address!r}); fedsd only talks to a running SuperLink"
            )
        self._client: Any = None

    @contextlib.contextmanager
    def _home(self) -> Iterator[None]:
        if self.flwr_home is None:
            yield
            return
        with _ENV_LOCK:
            before = os.environ.get("FLWR_HOME")
            os.environ["FLWR_HOME"] = self.flwr_home
            try:
                yield
            finally:
                if before is None:
                    os.environ.pop("FLWR_HOME", None)
                else:
                    os.environ["FLWR_HOME"] = before

    def call(self, method: str, request: Any) -> Any:
        """``ControlHttpClient.METHOD(request)``. A refusal raises ``RefusedError`` (with the
        SuperLink's answer), anything else ``DeployError``; either drops the client, so the
        next call reconnects (a restarted SuperLink)."""
        import httpx

        with self._home():
            try:
                if self._client is None:
                    from flwr.cli.utils import init_http_client_from_connection

                    with contextlib.redirect_stdout(io.StringIO()):  # "Using SuperLink: ..."
                        self._client = init_http_client_from_connection(self.connection)
                return getattr(self._client, method)(request)
            except httpx.HTTPStatusError as exc:
                self.close()
                raise RefusedError(
                    f"SuperLink {self.connection.address} refused {method} "
                    f"(HTTP {exc.response.status_code}): {exc.response.text.strip()}",
                    exc.response.status_code,
                ) from None
            except Exception as exc:  # transport errors, click errors from Flower's helpers
                self.close()
                raise DeployError(
                    f"{method}: SuperLink {self.connection.address} unreachable: "
                    f"{type(exc).__name__}: {exc}"
                ) from None

    def close(self) -> None:
        """Close the HTTP client (a later call opens a new one)."""
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()

    def register_node(self, public_key: str | os.PathLike[str]) -> str:
        """Register the node key in OpenSSH file ``public_key``: ``registered``, or ``already
        registered`` (not an error: the SuperLink's state outlived an earlier ``up``)."""
        from flwr.proto.control_pb2 import RegisterNodeRequest

        request = RegisterNodeRequest(public_key=key_bytes(public_key))
        try:
            res = self.call("RegisterNode", request)
        except RefusedError as exc:
            if "already in use" in str(exc):
                return "already registered"
            raise RefusedError(f"node key {public_key}: {exc}", exc.http_status) from None
        if not res.node_id:
            raise DeployError(f"SuperLink returned no node id for key {public_key}")
        return "registered"

    def run_status(self, run_id: str | int) -> tuple[str | None, str | None]:
        """``(status, details)`` of one run, as ``flwr ls --run-id`` shows them
        (``finished:completed``, ...); ``(None, None)`` for a run the SuperLink does not know."""
        from flwr.common.serde import run_from_proto
        from flwr.proto.control_pb2 import ListRunsRequest

        try:
            res = self.call("ListRuns", ListRunsRequest(run_id=int(run_id)))
        except RefusedError as exc:
            if exc.http_status == 404:  # Flower: "Run ID not found."
                return None, None
            raise
        for key, proto in res.run_dict.items():
            if str(key) == str(run_id):
                status = run_from_proto(proto).status
                return _status_text(status), status.details or None
        return None, None

    def stop_run(self, run_id: str | int) -> None:
        """Ask the SuperLink to stop a run (``flwr stop``); ``DeployError`` if it refuses."""
        from flwr.proto.control_pb2 import StopRunRequest

        if not self.call("StopRun", StopRunRequest(run_id=int(run_id))).success:
            raise DeployError(f"SuperLink {self.connection.address} did not stop run {run_id}")

    def list_nodes(self) -> list[tuple[str, str]]:
        """``(node id, status)`` of every node the SuperLink knows, as ``flwr supernode list``."""
        from flwr.proto.control_pb2 import ListNodesRequest

        res = self.call("ListNodes", ListNodesRequest())
        return [(str(n.node_id), str(n.status)) for n in res.nodes_info]

    def list_runs(self) -> list[tuple[str, str]]:
        """``(run id, status)`` of every run, as ``flwr ls`` (``finished:completed``...)."""
        from flwr.common.serde import run_from_proto
        from flwr.proto.control_pb2 import ListRunsRequest

        res = self.call("ListRuns", ListRunsRequest())
        return [(str(i), _status_text(run_from_proto(p).status)) for i, p in res.run_dict.items()]


def _status_text(status: Any) -> str:
    """``status:sub_status`` as the ``flwr`` CLI prints a run's status (``finished:failed``)."""
    return f"{status.status}:{status.sub_status}" if status.sub_status else status.status


def key_bytes(public_key: str | os.PathLike[str]) -> bytes:
    """The bytes Flower registers for an OpenSSH EC public key file (as ``flwr supernode
    register`` loads it), or ``DeployError`` naming the file."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes, uses_nist_ec_curve

    path = Path(public_key)
    try:
        key = serialization.load_ssh_public_key(path.read_bytes())
    except OSError as exc:
        raise DeployError(f"node public key {path}: {exc.strerror or exc}") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise DeployError(f"node public key {path} is not an OpenSSH public key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not uses_nist_ec_curve(key):
        raise DeployError(f"node public key {path} is not on a NIST EC curve (Flower needs one)")
    return public_key_to_bytes(key)
