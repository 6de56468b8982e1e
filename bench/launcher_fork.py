"""What ``gc.freeze()`` in the warm launcher saves each forked app process.

The launcher (``fedsd.deploy.warmstart``) imports torch, diffusers, peft, opacus and Flower
once, then forks one ClientApp or ServerApp per message. Without ``gc.freeze()`` the
first full collection in each child walks every object the launcher imported (~0.5 M)
and writes to their pages, which copy-on-write then duplicates. This script preloads
the launcher's own module list, then forks children side by side, alternately with and
without the preloaded objects frozen; each child does what an app start does that
matters here (import fedsd's app modules, allocate, run a full collection) and reports
its CPU time and minor page faults.

Prints one JSON object: per variant, the children's CPU seconds and minor faults
(median of ``--repeats``), and the ratios frozen / unfrozen.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedsd.deploy.warmstart import DEFAULT_PRELOAD  # noqa: E402


def _child(write_fd: int, objects: int) -> None:
    t0 = time.process_time()
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    importlib.import_module("fedsd.client_app")
    importlib.import_module("fedsd.task")
    garbage = [{"i": i} for i in range(objects)]
    gc.collect()
    del garbage
    result = {
        "cpu_s": time.process_time() - t0,
        "minor_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0,
    }
    os.write(write_fd, json.dumps(result).encode())
    os._exit(0)


def _fork_once(objects: int) -> dict[str, float]:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read_fd)
        _child(write_fd, objects)
    os.close(write_fd)
    data = b""
    while chunk := os.read(read_fd, 4096):
        data += chunk
    os.close(read_fd)
    os.waitpid(pid, 0)
    return json.loads(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--objects", type=int, default=300_000, help="allocated in each child")
    args = parser.parse_args()
    t0 = time.perf_counter()
    for name in DEFAULT_PRELOAD:
        importlib.import_module(name)
    preload_s = time.perf_counter() - t0
    tracked = len(gc.get_objects())
    runs: dict[str, list[dict[str, float]]] = {"unfrozen": [], "frozen": []}
    for _ in range(args.repeats):  # alternate, so drift hits both alike
        gc.unfreeze()
        runs["unfrozen"].append(_fork_once(args.objects))
        gc.freeze()
        runs["frozen"].append(_fork_once(args.objects))
    gc.unfreeze()
    med = {
        variant: {key: statistics.median(r[key] for r in rs) for key in ("cpu_s", "minor_faults")}
        for variant, rs in runs.items()
    }
    print(
        json.dumps(
            {
                "preload_modules": len(DEFAULT_PRELOAD),
                "preload_seconds": round(preload_s, 2),
                "objects_tracked_in_launcher": tracked,
                "repeats": args.repeats,
                "objects_allocated_per_child": args.objects,
                "median": med,
                "cpu_ratio_frozen_over_unfrozen": med["frozen"]["cpu_s"] / med["unfrozen"]["cpu_s"],
                "faults_ratio_frozen_over_unfrozen": med["frozen"]["minor_faults"]
                / med["unfrozen"]["minor_faults"],
                "runs": runs,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
