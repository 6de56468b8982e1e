"""Round time, SuperLink CPU and memory per node as a local deployment grows: 2, 5, 10, 20
nodes, plain FedAvg and SecAgg+.

For each node count, ``bench/secagg_overhead.py``'s deployment (TLS SuperLink with node
authentication, ServerApp SuperExec, N SuperNodes with warm ClientApp launchers, tiny
model, 64 px, synthetic shards): ``--idle`` seconds with every node online and no run,
then a 1-round warm-up, ``--rounds`` plain rounds and ``--rounds`` SecAgg+ rounds. A
thread samples every process of the deployment from ``/proc`` (``common.ProcessMeter``).

Output fields, per node count (besides ``secagg_overhead``'s own):

* ``superlink_idle_cpu``: SuperLink CPU seconds per second while N nodes are online and
  idle (each pulls every 3 s and sends a heartbeat);
* ``superlink_cpu_per_round_plain`` / ``_secagg``: SuperLink CPU seconds of each run
  divided by its rounds (run start and end included): what one SuperLink, a single
  Python process, must spend per round; ``superlink_cpu_per_node_round_*`` divides by N;
* ``peak_pss_mb``: peak proportional set size per role (a launcher's copy-on-write pages
  are split between it and its forks, not counted once per fork): ``supernode`` (each
  with its SuperExec), ``launcher-apps`` (the warm launchers with their forked ClientApps
  and ServerApp), ``superlink``, ``superexec`` (the ServerApp's);
* ``node_pss_mb``: (``supernode`` + ``launcher-apps``) / N: a node's share of memory
  (the launchers also hold the one ServerApp, so small N overstates it).

Usage: ``python bench/scale.py [--nodes 2 5 10 20] [--rounds 2] [--idle 15]``; prints one
JSON object. Everything shares this machine's cores: read it with ``cpu_count``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ProcessMeter, emit, round_floats, say  # noqa: E402
from secagg_overhead import measure  # noqa: E402

MB = 1024 * 1024


def scale_point(nodes: int, rounds: int, idle: float, work: Path) -> dict[str, Any]:
    """``secagg_overhead.measure`` for ``nodes`` with the process meter around it."""
    state: dict[str, Any] = {"cpu": {}}
    stack = contextlib.ExitStack()

    def observe(event: str, dep: Any) -> None:
        if event == "started":
            state["meter"] = stack.enter_context(ProcessMeter(dep.services))
            time.sleep(3)  # let the nodes' first pulls settle
            before = state["meter"].cpu().get("superlink", 0.0)
            say(f"{nodes} nodes: {idle:.0f} s idle")
            time.sleep(idle)
            state["idle"] = (state["meter"].cpu().get("superlink", 0.0) - before) / idle
        else:
            state["cpu"][event] = state["meter"].cpu().get("superlink", 0.0)

    with stack:
        out = measure(nodes, rounds, work, observe=observe)
    cpu, meter = state["cpu"], state["meter"]
    for tag in ("plain", "secagg"):
        per_round = (cpu[f"{tag}-end"] - cpu[f"{tag}-begin"]) / rounds
        out[f"superlink_cpu_per_round_{tag}"] = per_round
        out[f"superlink_cpu_per_node_round_{tag}"] = per_round / nodes
    peak = {role: b / MB for role, b in sorted(meter.peak_pss.items())}
    out.update(
        superlink_idle_cpu=state["idle"],
        peak_pss_mb=peak,
        node_pss_mb=(peak.get("supernode", 0.0) + peak.get("launcher-apps", 0.0)) / nodes,
        plain_median_seconds=statistics.median(out["plain_round_seconds"]),
        secagg_median_seconds=statistics.median(out["secagg_round_seconds"]),
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[2, 5, 10, 20])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--idle", type=float, default=15.0, help="idle seconds measured")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results = []
    for n in args.nodes:
        with tempfile.TemporaryDirectory(prefix=f"fedsd-scale-{n}-") as tmp:
            results.append(scale_point(n, args.rounds, args.idle, Path(tmp)))
        r = results[-1]
        say(
            f"{n} nodes: plain {r['plain_median_seconds']:.1f} s, SecAgg+ "
            f"{r['secagg_median_seconds']:.1f} s per round; {r['node_pss_mb']:.0f} MB per node"
        )
    emit(
        round_floats(
            {
                "benchmark": "scale",
                "cpu_count": os.cpu_count(),
                "memory_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
                "rounds": args.rounds,
                "model": "tiny",
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
