"""``fedsd up --local``'s deployment: real Flower services on 127.0.0.1, for one run.

Unlike the simulation engine this exercises exactly what a multi-machine deployment runs:
a SuperLink with TLS and SuperNode authentication (``--isolation process``), a separate
ServerApp SuperExec that authenticates to it with a shared secret, N authenticated
SuperNodes (each launching its own ClientApp processes) and a submission with
``flwr run --stream``. Everything it starts lives in its own process group and is stopped
at the end, on failure, on Ctrl-C and on SIGTERM.

Layout of the work directory (default ``OUT/.deploy``)::

    ca.crt superlink.crt/.key nodes/node-<i>[.pub]   fedsd.deploy.certs material
    superexec-auth.secret                            SuperLink <-> SuperExec secret (0600)
    state.db                                         SuperLink state of this deployment
    state.previous.db                                the previous deployment's
    flwr-home/config.toml                            `local` connection for the flwr CLI
    node-home/node-<i>/                              each SuperNode's FLWR_HOME (FAB installs)
    bin/flwr-clientapp/                              the SuperNodes' flwr-clientapp: Flower's
                                                     behind the app check (fedsd.deploy.pinning)
    cache/node-<i>/                                  node-config cache-dir
    logs/<service>.log                               stdout+stderr of every service
    metrics/<exporter>/                              app processes' prometheus-client files
    prometheus.yml                                   scrapes this deployment's exporters

Metrics (``metrics_port=BASE``; ``fedsd up`` uses 9400 unless ``--no-metrics``): a
``fedsd superlink-exporter`` on BASE, the ServerApp's ``fedsd metrics-exporter`` on BASE+1
and SuperNode i's on BASE+10+i (``fedsd.observability.scrape``), all on 127.0.0.1, their
multiprocess files in ``metrics/<service>/`` and a Prometheus configuration that scrapes
them in ``prometheus.yml``.

No torch and no Flower runtime are imported (the Flower services run as subprocesses).
The jobs around the deployment live beside it: ``processes`` (start, process trees,
stop), ``supervisor`` (restarts), ``control`` (node registration, a run's status and
stop, through Flower's Control API client), ``submission`` (submit, watch and resubmit
a run), ``run_config``, ``out_lock``, ``signals``, ``up`` (the ``fedsd up`` command) and
``remote`` (the launchers' view of a SuperLink elsewhere). What is left here (~630 lines,
past the ~600 guide) is one concern: starting the services in order, with their
certificates, environments, shared warm launchers and health waits.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from fedsd.common.errors import DeployError
from fedsd.common.flwr_config import write_connection
from fedsd.common.health import poll_until, probe_health, wait_healthy
from fedsd.deploy.certs import CertMaterial, NodeKey, ensure_certs
from fedsd.deploy.control import CONNECTION, FlowerControl
from fedsd.deploy.pinning import APP_DIR_ENV, SELF_HASH_ENV, fab_hash_of
from fedsd.deploy.processes import (
    DEFAULT_GRACE,
    LOCALHOST,
    Service,
    child_env,
    executable,
    free_port,
    node_thread_env,
    process_tree,
    start_service,
    stop_services,
)
from fedsd.deploy.run_config import find_app_dir, format_config_pairs
from fedsd.deploy.signals import shielded
from fedsd.deploy.submission import RunResult, StreamFn, Submitter
from fedsd.deploy.supervisor import RestartPolicy, Supervisor
from fedsd.observability.scrape import ALERTS, MetricsPorts, prometheus_config, targets

DEFAULT_STARTUP_TIMEOUT = 90.0

# What is a service's own in its environment: kept out of an app launcher it shares with
# others (each fork gets it from its own service).
APP_OWN_ENV = ("FLWR_HOME", "PROMETHEUS_MULTIPROC_DIR", APP_DIR_ENV, SELF_HASH_ENV)

_NODE_ID_RE = re.compile(r"SuperNode ID: (\d+)")  # a SuperNode's log, once its key was accepted


class LocalDeployment:
    """SuperLink + ServerApp SuperExec + N SuperNodes on 127.0.0.1; stopped on ``__exit__``.

    ``start()`` runs every step; the individual steps are public so tests can assemble
    unusual set-ups (an unregistered node, a wrong CA). Its ``supervisor`` restarts,
    ``control`` runs the flwr CLI and ``runs`` submits; the one-line delegates to them are
    what the launchers and many tests call. ``self_app_hash``: ``app_dir``'s FAB hash
    when the caller has it already (hashing walks the whole app dir).
    """

    WHO = "fedsd up"  # what its log lines start with
    # Why a run counts as lost when its SuperLink went away under it (status details).
    LINK_LOST = "the SuperLink was restarted while the run was in flight"

    def __init__(
        self,
        work_dir: str | os.PathLike[str],
        nodes: int = 2,
        *,
        port: int | None = None,
        node_configs: Sequence[Mapping[str, Any]] | None = None,
        stream: StreamFn = print,
        grace: float = DEFAULT_GRACE,
        startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
        extra_env: Mapping[str, str] | None = None,
        warm_apps: bool = False,
        metrics_port: int | None = None,
        superlink_probe_interval: float = 5.0,
        restart: RestartPolicy | None = None,
        app_dir: str | os.PathLike[str] | None = None,
        self_app_hash: str | None = None,
    ) -> None:
        if nodes < 1:
            raise ValueError(f"nodes must be >= 1, got {nodes}")
        if node_configs is not None and len(node_configs) != nodes:
            raise ValueError(f"{len(node_configs)} node configs for {nodes} nodes")
        self.work_dir = Path(work_dir).expanduser().resolve()
        self.nodes = nodes
        self.port = port
        self._fixed_port = port is not None
        self.node_configs = [dict(c) for c in node_configs] if node_configs else None
        self.stream = stream
        self.grace = grace
        self.startup_timeout = startup_timeout
        self.flwr_home = self.work_dir / "flwr-home"
        self.log_dir = self.work_dir / "logs"
        self.database = self.work_dir / "state.db"
        self.env = child_env(self.flwr_home)
        if extra_env:
            self.env.update(extra_env)
        self.certs: CertMaterial | None = None
        self.services: dict[str, Service] = {}
        self.warm_apps = warm_apps
        # The SuperNodes' own copy of the app (``self`` in their trusted-apps): this
        # deployment's app; fedsd's sources when not given.
        self.app_dir = Path(app_dir).expanduser().resolve() if app_dir is not None else None
        # Prometheus: SuperLink exporter on metrics_port, ServerApp's on +1, node i's on +10+i
        self.metrics = MetricsPorts(metrics_port) if metrics_port is not None else None
        self.superlink_probe_interval = superlink_probe_interval
        self._envs: dict[str, dict[str, str]] = {}  # to restart a service as it was started
        self._self_app_hash = self_app_hash
        self._launcher_names: dict[tuple[tuple[str, str], ...], str] = {}  # env -> name
        self.control = FlowerControl(self.env, self.work_dir)
        self.supervisor = Supervisor(self, restart)
        self.runs = Submitter(self)

    # -- context manager ------------------------------------------------------------------

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- steps ----------------------------------------------------------------------------

    @property
    def address(self) -> str:
        """``host:port`` of the SuperLink (Fleet, Control and Runtime API share it)."""
        if self.port is None:
            raise DeployError("the SuperLink port is not chosen yet")
        return f"{LOCALHOST}:{self.port}"

    def start(self) -> LocalDeployment:
        """Certificates, SuperLink, connection, registrations, SuperExec, SuperNodes."""
        self.ensure_certs()
        self.check_metrics_ports()
        self.rotate_database()
        self.start_superlink()
        self.write_connection()
        if self.metrics is not None:
            self.start_superlink_exporter()
            self.write_prometheus_config()
        self.start_superexec()  # needs no registration: overlap its start-up with it
        self.register_nodes()
        for i in range(self.nodes):
            self.start_supernode(i)
        self.wait_nodes_online(self.nodes)
        return self

    def rotate_database(self) -> None:
        """Start each deployment from fresh SuperLink state; keep the last one aside.

        Flower 1.41 SuperNodes do not deactivate themselves on SIGTERM, so a previous
        deployment's state still lists their keys as online for two heartbeat intervals
        (60 s) and refuses to activate them again (ApiError 2004). Training resumes from
        OUT (history.json and the round adapters), not from the link state, so nothing
        is lost; the previous database stays readable as ``state.previous.db``.
        """
        if not self.database.exists():
            return
        previous = self.database.with_name("state.previous.db")
        for suffix in ("", "-wal", "-shm", "-journal"):
            old = Path(f"{self.database}{suffix}")
            target = Path(f"{previous}{suffix}")
            target.unlink(missing_ok=True)
            if old.exists():
                old.replace(target)

    def ensure_certs(self) -> CertMaterial:
        """CA, SuperLink certificate and one auth key per node in the work dir (reused)."""
        for sub in ("", "flwr-home", "logs"):
            (self.work_dir / sub).mkdir(parents=True, exist_ok=True)
        self.certs = ensure_certs(self.work_dir, nodes=self.nodes)
        return self.certs

    def _require_certs(self) -> CertMaterial:
        return self.certs if self.certs is not None else self.ensure_certs()

    def start_superlink(self, *, attempts: int = 3) -> Service:
        """Start ``flower-superlink`` (TLS, node auth, process isolation, SuperExec auth)
        and wait for /health."""
        certs = self._require_certs()
        for attempt in range(1, attempts + 1):
            if not self._fixed_port:
                self.port = free_port()
            assert self.port is not None
            argv = [
                executable("flower-superlink"),
                "--ssl-ca-certfile",
                str(certs.ca_cert),
                "--ssl-certfile",
                str(certs.server_cert),
                "--ssl-keyfile",
                str(certs.server_key),
                "--enable-supernode-auth",
                "--database",
                str(self.database),
                "--isolation",
                "process",
                "--superexec-auth-secret-file",
                str(certs.superexec_secret),
                "--disable-runtime-dependency-installation",
                "--host",
                LOCALHOST,
                "--port",
                str(self.port),
            ]
            svc = self._start("superlink", argv)
            try:
                self.wait_healthy(timeout=self.startup_timeout)
                return svc
            except DeployError:
                if svc.alive() or self._fixed_port or attempt == attempts:
                    raise
                # Another process took the port between free_port() and the bind: retry.
                self._log(f"SuperLink exited during start-up (attempt {attempt}); retrying")
                del self.services["superlink"]
        raise AssertionError("unreachable")

    def wait_healthy(self, timeout: float = DEFAULT_STARTUP_TIMEOUT) -> None:
        """Poll ``GET https://127.0.0.1:PORT/health``, verifying the server with our CA."""
        ca = str(self._require_certs().ca_cert)

        def probe() -> str | None:
            svc = self.services.get("superlink")
            if svc is not None and not svc.alive():
                raise DeployError(
                    f"flower-superlink exited with status {svc.poll()} during start-up; "
                    f"log {svc.log_path}:\n{svc.log_tail()}"
                )
            return probe_health(self.address, ca, timeout=2)

        wait_healthy(self.address, probe, timeout, 0.2)

    def write_connection(self) -> Path:
        """``$FLWR_HOME/config.toml`` with the ``local`` connection (address + CA)."""
        return self._write_connection(self._require_certs().ca_cert)

    def _write_connection(self, ca_cert: Path) -> Path:
        header = f"Written by {self.WHO}: the connection `flwr run ... local` uses."
        return write_connection(
            self.flwr_home, CONNECTION, self.address, str(ca_cert), header=header
        )

    @property
    def restarts(self) -> dict[str, int]:
        """Service name -> restarts so far (the supervisor's count)."""
        return self.supervisor.restarts

    def supervise(self) -> None:
        """Restart what died (``Supervisor.supervise``); called while waiting on anything."""
        self.supervisor.supervise()

    def flwr(
        self, *args: str, timeout: float = 60.0, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """Run a ``flwr`` CLI command against this deployment (our FLWR_HOME)."""
        return self.control.flwr(*args, timeout=timeout, check=check)

    def register_nodes(self, keys: Sequence[NodeKey] | None = None) -> dict[str, str]:
        """Register node public keys (default: this deployment's)."""
        keys = list(keys if keys is not None else self._require_certs().node_keys)
        return self.control.register_nodes(keys)

    def run_status(self, run_id: str) -> tuple[str | None, str | None]:
        """``(status, status-details)`` of a run from ``flwr ls --run-id``."""
        return self.control.run_status(run_id)

    def submit(
        self,
        app_dir: str | os.PathLike[str],
        overrides: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> RunResult:
        """Submit a run and watch it to its end (``Submitter.submit``)."""
        return self.runs.submit(app_dir, overrides, timeout=timeout)

    def start_superexec(self) -> Service:
        """The ServerApp executor for ``--isolation process``: polls the Runtime API for tasks.

        In 1.41 SuperExec picks the executable from the task type (``--plugin-type`` is
        deprecated and ignored) and installs no dependencies unless
        ``--allow-runtime-dependency-installation`` is given. It holds the secret the
        SuperLink was started with: a SuperExec without it is refused every task.
        """
        certs = self._require_certs()
        argv = [
            executable("flower-superexec"),
            "--runtime-api-address",
            self.address,
            "--root-certificates",
            str(certs.ca_cert),
            "--superexec-auth-secret-file",
            str(certs.superexec_secret),
        ]
        env = dict(self.env)
        if self.metrics is not None:
            env.update(self.start_exporter("metrics-serverapp", self.metrics.serverapp, env))
        if self.warm_apps:
            env.update(self.app_launcher("flwr-serverapp", env))
        return self._start("superexec", argv, env=env)

    def node_config(self, index: int) -> dict[str, Any]:
        """``--node-config`` of SuperNode ``index`` (partition, and paths from the runner)."""
        if self.node_configs is not None:
            return dict(self.node_configs[index])
        return {"partition-id": index, "num-partitions": self.nodes}

    def self_app_hash(self) -> str:
        """The SHA-256 of the FAB of this deployment's app (the nodes' ``self`` pin), built
        once: rebuilding it per message walks the whole app directory (a venv in it costs
        seconds each time)."""
        if self._self_app_hash is None:
            self._self_app_hash = fab_hash_of(self.app_dir or find_app_dir())
        return self._self_app_hash

    def start_supernode(
        self,
        index: int,
        *,
        node_config: Mapping[str, Any] | None = None,
        private_key: str | os.PathLike[str] | None = None,
        root_certificates: str | os.PathLike[str] | None = None,
        runtime_port: int | None = None,
        name: str | None = None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> Service:
        """Start SuperNode ``index`` (Flower's, with paced waits: ``fedsd.deploy.supernode``)
        with its auth key and own Runtime API port.

        Each node gets its own FLWR_HOME: Flower installs the FAB there with a non-atomic
        "mkdir, then copy" that would race between nodes sharing one home. Its
        ``flwr-clientapp`` is always the shim (``fedsd.deploy.warmstart``), i.e. Flower's behind
        the app check (``fedsd.deploy.pinning``), with or without a warm launcher; its own copy
        of the app (``self``) is this deployment's (``FEDSD_APP_DIR``). ``env``: more
        environment for this node only (its exporter, app launcher and ClientApps inherit
        it; a restart keeps it).
        """
        certs = self._require_certs()
        config = dict(node_config) if node_config is not None else self.node_config(index)
        key = private_key if private_key is not None else certs.node_keys[index].private_key
        node_home = self.work_dir / "node-home" / f"node-{index}"
        node_home.mkdir(parents=True, exist_ok=True)
        argv = [
            sys.executable,  # Flower's flower-supernode, paced (fedsd.deploy.supernode)
            "-m",
            "fedsd.deploy.supernode",
            "--superlink",
            self.address,
            "--root-certificates",
            str(root_certificates or certs.ca_cert),
            "--auth-supernode-private-key",
            str(key),
            "--isolation",
            "subprocess",
            "--host",
            LOCALHOST,
            "--port",
            str(runtime_port or free_port()),
        ]
        if config:
            argv += ["--node-config", format_config_pairs(config)]
        argv += list(extra_args)
        extra_env = dict(env or {})
        env = {
            **self.env,
            **extra_env,
            "FLWR_HOME": str(node_home),
            **node_thread_env(self.nodes, self.env),
        }
        env[APP_DIR_ENV] = str(self.app_dir or find_app_dir())
        env[SELF_HASH_ENV] = self.self_app_hash()
        if self.metrics is not None:
            port = self.metrics.node(index)
            env.update(self.start_exporter(f"metrics-node-{index}", port, env))
        if self.warm_apps:
            own = f"launcher-{index}" if extra_env else None
            env.update(self.app_launcher("flwr-clientapp", env, own=own))
        else:
            env["PATH"] = os.pathsep.join([str(self._shim_dir("flwr-clientapp")), env["PATH"]])
        return self._start(name or f"supernode-{index}", argv, env=env)

    def start_exporter(self, name: str, port: int, env: Mapping[str, str]) -> dict[str, str]:
        """Start a metrics exporter (``fedsd metrics-exporter``) on ``port`` for the app
        processes of one service; return the environment those processes need."""
        prom_dir = self.work_dir / "metrics" / name
        if prom_dir.exists():  # a fresh deployment starts from zero, like the SuperLink
            shutil.rmtree(prom_dir)
        prom_dir.mkdir(parents=True)
        argv = [sys.executable, "-m", "fedsd.cli", "metrics-exporter", "--port", str(port)]
        argv += ["--multiproc-dir", str(prom_dir), "--host", LOCALHOST]
        self._start(name, argv, env=env)
        return {"PROMETHEUS_MULTIPROC_DIR": str(prom_dir)}

    def check_metrics_ports(self) -> None:
        """Refuse to start when an exporter port is taken (e.g. by another ``fedsd up``):
        the exporter would die after the SuperLink started, and take the run with it."""
        if self.metrics is None:
            return
        busy = []
        for port in self.metrics.all(self.nodes):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                # as the exporter's HTTP server binds: a port in TIME_WAIT is free
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind((LOCALHOST, port))
                except OSError:
                    busy.append(port)
        if busy:
            raise DeployError(
                f"metrics port(s) {', '.join(map(str, busy))} on {LOCALHOST} are in use "
                f"(another fedsd up?): the exporters use {self.metrics.base} (SuperLink), "
                f"{self.metrics.serverapp} (ServerApp) and {self.metrics.node(0)}+i (SuperNode "
                "i); pass --metrics-port BASE to move them, or --no-metrics"
            )

    def start_superlink_exporter(self) -> Service:
        """``fedsd superlink-exporter`` on the base metrics port, watching this SuperLink
        through the ``local`` connection (health, nodes, runs)."""
        assert self.metrics is not None
        argv = [sys.executable, "-m", "fedsd.cli", "superlink-exporter"]
        argv += ["--port", str(self.metrics.superlink), "--host", LOCALHOST]
        argv += ["--flwr-home", str(self.flwr_home), "--connection", CONNECTION]
        argv += ["--interval", f"{self.superlink_probe_interval:g}"]
        return self._start("metrics-superlink", argv)

    def write_prometheus_config(self, scrape_interval: str = "5s") -> Path:
        """``prometheus.yml`` in the work dir: scrapes this deployment's exporters, with
        the repository's alert rules (``prometheus --config.file=PATH``)."""
        assert self.metrics is not None
        rules = (str(ALERTS),) if ALERTS.is_file() else ()
        text = prometheus_config(
            targets(self.nodes, LOCALHOST, self.metrics.base),
            scrape_interval=scrape_interval,
            rule_files=rules,
            header="Written by fedsd up --local for this deployment's metrics ports.",
        )
        path = self.work_dir / "prometheus.yml"
        path.write_text(text, encoding="utf-8")
        self._log(
            f"metrics on http://{LOCALHOST}:{self.metrics.superlink}/metrics (SuperLink), "
            f":{self.metrics.serverapp} (ServerApp), :{self.metrics.node(0)}+i (SuperNode i); "
            f"Prometheus config {path}"
        )
        return path

    def app_launcher(
        self, entry: str, env: Mapping[str, str], *, own: str | None = None
    ) -> dict[str, str]:
        """The warm launcher (``fedsd.deploy.warmstart``) a service's ``entry`` processes
        (``flwr-clientapp`` or ``flwr-serverapp``) fork from; returns what that service's
        environment needs to use it (the shim first on ``PATH``, the socket).

        Services whose environments agree but for what is each one's own
        (``APP_OWN_ENV``: FLWR_HOME, metrics directory, app pins) share one launcher: each
        fork takes its service's environment from the shim's request, and each launcher
        costs a torch and diffusers import (~13 CPU-s, ~400 MB), which N nodes and a
        ServerApp on one machine would pay N + 1 times (``launcher-apps``, and
        ``launcher-apps-K`` for each other environment, e.g. nodes whose torch threads
        differ from the ServerApp's). A service given its own launcher (``own``, a name)
        gets one: an environment that may change the interpreter itself (``PYTHONPATH``,
        ``sitecustomize``) cannot be applied by a fork.
        """
        from fedsd.deploy.warmstart import SOCKET_ENV

        shared = {k: v for k, v in env.items() if k not in APP_OWN_ENV}
        name = own
        if name is None:
            key = tuple(sorted(shared.items()))
            count = len(self._launcher_names)
            name = self._launcher_names.setdefault(
                key, "launcher-apps" + (f"-{count + 1}" if count else "")
            )
        sock = self._launcher_socket(name)
        if name not in self.services:  # the first service that needs it starts it
            argv = [sys.executable, "-m", "fedsd.cli", "app-launcher", "--socket", str(sock)]
            self._start(name, argv, env=shared)
        path = os.pathsep.join([str(self._shim_dir(entry)), env.get("PATH", "")])
        return {SOCKET_ENV: str(sock), "PATH": path}

    def _launcher_socket(self, name: str) -> Path:
        """``WORK/run/NAME.sock``, or under the temp dir when that path is too long."""
        sock = self.work_dir / "run" / f"{name}.sock"
        if len(str(sock)) > 100:  # AF_UNIX paths are limited to 107 bytes
            digest = hashlib.sha256(str(self.work_dir).encode()).hexdigest()[:12]
            sock = Path(tempfile.gettempdir()) / f"fedsd-{digest}" / f"{name}.sock"
        return sock

    def _shim_dir(self, entry: str) -> Path:
        """A folder holding only the ``entry`` shim (``fedsd.deploy.warmstart.install_shim``)."""
        from fedsd.deploy.warmstart import install_shim

        return install_shim(self.work_dir / "bin" / entry, entry).parent

    def wait_nodes_online(
        self, count: int | None = None, timeout: float | None = None
    ) -> dict[str, str]:
        """Wait until the started SuperNodes are activated, so round 1 sees all of them.

        A SuperNode logs ``SuperNode ID: <id>`` once the SuperLink accepted its key; reading
        that from its log costs nothing, where each ``flwr supernode list`` costs ~2 s.
        Returns ``{service name: node id}``.
        """
        timeout = self.startup_timeout if timeout is None else timeout
        nodes = [s for s in self.services.values() if s.name.startswith("supernode")]
        count = len(nodes) if count is None else count
        ids: dict[str, str] = {}

        def online() -> dict[str, str] | None:
            self.supervise()
            for svc in nodes:
                if m := _NODE_ID_RE.search(svc.log_since_start()):
                    ids[svc.name] = m.group(1)
            return ids if len(ids) >= count else None

        if poll_until(online, timeout, 0.2) is None:
            raise DeployError(f"only {len(ids)} of {count} SuperNodes online after {timeout:.0f}s")
        self._log(f"{len(ids)} SuperNode(s) online")
        return ids

    def respawn(self, svc: Service) -> Service:
        """Stop what is left of ``svc`` (a node's ClientApps go with it) and start it again
        with the argv and environment it was started with (the supervisor's restarts)."""
        stop_services([svc], grace=2.0)
        new = start_service(
            svc.name,
            svc.argv,
            env=self._envs.get(svc.name, self.env),
            log_dir=self.log_dir,
            cwd=self.work_dir,
        )
        self.services[svc.name] = new
        return new

    def serverapp_pids(self) -> list[int]:
        """Live ``flwr-serverapp`` processes under the SuperExec (the warm-start shim stays
        until its forked ServerApp exits, so this covers both ways of starting it)."""
        exe = self.services.get("superexec")
        if exe is None or not exe.alive():
            return []
        pids = []
        for pid in process_tree([exe.pid]):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if pid != exe.pid and b"flwr-serverapp" in cmdline:
                pids.append(pid)
        return pids

    def stop(self) -> None:
        """Stop every service (and its ServerApp/ClientApp processes)."""
        if not self.services:
            return
        with shielded():
            # Nodes first (they would otherwise log reconnect errors), then the rest.
            nodes = [s for s in self.services.values() if s.name.startswith("supernode")]
            others = [s for s in self.services.values() if s not in nodes]
            stop_services(nodes, grace=self.grace)
            stop_services(others, grace=self.grace)
            self.services.clear()

    def log_tails(self, lines: int = 15) -> str:
        """Tails of what the running services logged in this deployment (failure reports)."""
        chunks = []
        for svc in self.services.values():
            tail = "\n".join(svc.log_since_start().splitlines()[-lines:])
            if tail:
                chunks.append(f"----- {svc.log_path} (last {lines} lines) -----\n{tail}")
        return "\n".join(chunks)

    # -- helpers --------------------------------------------------------------------------

    def _start(
        self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None
    ) -> Service:
        if name in self.services and self.services[name].alive():
            raise DeployError(f"service {name} is already running")
        svc = start_service(
            name, argv, env=env or self.env, log_dir=self.log_dir, cwd=self.work_dir
        )
        self.services[name] = svc
        self._envs[name] = dict(env or self.env)
        self._log(f"started {name} (pid {svc.pid}), log {svc.log_path}")
        return svc

    def _log(self, message: str) -> None:
        self.stream(f"{self.WHO}: {message}")
