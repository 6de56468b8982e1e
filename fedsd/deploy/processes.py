"""Local processes of a deployment: start one with its log, find its whole process tree
(``/proc``), stop the tree with a grace period; free ports and thread limits."""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from fedsd.common.errors import DeployError
from fedsd.common.health import poll_until

LOCALHOST = "127.0.0.1"
DEFAULT_GRACE = 10.0


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


def executable(name: str) -> str:
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


def process_tree(pids: Iterable[int], pgids: Iterable[int] = ()) -> dict[int, str]:
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
    known = process_tree(
        [svc.pid for svc in services if svc.process.returncode is None],
        [svc.pid for svc in services],
    )
    _signal_all(services, known, signal.SIGTERM)

    def all_gone() -> bool | None:
        for svc in services:
            svc.poll()
        # A process spawned while its parent was shutting down is caught here too. Only
        # pids that are provably still ours seed the search (pids get reused).
        table = _proc_table()
        seeds = [svc.pid for svc in services if svc.process.returncode is None]
        seeds += [p for p, t in known.items() if p in table and table[p][2] == t]
        fresh = {p: t for p, t in process_tree(seeds, seeds).items() if p not in known}
        if fresh:
            known.update(fresh)
            _signal_all([], fresh, signal.SIGTERM)
        return True if all(not svc.alive() for svc in services) and not _alive(known) else None

    poll_until(all_gone, grace, 0.1)
    if any(svc.alive() for svc in services) or _alive(known):
        _signal_all(services, known, signal.SIGKILL)
    for svc in services:
        with contextlib.suppress(subprocess.TimeoutExpired):
            svc.process.wait(timeout=5)


def _alive(known: Mapping[int, str]) -> bool:
    table = _proc_table()
    return any(pid in table and table[pid][2] == start for pid, start in known.items())


def pump_lines(pipe: IO[bytes] | None, out: queue.Queue[str | None]) -> None:
    if pipe is not None:
        for raw in iter(pipe.readline, b""):
            out.put(raw.decode("utf-8", "replace"))
        pipe.close()
    out.put(None)
