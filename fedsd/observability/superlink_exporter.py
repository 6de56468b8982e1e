"""``fedsd superlink-exporter``: Prometheus metrics about a SuperLink, asked of the SuperLink.

Flower serves no ``/metrics``, and the SuperLink's own view (is it healthy, which nodes
are online, which runs are running or failed) lives behind its Control API. This exporter
probes it in a background thread every ``interval`` seconds and serves the last probe:

* ``GET /health`` over TLS, verified with the connection's CA;
* the nodes and their status, as ``flwr supernode list CONNECTION`` lists them;
* the runs and their status, as ``flwr ls CONNECTION`` lists them.

The connection is a ``[superlink.<name>]`` entry of ``$FLWR_HOME/config.toml``, the file
``fedsd up --local`` writes for the ``flwr`` CLI (or one written here from ``--address``
and ``--root-certificates``). The two listings use Flower's own Control API client
in-process, exactly as the CLI commands do, because every ``flwr`` CLI start costs about
2 s of CPU (imports) where the in-process call costs about 20 ms.

Scrapes never wait on the SuperLink: a slow or dead SuperLink shows as
``fedsd_superlink_up 0`` and an old ``fedsd_superlink_scrape_timestamp_seconds``, not as
a scrape timeout. A listing that fails is left out (no node or run series) rather than
reported as zero nodes.
"""

from __future__ import annotations

import os
import signal
import ssl
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsd.common.control_api import ControlApi
from fedsd.common.flwr_config import write_connection
from fedsd.common.health import health_url, probe_health

# Flower's node states (flwr.supercore.constant) and run states (Status, SubStatus): every
# one is exported, zero when empty, so a query for e.g. status="offline" always has a series.
NODE_STATUSES = ("online", "offline", "registered", "unregistered")
RUN_STATUSES = ("pending", "starting", "running", "completed", "failed", "stopped")
CHECKS = ("health", "nodes", "runs")
DEFAULT_INTERVAL = 10.0


@dataclass
class Snapshot:
    """One probe of the SuperLink. ``nodes``/``runs`` are None when that listing failed."""

    up: bool
    nodes: list[tuple[str, str]] | None = None  # (node id, status)
    runs: list[str] | None = None  # status of each run (finished:<x> becomes <x>)
    seconds: float = 0.0
    timestamp: float = 0.0
    errors: dict[str, str] = field(default_factory=dict)


def run_state(status: str) -> str:
    """``finished:completed`` -> ``completed``; ``running`` stays ``running``."""
    return status.split(":", 1)[1] if status.startswith("finished:") else status


class FlowerProbe:
    """Health, nodes and runs of the SuperLink behind connection ``name`` of ``flwr_home``."""

    def __init__(self, name: str | None = None, flwr_home: str | os.PathLike[str] | None = None):
        self.api = ControlApi(name, flwr_home)
        self.connection = self.api.connection

    @property
    def health_url(self) -> str:
        """``https://ADDRESS/health`` (``http`` for an insecure connection)."""
        return health_url(self.connection.address, insecure=self.connection.insecure)

    def health(self, timeout: float = 5.0) -> None:
        """Raise unless ``GET /health`` answers 200."""
        why = probe_health(
            self.connection.address,
            self.connection.root_certificates,
            insecure=self.connection.insecure,
            timeout=timeout,
        )
        if why is not None:
            raise OSError(why)

    def nodes(self) -> list[tuple[str, str]]:
        """``(node id, status)`` of every node the SuperLink knows, as ``flwr supernode list``."""
        return self.api.list_nodes()

    def runs(self) -> list[str]:
        """The status of every run, as ``flwr ls`` lists them (``finished:x`` -> ``x``)."""
        return [run_state(status) for _, status in self.api.list_runs()]

    def __call__(self) -> Snapshot:
        """Probe health, then (when healthy) nodes and runs."""
        t0 = time.perf_counter()
        snap = Snapshot(up=False)
        try:
            self.health()
            snap.up = True
        except (OSError, urllib.error.URLError, ssl.SSLError) as exc:
            snap.errors["health"] = str(exc)
        if snap.up:
            for check, call in (("nodes", self.nodes), ("runs", self.runs)):
                try:
                    setattr(snap, check, call())
                except Exception as exc:  # noqa: BLE001 - any API error is "listing failed"
                    snap.errors[check] = f"{type(exc).__name__}: {exc}"
        snap.seconds = time.perf_counter() - t0
        snap.timestamp = time.time()
        return snap


class SuperLinkCollector:
    """A prometheus-client collector serving the latest :class:`Snapshot` of ``probe``.

    ``start()`` probes once (so the first scrape has data) and then every ``interval``
    seconds in a daemon thread.
    """

    def __init__(self, probe: Callable[[], Snapshot], interval: float = DEFAULT_INTERVAL):
        self.probe = probe
        self.interval = interval
        self.snapshot = Snapshot(up=False)
        self.error_counts = dict.fromkeys(CHECKS, 0)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh(self) -> Snapshot:
        """Probe now and keep the result."""
        snap = self.probe()
        with self._lock:
            self.snapshot = snap
            for check in snap.errors:
                self.error_counts[check] = self.error_counts.get(check, 0) + 1
        return snap

    def start(self) -> None:
        """First probe now, then one every ``interval`` seconds until ``stop()``."""
        self.refresh()

        def loop() -> None:
            while not self._stop.wait(self.interval):
                self.refresh()

        self._thread = threading.Thread(target=loop, name="superlink-probe", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the probe thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 10)

    def describe(self) -> list[Any]:
        """No up-front description: the families depend on the probe (registry check)."""
        return []

    def collect(self) -> Iterable[Any]:
        """The metric families of the last probe."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        with self._lock:
            snap, errors = self.snapshot, dict(self.error_counts)
        yield GaugeMetricFamily(
            "fedsd_superlink_up",
            "1 if the SuperLink answered GET /health with 200 at the last probe",
            value=1.0 if snap.up else 0.0,
        )
        yield GaugeMetricFamily(
            "fedsd_superlink_scrape_seconds",
            "Seconds the last probe of the SuperLink took (health, nodes, runs)",
            value=snap.seconds,
        )
        yield GaugeMetricFamily(
            "fedsd_superlink_scrape_timestamp_seconds",
            "Unix time the last probe of the SuperLink finished",
            value=snap.timestamp,
        )
        failed = CounterMetricFamily(
            "fedsd_superlink_scrape_errors",
            "Probes in which a check failed (health, nodes, runs)",
            labels=["check"],
        )
        for check in CHECKS:
            failed.add_metric([check], float(errors.get(check, 0)))
        yield failed
        if snap.nodes is not None:
            counts = dict.fromkeys(NODE_STATUSES, 0)
            online = GaugeMetricFamily(
                "fedsd_superlink_node_online",
                "1 if the SuperLink lists the node as online, 0 if registered or offline",
                labels=["node_id"],
            )
            for node_id, status in snap.nodes:
                counts[status] = counts.get(status, 0) + 1
                if status in ("online", "offline", "registered"):
                    online.add_metric([node_id], 1.0 if status == "online" else 0.0)
            nodes = GaugeMetricFamily(
                "fedsd_superlink_nodes",
                "Nodes known to the SuperLink, by status",
                labels=["status"],
            )
            for status, count in counts.items():
                nodes.add_metric([status], float(count))
            yield nodes
            yield online
        if snap.runs is not None:
            counts = dict.fromkeys(RUN_STATUSES, 0)
            for status in snap.runs:
                counts[status] = counts.get(status, 0) + 1
            runs = GaugeMetricFamily(
                "fedsd_superlink_runs", "Runs known to the SuperLink, by status", labels=["status"]
            )
            for status, count in counts.items():
                runs.add_metric([status], float(count))
            yield runs


def serve(
    port: int,
    host: str = "127.0.0.1",
    *,
    connection: str | None = None,
    flwr_home: str | None = None,
    address: str | None = None,
    root_certificates: str | None = None,
    interval: float = DEFAULT_INTERVAL,
) -> None:
    """Serve the SuperLink's metrics on ``host:port/metrics`` until SIGTERM/SIGINT.

    With ``address`` the connection is written to a private FLWR_HOME (``root_certificates``
    or, without it, an insecure connection); otherwise ``connection`` of ``flwr_home``
    (default: ``$FLWR_HOME``, then ``~/.flwr``) is used.
    """
    from prometheus_client import CollectorRegistry, start_http_server

    if address is not None:
        flwr_home = tempfile.mkdtemp(prefix="fedsd-superlink-exporter-")
        connection = connection or "watched"
        write_connection(Path(flwr_home), connection, address, root_certificates)
    probe = FlowerProbe(connection, flwr_home)
    collector = SuperLinkCollector(probe, interval)
    collector.start()
    registry = CollectorRegistry()
    registry.register(collector)
    server, thread = start_http_server(port, addr=host, registry=registry)
    print(
        f"fedsd superlink-exporter: SuperLink {probe.connection.address} every {interval:g}s "
        f"on http://{host}:{port}/metrics",
        flush=True,
    )
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    collector.stop()
    server.shutdown()
    thread.join(timeout=5)
