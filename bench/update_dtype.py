"""Updates sent as float16 instead of float32 (``update-dtype``): bytes per node per round
and validation loss, side by side on the same nodes, data and seeds.

What it measures
----------------
For each privacy mode (``none``; ``dp-output``: each node clips its update and adds
Gaussian noise before sending it, so float16 rounds the noised update) and each
``update-dtype`` (``float32``, ``float16``) it runs the real fedsd federation in one
process, as ``bench/robust_aggregation.py`` does: the ServerApp's round loop
(``fedsd.server_app.Federation``: validation of every reply, FedAvg, checkpoints,
history.json) talks to the ClientApp handlers through ``common.InProcessGrid``; only the
transport is missing. Both dtypes of a (mode, seed) share the shards, the run seed
(initial adapter, data order, timesteps) and the rounds, so without DP every difference
comes from rounding the updates to float16. DP noise is drawn from OS entropy, never from
the seed (``fedsd.privacy.mechanisms``: seeded noise could be replayed and subtracted), so
under ``dp-output`` each run also has its own noise: compare the means over seeds with
the spread between float32 runs (``final_val_loss_spread``).

How to read the JSON
--------------------
``runs``: one entry per (privacy, seed, dtype) with ``val_loss`` (initial adapter, then
each round's aggregate, from history.json), ``final_val_loss``,
``update_bytes_per_node_per_round`` (the update vectors' bytes in the replies, as the
server counted them) and ``seconds``.

``summary``: per (privacy, dtype), over seeds, the mean ``final_val_loss`` (and its
spread, max - min), the mean ``update_bytes_per_node_per_round``, with float16's ratio to float32's
(``bytes_vs_float32``, ``final_val_loss_vs_float32``: 1.0 = no change).

Losses on ``--model tiny`` (a random toy UNet) show whether rounding changes training;
they say nothing about image quality.

Usage::

    python bench/update_dtype.py                     # 2 nodes, 3 rounds, seeds 0-3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    InProcessGrid,
    bench_parser,
    build_model,
    emit,
    environment,
    in_process_contexts,
    round_floats,
    say,
    set_threads,
    synthetic_shards,
)

DTYPES = ("float32", "float16")
MODES = ("none", "dp-output")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = bench_parser(__doc__)
    p.add_argument("--nodes", type=int, default=2, help="nodes (shards)")
    p.add_argument("--images", type=int, default=48, help="synthetic images over all nodes")
    p.add_argument("--val-fraction", type=float, default=0.25, help="per-shard validation part")
    p.add_argument("--rounds", type=int, default=3, help="server rounds")
    p.add_argument("--batch-size", type=int, default=4, help="images per step")
    p.add_argument("--learning-rate", type=float, default=1e-3, help="learning rate")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--dp-output-clip", type=float, default=1.0, help="dp-output: L2 clip")
    p.add_argument("--dp-output-epsilon", type=float, default=8.0, help="dp-output: per round")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3], help="run seeds")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch default)")
    return p.parse_args(argv)


def run_one(
    mode: str,
    dtype: str,
    seed: int,
    args: argparse.Namespace,
    model: Path,
    shards: list[Path],
    work: Path,
) -> dict[str, Any]:
    """One federation; its losses and reply bytes from history.json."""
    from fedsd.config import RunConfig
    from fedsd.server_app import Federation

    out = work / f"out-{mode}-{dtype}-{seed}"
    run_config: dict[str, Any] = {
        "model": str(model),
        "resolution": args.resolution,
        "num-server-rounds": args.rounds,
        "min-nodes": args.nodes,
        "batch-size": args.batch_size,
        "learning-rate": args.learning_rate,
        "update-dtype": dtype,
        "privacy": mode,
        "seed": seed,
        "out-dir": str(out),
    }
    if mode == "dp-output":
        run_config.update(
            {
                "dp-output-clip": args.dp_output_clip,
                "dp-output-epsilon": args.dp_output_epsilon,
                "dp-output-delta": 1e-5,
            }
        )
    extra = {"device": args.device} if args.device != "cpu" else {}
    contexts = in_process_contexts(run_config, shards, work / f"cache-{seed}", extra)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the round loop's progress lines
        Federation(InProcessGrid(contexts), RunConfig.from_mapping(run_config)).run()
    seconds = time.perf_counter() - t0
    hist = json.loads((out / "history.json").read_text())
    val = [hist["baseline_val_loss"]] + [r["val_loss"] for r in hist["rounds"]]
    per_node = [r["bytes_received"] / r["nodes_replied"] for r in hist["rounds"]]
    return {
        "privacy": mode,
        "dtype": dtype,
        "seed": seed,
        "val_loss": val,
        "final_val_loss": val[-1],
        "update_bytes_per_node_per_round": statistics.mean(per_node),
        "seconds": seconds,
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in sorted({r["privacy"] for r in runs}):
        cell: dict[str, Any] = {}
        for dtype in DTYPES:
            mine = [r for r in runs if r["privacy"] == mode and r["dtype"] == dtype]
            finals = [r["final_val_loss"] for r in mine]
            cell[dtype] = {
                "final_val_loss": statistics.mean(finals),
                "final_val_loss_spread": max(finals) - min(finals),
                "update_bytes_per_node_per_round": statistics.mean(
                    r["update_bytes_per_node_per_round"] for r in mine
                ),
            }
        full, half = cell["float32"], cell["float16"]
        half["bytes_vs_float32"] = (
            half["update_bytes_per_node_per_round"] / full["update_bytes_per_node_per_round"]
        )
        half["final_val_loss_vs_float32"] = half["final_val_loss"] / full["final_val_loss"]
        out[mode] = cell
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    set_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="fedsd-dtype-") as tmp:
        work = Path(tmp)
        model, kind = build_model(args.model, work)
        shards, manifest = synthetic_shards(
            work / "shards",
            num_shards=args.nodes,
            images=args.images,
            resolution=args.resolution,
            val_fraction=args.val_fraction,
        )
        runs = []
        for mode in args.modes:
            for seed in args.seeds:
                for dtype in DTYPES:
                    say(f"{mode}, seed {seed}: {dtype}, {args.nodes} nodes, {args.rounds} rounds")
                    runs.append(run_one(mode, dtype, seed, args, model, shards, work))
                    say(f"  final val loss {runs[-1]['final_val_loss']:.6f}")
    emit(
        round_floats(
            {
                "benchmark": "update_dtype",
                "model": args.model,
                "model_kind": kind,
                "settings": {k: v for k, v in vars(args).items() if k != "model"},
                "train_images_per_node": [s["train"]["images"] for s in manifest["shards"]],
                "environment": environment(args.device),
                "runs": runs,
                "summary": summarize(runs),
            }
        )
    )


if __name__ == "__main__":
    sys.exit(main())
