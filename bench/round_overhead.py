"""Per-round wall time of fedsd vs echo apps with the same payload (Flower's floor), one run each.

All arms go through the same real deployment (``fedsd up --local``: TLS SuperLink with node
authentication, SuperExec, N SuperNodes, ``flwr run``) on this machine, back to back:

* fedsd: tiny model, synthetic shards. Each round's ``seconds`` from history.json is
  split into *local training* (the slowest node's ``train-seconds``) and *everything
  else* (ClientApp process start, imports, model load, evaluation, Flower transport).
* bare_flower: ``tests/fixtures/bare_app``, one float32 array of exactly fedsd's payload size
  (the LoRA tensors sent per node), echoed by every node, the ServerApp waiting for
  replies with Flower's ``Grid.send_and_receive``: a bare Flower app on these SuperNodes.
* floor: the same echo, the ServerApp waiting as fedsd's does (``reply-poll=fedsd``) and
  its apps forked from warm launchers as fedsd's are: Flower's transport and
  ClientApp-process floor as fedsd drives it, with no model, no evaluation and no
  training. What fedsd spends above it is its own.
* floor_bytes: the floor with the array sent as bytes in the message's one ConfigRecord
  (3 Flower objects per message instead of 6): what fewer objects per message would buy.

``overhead_ratio`` = fedsd's non-training seconds per round / bare_flower's round;
``other_above_floor`` = fedsd's non-training seconds per round - the floor's round.
``steady_*``: the same without round 1 (a node's first message encodes its shard and
warms its caches).
Usage: ``python bench/round_overhead.py [--nodes 2] [--rounds 3] [--arms ...]``; prints
one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedsd.deploy.up import run_local  # noqa: E402


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_fedsd(work: Path, nodes: int, rounds: int, resolution: int) -> dict:
    from fedsd.ml.data import write_shards
    from fedsd.ml.model import write_tiny_pipeline

    model = write_tiny_pipeline(work / "model")
    write_shards(
        source="synthetic",
        num_shards=nodes,
        partitioner="iid",
        alpha=1.0,
        val_fraction=0.2,
        seed=0,
        out=work / "shards",
        synthetic_images=32 * nodes,
    )
    out = work / "fedsd-out"
    t0 = time.perf_counter()
    rc = run_local(
        nodes,
        work / "shards",
        out,
        f"resolution={resolution}",
        rounds=rounds,
        model=str(model),
        work_dir=work / "fedsd-work",
        stream=_log,
        timeout=1800,
    )
    wall = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"fedsd run failed with exit code {rc}")
    hist = json.loads((out / "history.json").read_text())
    rounds_ = hist["rounds"]
    per_round = [r["seconds"] for r in rounds_]
    train = [r["max_node_train_seconds"] for r in rounds_]
    payload = rounds_[0]["bytes_received"] // rounds_[0]["nodes_replied"]
    return {
        "wall_seconds": wall,
        "round_seconds": per_round,
        "train_seconds": train,
        "other_seconds": [a - b for a, b in zip(per_round, train, strict=True)],
        "payload_bytes_per_node": payload,
        "val_loss": [r["val_loss"] for r in rounds_],
    }


def run_bare(
    work: Path,
    nodes: int,
    rounds: int,
    payload_bytes: int,
    reply_poll: str = "flower",
    payload: str = "array",
) -> dict:
    lines: list[str] = []

    def stream(line: str) -> None:
        lines.append(line)
        _log(line)

    floats = payload_bytes // 4
    t0 = time.perf_counter()
    rc = run_local(
        nodes,
        None,
        work / f"bare-{reply_poll}-{payload}-out",
        f"array-size={floats} reply-poll='{reply_poll}' payload='{payload}'",
        rounds=rounds,
        app_dir=ROOT / "tests" / "fixtures" / "bare_app",
        work_dir=work / f"bare-{reply_poll}-{payload}-work",
        stream=stream,
        timeout=900,
        warm_apps=reply_poll == "fedsd",
    )
    wall = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"bare run failed with exit code {rc}")
    per_round = [
        float(m.group(1))
        for line in lines
        if (m := re.search(r"fedsd round \d+/\d+: .*, ([0-9.]+)s$", line))
    ]
    if len(per_round) != rounds:  # the bare app's line changed: say so, not a mean of nothing
        raise SystemExit(
            f"parsed {len(per_round)} of {rounds} bare round lines from:\n" + "\n".join(lines)
        )
    return {"wall_seconds": wall, "round_seconds": per_round, "array_floats": floats}


#: The echo arms: name -> (the ServerApp's reply wait, the payload's form).
ECHO_ARMS = {
    "bare_flower": ("flower", "array"),
    "floor": ("fedsd", "array"),
    "floor_bytes": ("fedsd", "bytes"),
}


def _steady(values: list[float]) -> float | None:
    return statistics.mean(values[1:]) if len(values) > 1 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument(
        "--arms",
        nargs="+",
        choices=list(ECHO_ARMS),
        default=list(ECHO_ARMS),
        help="the echo arms to run after fedsd (default: all)",
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="fedsd-bench-") as tmp:
        work = Path(tmp)
        fedsd = run_fedsd(work, args.nodes, args.rounds, args.resolution)
        payload_bytes = fedsd["payload_bytes_per_node"]
        echo = {
            arm: run_bare(work, args.nodes, args.rounds, payload_bytes, *ECHO_ARMS[arm])
            for arm in args.arms
        }
    other = statistics.mean(fedsd["other_seconds"])
    steady_other = _steady(fedsd["other_seconds"])
    out = {
        "benchmark": "round_overhead",
        "nodes": args.nodes,
        "rounds": args.rounds,
        "cpu_count": os.cpu_count(),
        "fedsd": fedsd,
        **echo,
        "fedsd_mean_round_seconds": statistics.mean(fedsd["round_seconds"]),
        "fedsd_mean_train_seconds": statistics.mean(fedsd["train_seconds"]),
        "fedsd_mean_other_seconds": other,
        "steady_fedsd_other_seconds": steady_other,
    }
    for arm, result in echo.items():
        out[f"{arm}_mean_round_seconds"] = statistics.mean(result["round_seconds"])
        out[f"steady_{arm}_round_seconds"] = _steady(result["round_seconds"])
    if "bare_flower" in echo:
        out["overhead_ratio"] = other / out["bare_flower_mean_round_seconds"]
    if "floor" in echo:
        out["other_above_floor"] = other - out["floor_mean_round_seconds"]
        if steady_other is not None:
            out["steady_other_above_floor"] = steady_other - out["steady_floor_round_seconds"]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
