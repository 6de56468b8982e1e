"""Warm app starts: fork each ``flwr-clientapp`` (and ``flwr-serverapp``) from a process that
already imported torch and diffusers.

A SuperNode starts a fresh ``flwr-clientapp`` process for every message (four per round
under SecAgg+). Importing torch, diffusers and peft costs that process 6-15 s of CPU, far
more than a LoRA step on the tiny model, and N nodes sharing a machine pay it N times per
message; the ServerApp pays the same once per run. Flower starts both by name from
``PATH``, so a SuperNode's (or the ServerApp SuperExec's) ``PATH`` can point at a shim:

* ``fedsd app-launcher --socket S`` (one per SuperNode, same environment) imports the
  heavy third-party modules once, then waits on a unix socket. It never imports fedsd's app
  modules (the FAB's copy must be the one that runs) and never starts a thread, so a fork
  is as clean as a fresh process: every message still gets its own process, memory and
  exit, exactly as Flower intends; only the import work is shared, copy-on-write.
* ``flwr-clientapp`` (``flwr-serverapp``) on that ``PATH`` is a shim running ``python -m
  fedsd.deploy.warmstart``: it sends its name, argv, environment, working directory and stdio to
  the launcher, relays signals to the forked child and exits with the child's status.
  While the launcher is still importing (it announced itself in ``S.pid`` and is alive) the
  shim waits for it to listen, up to ``FEDSD_LAUNCHER_WAIT`` s: a fresh interpreter beside
  it would import torch a second time on a machine busy with the first. With no
  ``FEDSD_LAUNCHER_SOCKET``, no live launcher, or past that wait, it execs the command in a
  fresh interpreter, so nothing depends on the launcher being up.

Either way ``flwr-clientapp`` is Flower's behind the node's app check
(``fedsd.deploy.pinning``): a node installs the shim even without a launcher, so that every
ClientApp start passes the check.

No CUDA is touched before the fork (importing torch does not initialise CUDA), so a GPU
child initialises its own context.
"""

from __future__ import annotations

import array
import contextlib
import gc
import importlib
import json
import os
import selectors
import signal
import socket
import struct
import sys
import time
from collections.abc import Sequence
from pathlib import Path

SOCKET_ENV = "FEDSD_LAUNCHER_SOCKET"
# How long a shim waits for a launcher that is alive but still importing. In a CI run on
# 2 loaded cores a launcher took 90 s to listen; the ClientApps started meanwhile in fresh
# interpreters each took over a minute to import, Flower handed their messages out again,
# and 31 of them were importing torch at once beside the launcher.
WAIT_ENV = "FEDSD_LAUNCHER_WAIT"
DEFAULT_WAIT_S = 300.0
#: The Flower commands a launcher may start, and their entry points. A ClientApp starts
#: only through the node's app check (``fedsd.deploy.pinning``), launcher or not.
ENTRIES = {
    "flwr-clientapp": ("fedsd.deploy.pinning", "flwr_clientapp"),
    "flwr-serverapp": ("flwr.superlink.cli", "flwr_serverapp"),
}
#: Imported once by the launcher. Third-party only: fedsd's modules come from the FAB.
DEFAULT_PRELOAD = (
    "numpy",
    "torch",
    "safetensors.torch",
    "diffusers",
    "diffusers.models.unets.unet_2d_condition",
    "diffusers.models.autoencoders.autoencoder_kl",
    "diffusers.schedulers.scheduling_ddpm",
    "peft",
    "opacus",
    "flwr.supernode.cli",
    "flwr.superlink.cli",
    "flwr.client.mod",
    "flwr.server.workflow",
)
_LEN = struct.Struct("!I")


def _send_json(sock: socket.socket, obj: object, fds: Sequence[int] = ()) -> None:
    data = json.dumps(obj).encode()
    payload = _LEN.pack(len(data)) + data
    if fds:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sent = sock.sendmsg([payload], anc)
        sock.sendall(payload[sent:])
    else:
        sock.sendall(payload)


def _recv_exact(sock: socket.socket, n: int, fds: list[int] | None = None) -> bytes:
    buf = b""
    while len(buf) < n:
        if fds is not None and not buf:
            msg, anc, _, _ = sock.recvmsg(n, socket.CMSG_SPACE(3 * array.array("i").itemsize))
            for level, kind, data in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    got = array.array("i")
                    got.frombytes(data[: len(data) - len(data) % got.itemsize])
                    fds.extend(got)
            chunk = msg
        else:
            chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("launcher connection closed")
        buf += chunk
    return buf


def _recv_json(sock: socket.socket, fds: list[int] | None = None) -> object:
    (size,) = _LEN.unpack(_recv_exact(sock, _LEN.size, fds))
    return json.loads(_recv_exact(sock, size))


# -- the launcher -------------------------------------------------------------------------


def serve(socket_path: str | os.PathLike[str], preload: Sequence[str] = DEFAULT_PRELOAD) -> None:
    """Import ``preload``, then fork one Flower app process per request until SIGTERM."""
    t0 = time.perf_counter()
    announce = Path(f"{socket_path}.pid")  # shims wait for a launcher that is starting
    announce.parent.mkdir(parents=True, exist_ok=True)
    # Renamed into place, so a shim never reads half of it (plain os, not fedsd.common:
    # the launcher imports nothing of fedsd that its forked apps must take from the FAB).
    partial = announce.with_name(f"{announce.name}.{os.getpid()}.tmp")
    partial.write_text(f"{os.getpid()}\n", encoding="utf-8")
    os.replace(partial, announce)
    for name in preload:
        importlib.import_module(name)
    # Out of the collector's reach: a child's first full collection would otherwise walk
    # (and, by copy-on-write, copy the pages of) the ~0.5 M objects imported here.
    # bench/launcher_fork.py: 0.26 instead of 0.86 CPU-s per child, a third of the faults.
    gc.freeze()
    import threading

    if threading.active_count() != 1:  # a fork would copy held locks of other threads
        raise RuntimeError(f"preloading started {threading.active_count() - 1} thread(s)")
    path = Path(socket_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    os.chmod(path, 0o600)  # only this user's SuperNode may start ClientApps through it
    server.listen(64)
    stop = False

    def _stop(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print(
        f"fedsd app-launcher: {len(preload)} modules preloaded in "
        f"{time.perf_counter() - t0:.1f}s; listening on {path}",
        flush=True,
    )
    children: dict[int, socket.socket] = {}
    sel = selectors.DefaultSelector()
    sel.register(server, selectors.EVENT_READ)
    try:
        while not stop:
            for _key, _ in sel.select(timeout=0.05):
                try:
                    conn, _ = server.accept()
                    pid = _fork_child(server, conn)
                except OSError as exc:
                    print(f"fedsd app-launcher: request failed: {exc}", flush=True)
                    continue
                children[pid] = conn
            _reap(children)
    finally:
        sel.close()
        server.close()
        for stale in (path, announce):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


def _fork_child(server: socket.socket, conn: socket.socket) -> int:
    fds: list[int] = []
    request = _recv_json(conn, fds)
    if not isinstance(request, dict) or len(fds) != 3 or request.get("entry") not in ENTRIES:
        for fd in fds:
            os.close(fd)
        conn.close()
        raise OSError("malformed request (want a known entry, argv, env, cwd and 3 stdio fds)")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the forked child
        code = 1
        try:
            server.close()
            conn.close()
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
                os.close(fd)
            os.chdir(request["cwd"])
            os.environ.clear()
            os.environ.update(request["env"])
            reseed_after_fork()
            sys.argv = [request["entry"], *request["argv"]]
            module, func = ENTRIES[request["entry"]]
            getattr(importlib.import_module(module), func)()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)
    for fd in fds:
        os.close(fd)
    _send_json(conn, {"pid": pid})
    env = request.get("env")
    home = env.get("FLWR_HOME") if isinstance(env, dict) else None  # nodes share a launcher
    who = f" for {Path(home).name}" if home else ""
    print(f"fedsd app-launcher: started {request['entry']} pid {pid}{who}", flush=True)
    return pid


def reseed_after_fork() -> None:
    """Fresh OS-entropy seeds for every global RNG the launcher imported.

    A fork copies the parent's generator states, so without this every ClientApp of a node
    would draw the same "random" numbers (the same DP noise from any library that uses a
    global generator, the same SecAgg+ stochastic rounding) in every round.
    """
    import random

    random.seed()
    if "numpy" in sys.modules:
        import numpy as np

        np.random.seed()
    if "torch" in sys.modules:
        import torch

        torch.seed()


def _reap(children: dict[int, socket.socket]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        if conn is None:
            continue
        code = os.waitstatus_to_exitcode(status)
        with contextlib.suppress(OSError):
            _send_json(conn, {"exit": code})
        conn.close()


# -- the shim -----------------------------------------------------------------------------


def run_shim(entry: str, argv: Sequence[str]) -> int:
    """Start ``entry argv`` through the launcher; exec the real command without it."""
    if entry not in ENTRIES:
        raise SystemExit(f"fedsd.deploy.warmstart: unknown command {entry!r}")
    path = os.environ.get(SOCKET_ENV)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if not path:
            raise OSError("no launcher configured")
        _wait_while_starting(path)
        sock.connect(path)
        request = {"entry": entry, "argv": list(argv), "env": dict(os.environ), "cwd": os.getcwd()}
        _send_json(sock, request, fds=(0, 1, 2))
        reply = _recv_json(sock)
    except OSError:
        sock.close()
        exec_entry(entry, argv)  # does not return
        return 127
    pid = int(reply["pid"])  # type: ignore[index]

    def _relay(signum: int, frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _relay)
    try:
        done = _recv_json(sock)
    except (OSError, ValueError):
        return 1  # launcher gone: the child was killed with it
    code = int(done["exit"])  # type: ignore[index]
    return code if code >= 0 else 128 - code


def _wait_while_starting(path: str) -> None:
    """Return once ``path`` exists, or no live launcher announced itself in ``PATH.pid``,
    or after ``FEDSD_LAUNCHER_WAIT`` s (default 300)."""

    def launcher_pid() -> int | None:
        try:
            pid = int(Path(f"{path}.pid").read_text(encoding="utf-8"))
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        return pid

    if os.path.exists(path) or launcher_pid() is None:
        return  # the common case, on every app start: nothing more imported
    from fedsd.common.health import poll_until

    raw = os.environ.get(WAIT_ENV) or str(DEFAULT_WAIT_S)
    try:
        wait = float(raw)
    except ValueError:
        raise SystemExit(
            f"fedsd.deploy.warmstart: {WAIT_ENV}={raw!r} is not a number of seconds "
            f"(how long an app start waits for its launcher; default {DEFAULT_WAIT_S:g})"
        ) from None
    poll_until(lambda: True if os.path.exists(path) or not launcher_pid() else None, wait, 0.2)


def exec_entry(entry: str, argv: Sequence[str]) -> None:
    """Replace this process with ``entry argv`` in a fresh interpreter, started as the
    console script would (``-P``: the working directory is not put on ``sys.path``)."""
    module, func = ENTRIES[entry]
    code = f"import sys; from {module} import {func}; sys.argv[0] = {entry!r}; sys.exit({func}())"
    os.execv(sys.executable, [sys.executable, "-P", "-c", code, *argv])


def install_shim(bin_dir: str | os.PathLike[str], entry: str = "flwr-clientapp") -> Path:
    """Write the ``entry`` shim into ``bin_dir`` (put that first on the service's PATH)."""
    if entry not in ENTRIES:
        raise ValueError(f"unknown command {entry!r}; known: {', '.join(ENTRIES)}")
    from fedsd.common.atomic import write_file  # not at import: the launcher forks fedsd apps

    target = Path(bin_dir) / entry
    target.parent.mkdir(parents=True, exist_ok=True)
    script = f'#!/bin/sh\nexec "{sys.executable}" -m fedsd.deploy.warmstart {entry} "$@"\n'
    write_file(target, script, mode=0o755)
    return target


if __name__ == "__main__":  # the shim: python -m fedsd.deploy.warmstart ENTRY ARGS...
    sys.exit(run_shim(sys.argv[1], sys.argv[2:]))
