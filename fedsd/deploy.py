"""``fedsd up --local``: a real Flower deployment on 127.0.0.1, started and torn down for one run.

Unlike the simulation engine this exercises exactly what a multi-machine deployment runs:
a SuperLink with TLS and SuperNode authentication (``--isolation process``), a separate
ServerApp SuperExec, N authenticated SuperNodes (each launching its own ClientApp
processes) and a submission with ``flwr run --stream``. Everything it starts lives in its
own process group and is stopped at the end, on failure, on Ctrl-C and on SIGTERM.

Layout of the work directory (default ``OUT/.deploy``)::

    ca.crt superlink.crt/.key nodes/node-<i>[.pub]   fedsd.certs material
    state.db                                         SuperLink state of this deployment
    state.previous.db                                the previous deployment's
    flwr-home/config.toml                            `local` connection for the flwr CLI
    node-home/node-<i>/                              each SuperNode's FLWR_HOME (FAB installs)
    cache/node-<i>/                                  node-config cache-dir
    logs/<service>.log                               stdout+stderr of every service
    metrics/<exporter>/                              app processes' prometheus-client files
    prometheus.yml                                   scrapes this deployment's exporters

Metrics (``metrics_port=BASE``; ``fedsd up`` uses 9400 unless ``--no-metrics``): a
``fedsd superlink-exporter`` on BASE, the ServerApp's ``fedsd metrics-exporter`` on BASE+1
and SuperNode i's on BASE+10+i (``fedsd.observability``), all on 127.0.0.1, their
multiprocess files in ``metrics/<service>/`` and a Prometheus configuration that scrapes
them in ``prometheus.yml``.

Only ``fedsd.certs``, ``fedsd.config`` and ``fedsd.observability`` are imported: no torch,
no Flower (the Flower commands run as subprocesses).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import math
import os
import queue
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, TYPE_CHECKING, Any

from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE

from fedsd.certs import CertMaterial, NodeKey, ensure_certs
from fedsd.config import ConfigError, RunConfig
from fedsd.observability import ALERTS, MetricsPorts, prometheus_config, targets

if TYPE_CHECKING:
    from fedsd.progress import ProgressView

__all__ = [
    "CONNECTION",
    "DeployError",
    "LocalDeployment",
    "OutInUse",
    "RestartPolicy",
    "RunResult",
    "Service",
    "ShardsError",
    "build_run_config",
    "check_shards",
    "child_env",
    "find_app_dir",
    "format_config_pairs",
    "free_port",
    "hold_out_lock",
    "load_app_config",
    "parse_run_config",
    "resubmittable",
    "run_local",
    "run_local_from_args",
    "start_service",
    "stop_services",
    "tail_file",
]

CONNECTION = "local"
LOCALHOST = "127.0.0.1"
DEFAULT_GRACE = 10.0
DEFAULT_STARTUP_TIMEOUT = 90.0
EXIT_TIMEOUT = 124
DEFAULT_MAX_RESTARTS = 5
DEFAULT_MAX_RESUBMITS = 3
# How long the SuperLink keeps a dead node's session (it refuses the key meanwhile): two
# missed heartbeats, from Flower's own constants, plus a margin.
NODE_SESSION_SECONDS = float(HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL + 2)
EXIT_SIGINT = 130
EXIT_SIGTERM = 143

StreamFn = Callable[[str], None]


class DeployError(RuntimeError):
    """A Flower service failed to start, died, or refused a request."""


class ShardsError(FileNotFoundError):
    """The shard directory the SuperNodes need is missing or incomplete."""


class OutInUse(DeployError):
    """Another ``fedsd up`` holds this OUT (or work dir)."""


LOCK_NAME = ".fedsd-up.lock"


@contextlib.contextmanager
def hold_out_lock(*dirs: str | os.PathLike[str]) -> Iterator[None]:
    """One ``fedsd up`` per OUT: an exclusive ``flock`` on ``DIR/.fedsd-up.lock`` (our pid
    written in it) for each of ``dirs``, held until the block ends.

    Taken before anything in OUT is touched, so a second run cannot move the first one's
    state.db aside or rewrite its connection. The kernel drops the lock when the holder
    dies, so a crashed run never blocks the next one.
    """
    fds: list[int] = []
    try:
        for d in dict.fromkeys(Path(x) for x in dirs):  # once each, in order
            d.mkdir(parents=True, exist_ok=True)
            path = d / LOCK_NAME
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            fds.append(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _lock_holder(fd)
                raise OutInUse(
                    f"{d} is in use by another fedsd up (pid {holder}); wait for it to end "
                    f"or stop it (kill {holder}), or use another --out"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        for fd in fds:
            os.close(fd)  # releases the lock; the file stays (unlinking it would race)


def _lock_holder(fd: int) -> str:
    """The pid the holder wrote (it writes it right after locking: wait a moment for it)."""
    for _ in range(20):
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        if text.isdigit():
            return text
        time.sleep(0.05)
    return "unknown"


class _Interrupted(BaseException):
    """Raised from the SIGTERM/SIGHUP handler so that ``finally`` blocks tear down."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


# --------------------------------------------------------------------------- run config


def find_app_dir() -> Path:
    """The fedsd Flower app: the repository root holding the pyproject with ``[tool.flwr.app]``.

    ``flwr run`` builds the FAB from a directory, so the app only exists in a source checkout
    (or an image that copies it), not in an installed wheel.
    """
    import fedsd

    root = Path(fedsd.__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    if not _has_flwr_app(pyproject):
        raise DeployError(
            f"no Flower app found: {pyproject} is missing or has no [tool.flwr.app] table. "
            "`fedsd up` needs the fedsd source tree (it builds the FAB from it); "
            "pass --app-dir DIR to use another app directory."
        )
    return root


def load_app_config(app_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The app's run-config defaults (``[tool.flwr.app.config]``), flattened like Flower does."""
    pyproject = Path(app_dir) / "pyproject.toml"
    if not pyproject.is_file():
        raise FileNotFoundError(f"no pyproject.toml in the Flower app directory {app_dir}")
    with pyproject.open("rb") as fh:
        data = tomllib.load(fh)
    app = data.get("tool", {}).get("flwr", {}).get("app")
    if not isinstance(app, dict):
        raise DeployError(f"{pyproject} has no [tool.flwr.app] table: not a Flower app")
    return _flatten(app.get("config", {}))


def parse_run_config(items: str | Sequence[str] | None) -> dict[str, Any]:
    """Parse ``"k1=v1 k2=v2"`` strings as ``flwr run --run-config`` does (values are TOML).

    A single item ending in ``.toml`` is read as a TOML file of overrides.
    """
    if items is None:
        return {}
    if isinstance(items, str):
        items = [items]
    items = [i for i in items if i and i.strip()]
    if len(items) == 1 and items[0].strip().endswith(".toml"):
        path = Path(items[0].strip()).expanduser()
        try:
            with path.open("rb") as fh:
                return _flatten(tomllib.load(fh))
        except FileNotFoundError as exc:
            raise ConfigError(f"run-config file not found: {path}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"invalid TOML in run-config file {path}: {exc}") from exc
    out: dict[str, Any] = {}
    for item in items:
        if item.strip().endswith(".toml"):
            raise ConfigError("a run-config TOML file cannot be combined with key=value pairs")
        matches = _PAIR_RE.findall(item)
        leftover = _PAIR_RE.sub("", item).strip()
        if leftover:
            raise ConfigError(
                f"invalid run config {item!r}: could not parse {leftover!r}; expected "
                "space-separated key=value pairs, e.g. 'lora-rank=4 lora-variant=\"ffa\"'"
            )
        try:
            parsed = tomllib.loads("\n".join(f"{k} = {v}" for k, v in matches))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(
                f"invalid run config {item!r}: {exc}; values must be TOML (bool, int, float "
                "or a quoted string)"
            ) from exc
        out.update(_flatten(parsed))
    return out


# Flower's own pattern (flwr.common.config.parse_config_args): unquoted values stop at
# whitespace, quoted ones may contain spaces.
_PAIR_RE = re.compile(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)")


def format_config_pairs(config: Mapping[str, Any]) -> str:
    """The inverse of :func:`parse_run_config`: ``k="v" k2=3`` that Flower parses back."""
    return " ".join(f"{key}={_toml_value(key, value)}" for key, value in config.items())


def build_run_config(
    app_dir: str | os.PathLike[str],
    overrides: Mapping[str, Any] | str | Sequence[str] | None = None,
    *,
    rounds: int | None = None,
    model: str | None = None,
    out: str | os.PathLike[str] | None = None,
    validate: bool = True,
    privacy: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return ``(overrides, effective)`` for a run; refuse bad values before anything starts.

    ``overrides`` are what ``flwr run --run-config`` receives; ``effective`` is the app
    defaults with them applied. ``rounds``/``model`` override ``num-server-rounds``/``model``
    (an existing local model directory becomes absolute, since the services run elsewhere)
    and ``out`` sets ``out-dir`` (absolute) when the app defines that key. Every override key
    must exist in the app's ``[tool.flwr.app.config]`` (the SuperLink would refuse the run
    otherwise). With ``validate`` the result goes through ``RunConfig.from_mapping``.
    """
    defaults = load_app_config(app_dir)
    if isinstance(overrides, Mapping):
        merged: dict[str, Any] = _flatten(dict(overrides))
    else:
        merged = parse_run_config(overrides)
    if rounds is not None:
        merged["num-server-rounds"] = rounds
    if privacy is not None:
        merged["privacy"] = privacy
    if model is not None:
        path = Path(model).expanduser()
        merged["model"] = str(path.resolve()) if path.is_dir() else model
    if out is not None and "out-dir" in defaults:
        merged["out-dir"] = str(Path(out).expanduser().resolve())
    unknown = sorted(set(merged) - set(defaults))
    if unknown:
        raise ConfigError(
            f"invalid run config: unknown key(s) {', '.join(unknown)}; the app "
            f"({Path(app_dir) / 'pyproject.toml'}) defines: {', '.join(sorted(defaults))}"
        )
    for key, value in merged.items():
        _toml_value(key, value)  # refuse what cannot be passed to flwr on the command line
    effective = {**defaults, **merged}
    if validate:
        RunConfig.from_mapping(effective)
    return merged, effective


def check_privacy_for_nodes(cfg: RunConfig, nodes: int) -> None:
    """Refuse, before anything starts, a privacy setting these ``nodes`` cannot run."""
    if "secagg" not in cfg.privacy.components:
        return
    from fedsd.privacy import check_secagg

    if nodes < 2:
        raise ConfigError(f"privacy={cfg.privacy.privacy!r} needs at least 2 nodes, got {nodes}")
    sampled = min(nodes, max(cfg.min_nodes, math.ceil(cfg.fraction_train * nodes)))
    check_secagg(sampled, cfg.privacy)


def check_shards(shards: str | os.PathLike[str], nodes: int) -> Path:
    """Make sure ``shards/shard-<i>/train/metadata.jsonl`` exists for every node."""
    root = Path(shards).expanduser().resolve()
    hint = f"create them with: fedsd shards --num-shards {nodes} --out {root}"
    if not root.is_dir():
        raise ShardsError(f"shard directory {root} does not exist; {hint}")
    for i in range(nodes):
        meta = root / f"shard-{i}" / "train" / "metadata.jsonl"
        if not meta.is_file():
            raise ShardsError(
                f"shard-{i} (for SuperNode {i} of {nodes}) is missing or incomplete: "
                f"{meta} not found; {hint}"
            )
    return root


# --------------------------------------------------------------------------- processes


def free_port(host: str = LOCALHOST) -> int:
    """A TCP port nobody listens on right now (the OS picks it, so parallel runs don't clash)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def child_env(
    flwr_home: str | os.PathLike[str], base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Environment of every Flower process: no telemetry, no update check, our FLWR_HOME.

    The interpreter's bin directory goes first on PATH because SuperNodes and SuperExecs
    start ``flower-superexec``/``flwr-clientapp``/``flwr-serverapp`` by name.
    """
    env = dict(os.environ if base is None else base)
    env.update(
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_HOME=str(flwr_home),
        PYTHONUNBUFFERED="1",
    )
    bin_dir = str(Path(sys.executable).parent)
    path = env.get("PATH", "")
    if bin_dir not in path.split(os.pathsep):
        env["PATH"] = os.pathsep.join(p for p in (bin_dir, path) if p)
    return env


def node_thread_env(nodes: int, base: Mapping[str, str]) -> dict[str, str]:
    """CPU threads per SuperNode when all of them share this machine's cores.

    Each ClientApp's torch would otherwise start one thread per core, and N nodes
    training at once oversubscribe the CPU: OpenMP's spinning threads then slow every
    step by an order of magnitude. An explicit OMP_NUM_THREADS in the environment wins.
    """
    if "OMP_NUM_THREADS" in base:
        return {}
    threads = str(max(1, (os.cpu_count() or 1) // max(1, nodes)))
    return {"OMP_NUM_THREADS": threads}  # torch sizes its intra-op pool from it


def _executable(name: str) -> str:
    """Prefer the command installed next to this interpreter (a venv need not be activated)."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise DeployError(f"`{name}` not found: is flwr installed in this environment?")
    return found


@dataclass
class Service:
    """One started process (and its process group) with its log file."""

    name: str
    argv: list[str]
    log_path: Path
    process: subprocess.Popen[bytes]
    log_offset: int = 0
    started_at: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        """Process id, which is also the process-group id (each service leads its group)."""
        return self.process.pid

    def poll(self) -> int | None:
        """Exit status, or None while running."""
        return self.process.poll()

    def alive(self) -> bool:
        """Whether the main process still runs."""
        return self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the service log (for error messages)."""
        return tail_file(self.log_path, lines)

    def log_since_start(self) -> str:
        """What this start of the service logged (logs are appended to across runs)."""
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(self.log_offset)
                return fh.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self, grace: float = DEFAULT_GRACE) -> None:
        """SIGTERM the whole tree, SIGKILL what is left after ``grace`` seconds."""
        stop_services([self], grace=grace)


def tail_file(path: str | os.PathLike[str], lines: int = 30) -> str:
    """Last ``lines`` lines of a text file ('' if it does not exist)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            data = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


def _pdeathsig() -> None:  # pragma: no cover - runs in the forked child
    """Linux: have the kernel SIGTERM the child if the runner dies without cleaning up."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort, never block the start
        pass


def start_service(
    name: str,
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    log_dir: str | os.PathLike[str],
    cwd: str | os.PathLike[str] | None = None,
    die_with_parent: bool = True,
) -> Service:
    """Start ``argv`` in a new session/process group, stdout+stderr to ``log_dir/name.log``.

    The own process group lets us signal the service together with the SuperExec and
    ServerApp/ClientApp processes it spawns, and keeps a terminal Ctrl-C from reaching them
    before we stop them in order.
    """
    log_path = Path(log_dir) / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        offset = log.tell()
        log.write(f"==> {' '.join(argv)}\n".encode())
        log.flush()
        process = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_pdeathsig if (die_with_parent and sys.platform == "linux") else None,
        )
    return Service(name, list(argv), log_path, process, log_offset=offset)


def _proc_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, pgid, start time) from /proc (Linux); empty elsewhere."""
    table: dict[int, tuple[int, int, str]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return table
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read().decode("utf-8", "replace")
        except OSError:
            continue
        # The command name (field 2) may contain spaces: split after its closing paren.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) < 20 or fields[0] == "Z":
            continue
        table[int(entry)] = (int(fields[1]), int(fields[2]), fields[19])
    return table


def _tree(pids: Iterable[int], pgids: Iterable[int] = ()) -> dict[int, str]:
    """Live processes that are ``pids``, in process groups ``pgids``, or descend from those.

    Returns pid -> start time (to recognise a pid that was reused by then).
    """
    table = _proc_table()
    groups = set(pgids)
    found = {pid: table[pid][2] for pid in set(pids) if pid in table}
    found.update({pid: info[2] for pid, info in table.items() if info[1] in groups})
    changed = True
    while changed:
        changed = False
        for pid, (ppid, _, start) in table.items():
            if ppid in found and pid not in found:
                found[pid] = start
                changed = True
    return found


def _signal_all(services: Sequence[Service], known: Mapping[int, str], sig: int) -> None:
    table = _proc_table()
    for svc in services:
        # A group id cannot be reused while the leader is unreaped or the group has members.
        if svc.process.returncode is None or any(i[1] == svc.pid for i in table.values()):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(svc.pid, sig)
    for pid, start in known.items():
        # Only signal a pid that still is the same process (guard against pid reuse).
        if pid in table and table[pid][2] == start:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)


def stop_services(services: Sequence[Service], grace: float = DEFAULT_GRACE) -> None:
    """Stop services with everything they spawned: SIGTERM, wait ``grace``, then SIGKILL.

    Descendants are recorded before signalling, so grandchildren that moved to another
    process group (or were re-parented when their parent died) are still found.
    """
    if not services:
        return
    for svc in services:
        svc.poll()
    # An unreaped leader's pid, and the id of a group with members, cannot have been reused.
    known = _tree(
        [svc.pid for svc in services if svc.process.returncode is None],
        [svc.pid for svc in services],
    )
    _signal_all(services, known, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        for svc in services:
            svc.poll()
        # A process spawned while its parent was shutting down is caught here too. Only
        # pids that are provably still ours seed the search (pids get reused).
        table = _proc_table()
        seeds = [svc.pid for svc in services if svc.process.returncode is None]
        seeds += [p for p, t in known.items() if p in table and table[p][2] == t]
        fresh = {p: t for p, t in _tree(seeds, seeds).items() if p not in known}
        if fresh:
            known.update(fresh)
            _signal_all([], fresh, signal.SIGTERM)
        if all(not svc.alive() for svc in services) and not _alive(known):
            break
        time.sleep(0.1)
    if any(svc.alive() for svc in services) or _alive(known):
        _signal_all(services, known, signal.SIGKILL)
    for svc in services:
        with contextlib.suppress(subprocess.TimeoutExpired):
            svc.process.wait(timeout=5)


def _alive(known: Mapping[int, str]) -> bool:
    table = _proc_table()
    return any(pid in table and table[pid][2] == start for pid, start in known.items())


# --------------------------------------------------------------------------- deployment


@dataclass
class RunResult:
    """Outcome of one submitted run."""

    exit_code: int
    run_id: str | None = None
    status: str | None = None
    details: str | None = None
    seconds: float = 0.0


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


class LocalDeployment:
    """SuperLink + ServerApp SuperExec + N SuperNodes on 127.0.0.1; stopped on ``__exit__``.

    ``start()`` runs every step; the individual steps are public so tests can assemble
    unusual set-ups (an unregistered node, a wrong CA).
    """

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
        # Prometheus: SuperLink exporter on metrics_port, ServerApp's on +1, node i's on +10+i
        self.metrics = MetricsPorts(metrics_port) if metrics_port is not None else None
        self.superlink_probe_interval = superlink_probe_interval
        self.restart = restart if restart is not None else RestartPolicy()
        self.restarts: dict[str, int] = {}  # service name -> restarts so far
        self._envs: dict[str, dict[str, str]] = {}  # to restart a service as it was started
        self._due: dict[str, float] = {}  # dead service -> when its restart is due
        self._recorders: list[subprocess.Popen[bytes]] = []
        self._session_until: dict[str, float] = {}  # node -> its old session surely expired
        self._died: dict[str, float] = {}  # when a service awaiting restart was found dead

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
        """Start ``flower-superlink`` (TLS, node auth, process isolation) and wait for /health."""
        certs = self._require_certs()
        for attempt in range(1, attempts + 1):
            if not self._fixed_port:
                self.port = free_port()
            assert self.port is not None
            argv = [
                _executable("flower-superlink"),
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
        certs = self._require_certs()
        ctx = ssl.create_default_context(cafile=str(certs.ca_cert))
        url = f"https://{self.address}/health"
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            svc = self.services.get("superlink")
            if svc is not None and not svc.alive():
                raise DeployError(
                    f"flower-superlink exited with status {svc.poll()} during start-up; "
                    f"log {svc.log_path}:\n{svc.log_tail()}"
                )
            try:
                with urllib.request.urlopen(url, context=ctx, timeout=2) as resp:
                    if resp.status == 200:
                        return
                    last = f"HTTP {resp.status}"
            except (urllib.error.URLError, OSError) as exc:
                last = exc
            time.sleep(0.2)
        raise DeployError(f"SuperLink not healthy at {url} after {timeout:.0f}s: {last}")

    def write_connection(self) -> Path:
        """``$FLWR_HOME/config.toml`` with the ``local`` connection (address + CA)."""
        certs = self._require_certs()
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        path = self.flwr_home / "config.toml"
        path.write_text(
            "# Written by fedsd up --local: the connection `flwr run ... local` uses.\n"
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f"[superlink.{CONNECTION}]\n"
            f"address = {json.dumps(self.address)}\n"
            f"root-certificates = {json.dumps(str(certs.ca_cert))}\n",
            encoding="utf-8",
        )
        return path

    def flwr(
        self, *args: str, timeout: float = 60.0, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """Run a ``flwr`` CLI command against this deployment (our FLWR_HOME)."""
        argv = [_executable("flwr"), *args]
        try:
            res = subprocess.run(
                argv,
                env=self.env,
                cwd=self.work_dir,
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

    def register_nodes(self, keys: Sequence[NodeKey] | None = None) -> dict[str, str]:
        """Register node public keys (concurrently: each flwr call costs ~2 s of start-up)."""
        keys = list(keys if keys is not None else self._require_certs().node_keys)
        argv_base = [_executable("flwr"), "supernode", "register"]
        procs = [
            subprocess.Popen(
                [*argv_base, str(k.public_key), CONNECTION, "--format", "json"],
                env=self.env,
                cwd=self.work_dir,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                text=True,
            )
            for k in keys
        ]
        results: dict[str, str] = {}
        errors: list[str] = []
        for key, proc in zip(keys, procs, strict=True):
            try:
                out, err = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            try:
                results[str(key.public_key)] = _register_outcome(proc.returncode, out, err)
            except DeployError as exc:
                errors.append(f"{key.public_key}: {exc}")
        if errors:
            raise DeployError("node registration failed:\n" + "\n".join(errors))
        return results

    def register_node(self, public_key: str | os.PathLike[str]) -> str:
        """Register one key; returns ``registered`` or ``already registered`` (not an error)."""
        res = self.flwr(
            "supernode", "register", str(public_key), CONNECTION, "--format", "json", timeout=60
        )
        return _register_outcome(res.returncode, res.stdout, res.stderr)

    def start_superexec(self) -> Service:
        """The ServerApp executor for ``--isolation process``: polls the Runtime API for tasks.

        In 1.41 SuperExec picks the executable from the task type (``--plugin-type`` is
        deprecated and ignored) and installs no dependencies unless
        ``--allow-runtime-dependency-installation`` is given.
        """
        certs = self._require_certs()
        argv = [
            _executable("flower-superexec"),
            "--runtime-api-address",
            self.address,
            "--root-certificates",
            str(certs.ca_cert),
        ]
        env = dict(self.env)
        if self.metrics is not None:
            env.update(self.start_exporter("metrics-serverapp", self.metrics.serverapp, env))
        if self.warm_apps:
            env.update(self.start_launcher("launcher-serverapp", "flwr-serverapp", env))
        return self._start("superexec", argv, env=env)

    def node_config(self, index: int) -> dict[str, Any]:
        """``--node-config`` of SuperNode ``index`` (partition, and paths from the runner)."""
        if self.node_configs is not None:
            return dict(self.node_configs[index])
        return {"partition-id": index, "num-partitions": self.nodes}

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
    ) -> Service:
        """Start ``flower-supernode`` ``index`` with its auth key and own Runtime API port.

        Each node gets its own FLWR_HOME: Flower installs the FAB there with a non-atomic
        "mkdir, then copy" that would race between nodes sharing one home.
        """
        certs = self._require_certs()
        config = dict(node_config) if node_config is not None else self.node_config(index)
        key = private_key if private_key is not None else certs.node_keys[index].private_key
        node_home = self.work_dir / "node-home" / f"node-{index}"
        node_home.mkdir(parents=True, exist_ok=True)
        argv = [
            _executable("flower-supernode"),
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
        env = {**self.env, "FLWR_HOME": str(node_home), **node_thread_env(self.nodes, self.env)}
        if self.metrics is not None:
            port = self.metrics.node(index)
            env.update(self.start_exporter(f"metrics-node-{index}", port, env))
        if self.warm_apps:
            env.update(self.start_launcher(f"launcher-{index}", "flwr-clientapp", env))
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

    def start_launcher(self, name: str, entry: str, env: Mapping[str, str]) -> dict[str, str]:
        """Start a warm app launcher (``fedsd.warmstart``) named ``name`` for ``entry``
        (``flwr-clientapp`` or ``flwr-serverapp``); return what the environment of the
        service that starts ``entry`` needs to use it (the shim first on PATH, the socket).

        Until the launcher listens (it imports torch first) the shim runs the plain
        command, so nothing waits for it.
        """
        from fedsd.warmstart import SOCKET_ENV, install_shim

        shim_dir = install_shim(self.work_dir / "bin" / entry, entry).parent
        sock = self.work_dir / "run" / f"{name}.sock"
        if len(str(sock)) > 100:  # AF_UNIX paths are limited to 107 bytes
            digest = hashlib.sha256(str(self.work_dir).encode()).hexdigest()[:12]
            sock = Path(tempfile.gettempdir()) / f"fedsd-{digest}" / f"{name}.sock"
        argv = [sys.executable, "-m", "fedsd.cli", "app-launcher", "--socket", str(sock)]
        self._start(name, argv, env=env)
        path = os.pathsep.join([str(shim_dir), env.get("PATH", "")])
        return {SOCKET_ENV: str(sock), "PATH": path}

    def list_nodes(self) -> list[dict[str, Any]]:
        """``flwr supernode list`` as dicts (node-id, status, ...)."""
        res = self.flwr("supernode", "list", CONNECTION, "--format", "json", timeout=60)
        payload = _json_payload(res.stdout)
        if not payload or not payload.get("success"):
            raise DeployError(f"`flwr supernode list` failed: {res.stdout}{res.stderr}")
        return list(payload.get("nodes", []))

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
        deadline = time.monotonic() + timeout
        while True:
            self.supervise()
            ids = {}
            for svc in nodes:
                if m := _NODE_ID_RE.search(svc.log_since_start()):
                    ids[svc.name] = m.group(1)
            if len(ids) >= count:
                self._log(f"{len(ids)} SuperNode(s) online")
                return ids
            if time.monotonic() > deadline:
                raise DeployError(
                    f"only {len(ids)} of {count} SuperNodes online after {timeout:.0f}s"
                )
            time.sleep(0.2)

    def check_alive(self) -> None:
        """Raise naming the first service that died (with the tail of its log)."""
        for svc in self.services.values():
            code = svc.poll()
            if code is not None:
                raise DeployError(
                    f"{svc.name} exited with status {code}; log {svc.log_path}:\n{svc.log_tail()}"
                )

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
        now = time.monotonic()
        order = sorted(self.services, key=lambda n: n != "superlink")
        for name in order:
            svc = self.services[name]
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
            if count >= self.restart.max_restarts and not refused:
                self._due.pop(name, None)
                raise DeployError(
                    f"{name} exited with status {code} after {count} restart(s), the limit "
                    f"(--max-restarts {self.restart.max_restarts}); giving up. "
                    f"Log {svc.log_path}:\n{svc.log_tail()}"
                )
            due = self._due.get(name)
            if due is None:
                delay = self.restart.delay(count)
                self._died[name] = now
                self._due[name] = now + delay
                self._log(
                    f"{name} (pid {svc.pid}) exited with status {code}; restart in {delay:g}s"
                )
                continue
            if now >= due:
                del self._due[name]
                self._restart_service(svc, code, counted=not refused)

    def _restart_service(self, svc: Service, code: int, *, counted: bool = True) -> None:
        stop_services([svc], grace=2.0)  # what it spawned (a node's ClientApps) goes with it
        name = svc.name
        if counted:
            self.restarts[name] = self.restarts.get(name, 0) + 1
            if name.startswith("supernode"):
                died = self._died.pop(name, time.monotonic())
                self._session_until[name] = died + NODE_SESSION_SECONDS
        new = start_service(
            name,
            svc.argv,
            env=self._envs.get(name, self.env),
            log_dir=self.log_dir,
            cwd=self.work_dir,
        )
        self.services[name] = new
        if not counted:
            return
        self._log(
            f"restarted {name} (pid {new.pid}; restart {self.restarts[name]}/"
            f"{self.restart.max_restarts}; it had exited with status {code})"
        )
        self._record_restart(name)
        if name == "superlink":
            with contextlib.suppress(DeployError):  # a failed start is the next death
                self.wait_healthy(timeout=self.startup_timeout)

    def _record_restart(self, name: str) -> None:
        """Count the restart in ``fedsd_service_restarts_total{service}``, written to the
        ServerApp exporter's multiprocess files (the runner itself serves no metrics)."""
        if self.metrics is None:
            return
        env = {
            **self.env,
            "PROMETHEUS_MULTIPROC_DIR": str(self.work_dir / "metrics" / "metrics-serverapp"),
        }
        code = f"from fedsd.metrics import record_service_restart as r; r({name!r})"
        self._recorders.append(
            subprocess.Popen(
                [sys.executable, "-c", code],
                env=env,
                cwd=self.work_dir,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )

    def _reap_recorders(self) -> None:
        self._recorders = [p for p in self._recorders if p.poll() is None]

    def serverapp_pids(self) -> list[int]:
        """Live ``flwr-serverapp`` processes under the SuperExec (the warm-start shim stays
        until its forked ServerApp exits, so this covers both ways of starting it)."""
        exe = self.services.get("superexec")
        if exe is None or not exe.alive():
            return []
        pids = []
        for pid in _tree([exe.pid]):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if pid != exe.pid and b"flwr-serverapp" in cmdline:
                pids.append(pid)
        return pids

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
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout
        argv = [_executable("flwr"), "run", str(Path(app_dir).resolve()), CONNECTION, "--stream"]
        if overrides:
            argv += ["--run-config", format_config_pairs(overrides)]
        self._log(f"submitting: {' '.join(argv[1:])}")
        run_log = self.log_dir / "flwr-run.log"
        proc = subprocess.Popen(
            argv,
            env=self.env,
            cwd=self.work_dir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        cli = Service("flwr-run", argv, run_log, proc)
        lines: queue.Queue[str | None] = queue.Queue()
        reader = threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True)
        reader.start()
        run_id: str | None = None
        watch = _AppWatch(self, self.restarts.get("superlink", 0))
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
                        self.stream(text)
                        if run_id is None and (m := _RUN_ID_RE.search(text)):
                            run_id = m.group(1)
                    if deadline is not None and time.monotonic() > deadline:
                        self._log(f"run timed out after {timeout:.0f}s")
                        return RunResult(EXIT_TIMEOUT, run_id, "timeout", None, timeout or 0)
                    self.supervise()
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

    def run_status(self, run_id: str) -> tuple[str | None, str | None]:
        """``(status, status-details)`` of a run from ``flwr ls --run-id``."""
        res = self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
        payload = _json_payload(res.stdout) or {}
        for run in payload.get("runs", []):
            if str(run.get("run-id")) == str(run_id):
                return run.get("status"), run.get("status-details")
        return None, None

    def wait_run_finished(
        self,
        run_id: str,
        *,
        deadline: float | None = None,
        watch: _AppWatch | None = None,
    ) -> tuple[str | None, str | None]:
        """Poll the run's status until it finished, its ServerApp is gone, or ``deadline``.

        A run whose ServerApp process died (killed, or lost with the SuperLink) would only
        be failed by the SuperLink after two missed heartbeats (60 s); it is stopped here
        instead and reported as ``lost``, which ``fedsd up`` resubmits.
        """
        watch = watch if watch is not None else _AppWatch(self, self.restarts.get("superlink", 0))
        settle = time.monotonic() + 30  # without a status at all (no link), give up then
        while True:
            self.supervise()
            try:
                status, details = self.run_status(run_id)
            except DeployError:
                status, details = None, None
            if status and status.startswith("finished"):
                return status, details
            if watch.lost(force=True):
                self._abandon(run_id)
                if watch.link_restarted():
                    return "lost", "the SuperLink was restarted while the run was in flight"
                return "lost", "the ServerApp process died before the run finished"
            now = time.monotonic()
            if status:
                settle = now + 30
            if now > settle or (deadline is not None and now > deadline):
                return status, details
            time.sleep(1.0)

    def _abandon(self, run_id: str) -> None:
        """Stop a lost run and make sure its ServerApp is gone before a resubmission
        resumes from the same OUT (two ServerApps must never write it)."""
        with contextlib.suppress(DeployError):
            self.flwr("stop", str(run_id), CONNECTION, timeout=30)
        deadline = time.monotonic() + 20
        while (pids := self.serverapp_pids()) and time.monotonic() < deadline:
            time.sleep(0.5)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.serverapp_pids():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)  # the warm-start shim relays SIGTERM to the ServerApp
            if pids and sig == signal.SIGTERM:
                time.sleep(5)

    def stop(self) -> None:
        """Stop every service (and its ServerApp/ClientApp processes)."""
        if not self.services:
            return
        with _shielded():
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
        self.stream(f"fedsd up: {message}")


class _AppWatch:
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


_RUN_ID_RE = re.compile(r"Successfully started run (\d+)")
_NODE_ID_RE = re.compile(r"SuperNode ID: (\d+)")


def _pump(pipe: IO[bytes] | None, out: queue.Queue[str | None]) -> None:
    if pipe is not None:
        for raw in iter(pipe.readline, b""):
            out.put(raw.decode("utf-8", "replace"))
        pipe.close()
    out.put(None)


def _json_payload(text: str) -> dict[str, Any] | None:
    start = text.find("{")
    if start < 0:
        return None
    try:
        data = json.loads(text[start:])
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def _register_outcome(returncode: int | None, stdout: str, stderr: str) -> str:
    """Interpret ``flwr supernode register --format json`` (which exits 0 even on failure)."""
    payload = _json_payload(stdout) or {}
    if payload.get("success"):
        return "registered"
    message = str(payload.get("error-message", "")) + stdout + stderr
    if "already in use" in message:
        return "already registered"
    raise DeployError(f"registration failed (exit {returncode}): {message.strip()}")


# --------------------------------------------------------------------------- entry points


def run_local(
    nodes: int,
    shards: str | os.PathLike[str] | None,
    out: str | os.PathLike[str],
    run_config_overrides: Mapping[str, Any] | str | Sequence[str] | None = None,
    *,
    rounds: int | None = None,
    model: str | None = None,
    work_dir: str | os.PathLike[str] | None = None,
    app_dir: str | os.PathLike[str] | None = None,
    port: int | None = None,
    stream: StreamFn = print,
    timeout: float | None = None,
    validate: bool = True,
    grace: float = DEFAULT_GRACE,
    startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
    extra_env: Mapping[str, str] | None = None,
    privacy: str | None = None,
    warm_apps: bool | None = None,
    metrics_port: int | None = None,
    node_config: Mapping[str, Any] | str | Sequence[str] | None = None,
    restart: RestartPolicy | None = None,
    max_resubmits: int = DEFAULT_MAX_RESUBMITS,
) -> int:
    """Run one federation on 127.0.0.1 and return its exit status (0 = run completed).

    ``node_config`` (``--node-config``): pairs added to every SuperNode's node config, e.g.
    the data owner's privacy policy (``fedsd.node_policy``); checked before anything starts.

    Raises ``ConfigError``/``ShardsError`` before any process starts when the run config or
    the shards are wrong. Anything failing later (a service dying, the ServerApp raising, a
    timeout, Ctrl-C/SIGTERM) returns non-zero after every process has been stopped;
    ``shards=None`` skips the shard check and the shard-dir node config (apps without data).
    ``warm_apps`` (default: when the app's ClientApp is fedsd's) forks each ClientApp and
    ServerApp from a launcher with torch and diffusers already imported
    (``fedsd.warmstart``).
    """
    app = Path(app_dir).expanduser().resolve() if app_dir is not None else find_app_dir()
    if nodes < 1:
        raise ConfigError(f"invalid --nodes {nodes}; expected >= 1")
    overrides, effective = build_run_config(
        app,
        run_config_overrides,
        rounds=rounds,
        model=model,
        out=out,
        validate=validate,
        privacy=privacy,
    )
    if validate:
        check_privacy_for_nodes(RunConfig.from_mapping(effective), nodes)
    extra_node = _node_config_pairs(node_config)
    shard_root = check_shards(shards, nodes) if shards is not None else None
    out_path = Path(out).expanduser().resolve()
    work = Path(work_dir).expanduser().resolve() if work_dir else out_path / ".deploy"
    node_configs = []
    for i in range(nodes):
        config: dict[str, Any] = {**extra_node, "partition-id": i, "num-partitions": nodes}
        if shard_root is not None:
            config["shard-dir"] = str(shard_root / f"shard-{i}")
        config["cache-dir"] = str(work / "cache" / f"node-{i}")
        node_configs.append(config)

    start = time.monotonic()
    deployment = LocalDeployment(
        work,
        nodes,
        port=port,
        node_configs=node_configs,
        stream=stream,
        grace=grace,
        startup_timeout=startup_timeout,
        extra_env=extra_env,
        warm_apps=_is_fedsd_app(app) if warm_apps is None else warm_apps,
        metrics_port=metrics_port,
        restart=restart,
    )
    # OUT (and a work dir outside it) locked first: nothing there is touched before
    locked = (out_path,) if work.is_relative_to(out_path) else (out_path, work)
    with hold_out_lock(*locked), _signals_raise(), deployment:
        try:
            for cfg in node_configs:
                Path(cfg["cache-dir"]).mkdir(parents=True, exist_ok=True)
            deployment.start()
            result = _submit_until_done(
                deployment, app, overrides, max_resubmits, stream, start, timeout
            )
        except DeployError as exc:
            stream(f"fedsd up: error: {exc}")
            _report_logs(deployment, stream)
            return 1
        except KeyboardInterrupt:
            stream("fedsd up: interrupted (Ctrl-C); stopping all services")
            return EXIT_SIGINT
        except _Interrupted as exc:
            stream(f"fedsd up: got signal {exc.signum}; stopping all services")
            return 128 + exc.signum
        if result.exit_code == 0:
            stream(f"fedsd up: run {result.run_id} {result.status} in {result.seconds:.1f}s")
        else:
            why = f": {result.details}" if result.details else ""
            stream(f"fedsd up: run {result.run_id} ended as {result.status}{why}")
            _report_logs(deployment, stream)
        return result.exit_code


def _submit_until_done(
    deployment: LocalDeployment,
    app: Path,
    overrides: Mapping[str, Any],
    max_resubmits: int,
    stream: StreamFn,
    start: float,
    timeout: float | None,
) -> RunResult:
    """Submit, and resubmit a run that was lost rather than failed by the app: the
    ServerApp resumes after the last round in OUT/history.json, so only the in-flight round
    is redone."""
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
                f"fedsd up: run {result.run_id} lost {resubmits + 1} time(s); "
                f"resubmission limit (--max-resubmits {max_resubmits}) reached"
            )
            return result
        resubmits += 1
        stream(
            f"fedsd up: run {result.run_id} ended as {result.status}"
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


_RUNNER_NODE_KEYS = ("partition-id", "num-partitions", "shard-dir", "cache-dir")


def _node_config_pairs(items: Mapping[str, Any] | str | Sequence[str] | None) -> dict[str, Any]:
    """``--node-config`` for every node: parsed, its privacy policy validated; the keys
    ``fedsd up`` sets per node are refused (they would give every node the same shard)."""
    from fedsd.node_policy import NodePolicy

    pairs = dict(items) if isinstance(items, Mapping) else parse_run_config(items)
    taken = sorted(set(pairs) & set(_RUNNER_NODE_KEYS))
    if taken:
        raise ConfigError(f"--node-config cannot set {', '.join(taken)}: fedsd up sets them")
    try:
        NodePolicy.from_node_config(pairs)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return pairs


def _report_logs(deployment: LocalDeployment, stream: StreamFn) -> None:
    tails = deployment.log_tails()
    if tails:
        stream(tails)
    stream(f"fedsd up: full logs in {deployment.log_dir}")


def run_local_from_args(args: argparse.Namespace) -> int:
    """``fedsd up`` entry point (parser built by ``fedsd.deploy_args.add_up_arguments``)."""
    err = sys.stderr
    if not args.local:
        print(
            "fedsd up: error: only local deployments are implemented: pass --local "
            "(multi-machine deployments use the container images / manifests)",
            file=err,
        )
        return 2
    if args.shards is None:
        print("fedsd up: error: --local needs --shards DIR (see `fedsd shards`)", file=err)
        return 2
    view = _progress_view(args)
    try:
        return run_local(
            args.nodes,
            args.shards,
            args.out,
            args.run_config,
            rounds=args.rounds,
            model=args.model,
            privacy=args.privacy,
            metrics_port=None if args.no_metrics else args.metrics_port,
            work_dir=args.work_dir,
            app_dir=args.app_dir,
            port=args.port,
            stream=view,
            timeout=args.timeout,
            node_config=args.node_config,
            restart=RestartPolicy(max_restarts=args.max_restarts),
            max_resubmits=args.max_resubmits,
        )
    except (ConfigError, FileNotFoundError, DeployError) as exc:
        print(f"fedsd up: error: {exc}", file=err)
        return 2
    finally:
        view.close()


def _progress_view(args: argparse.Namespace) -> ProgressView:
    """The live view of ``fedsd up``, told the planned rounds and the DP-SGD budget when
    the run config can be read (run_local reports a config that cannot)."""
    from fedsd.progress import ProgressView

    view = ProgressView(sys.stdout)
    try:
        app = Path(args.app_dir) if args.app_dir else find_app_dir()
        _, effective = build_run_config(
            app, args.run_config, rounds=args.rounds, privacy=args.privacy, validate=False
        )
        view.progress.total = int(effective["num-server-rounds"])
        if "dp-sample" in str(effective.get("privacy", "")):
            view.budget = float(effective.get("dp-target-epsilon") or 0) or None
    except (ConfigError, DeployError, OSError, KeyError, TypeError, ValueError):
        pass
    return view


@contextlib.contextmanager
def _shielded() -> Iterator[None]:
    """Ignore Ctrl-C/SIGTERM/SIGHUP while tearing down, so teardown always completes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in _STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into an exception so teardown runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise _Interrupted(signum)

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# --------------------------------------------------------------------------- small helpers


def _is_fedsd_app(app_dir: Path) -> bool:
    """Whether the app's ClientApp is fedsd's (whose handlers import torch and diffusers)."""
    try:
        data = tomllib.loads((Path(app_dir) / "pyproject.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return False
    ref = data.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {})
    return str(ref.get("clientapp", "")).startswith("fedsd.")


def _has_flwr_app(pyproject: Path) -> bool:
    try:
        with pyproject.open("rb") as fh:
            data = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError):
        return False
    return isinstance(data.get("tool", {}).get("flwr", {}).get("app"), dict)


def _flatten(raw: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested tables become dotted keys, as Flower's ``flatten_dict`` does."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(_flatten(value, full))
        else:
            out[full] = value
    return out


def _toml_value(key: str, value: Any) -> str:
    """A value as TOML that Flower's key=value regex keeps in one piece."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        if '"' not in value:
            return json.dumps(value, ensure_ascii=False)
        if "'" not in value and "\n" not in value:
            return f"'{value}'"
        raise ConfigError(
            f"invalid run config: {key}={value!r}; a string value cannot contain both ' and \""
        )
    raise ConfigError(f"invalid run config: {key}={value!r}; expected a bool, int, float or string")
