"""What the fault tests share: a real ``fedsd up --local`` run whose output a callback
watches line by line (to send a signal at the right moment), the pids the runner reports,
and signals for a whole process tree."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ROUND_DONE = re.compile(r"fedsd round (\d+)/\d+: ")


def up_argv(
    out: Path,
    *,
    nodes: int,
    rounds: int,
    model: Path,
    shards: Path,
    run_config: str,
    timeout: float = 600,  # a 3-round run with a fault took 7 min at load 20-70 (2 cores)
    extra: Sequence[str] = (),
) -> list[str]:
    """``fedsd up --local`` without metrics, on ``out``."""
    return [
        *(sys.executable, "-m", "fedsd.cli", "up", "--local", "--nodes", str(nodes)),
        *("--rounds", str(rounds), "--model", str(model), "--shards", str(shards)),
        *("--out", str(out), "--no-metrics", "--timeout", f"{timeout:g}"),
        *("--run-config", run_config),
        *extra,
    ]


def run_up(
    argv: list[str], lines: list[str], on_line: Callable[[str], None] = lambda _: None
) -> int:
    """Run it with this checkout's fedsd, append each output line to ``lines`` and pass it
    to ``on_line`` as it comes; return the exit status. Killed if the test fails meanwhile."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env
    )
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            lines.append(line)
            on_line(line)
        return proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def started_pid(lines: Sequence[str], service: str) -> int | None:
    """The pid of the last start of ``service`` the runner reported (``started NAME (pid N)``)."""
    pids = [m.group(1) for ln in lines if (m := re.search(rf"started {service} \(pid (\d+)\)", ln))]
    return int(pids[-1]) if pids else None


def saved_at(out: Path) -> dict[int, float]:
    """Round -> the unix time its adapter was saved (each round records it)."""
    found = {}
    for p in out.glob("round-*/fedsd_adapter.json"):
        info = json.loads(p.read_text())
        found[int(info["round"])] = float(info["time"])
    return found


def signal_tree(pids: list[int], sig: int) -> list[int]:
    """Send ``sig`` to ``pids``, their process groups and every descendant; return them."""
    from fedsd.deploy.processes import process_tree

    found = sorted(process_tree(pids, pgids=pids))
    for pid in found:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    return found
