"""What the robust aggregation rules cost an honest federation: FedAvg vs trimmed mean vs
median, side by side on the same nodes, data and seeds.

What it measures
----------------
For each rule (``aggregation = fedavg | trimmed-mean | median``, ``trim-fraction``) it
runs the real fedsd federation in one process: the ServerApp's round loop
(``fedsd.server_app.Federation``: validation of every reply, the rule, checkpoints,
history.json) talks to the ClientApp handlers (``fedsd.client_app.train`` /
``evaluate``: load the global adapter, train local epochs on the node's shard, reply)
through an in-process grid (``common.InProcessGrid``); only the transport is missing.
Every node is honest. The rules share the shards, the run seed (initial adapter, data
order, timestep and noise draws) and the number of rounds, so round 1's updates are
identical and every difference comes from the rule.

How to read the JSON
--------------------
``runs``: one entry per (seed, rule) with ``val_loss`` (the validation denoising loss of
the initial adapter, index 0, then of each round's aggregate, as history.json records
it: fixed timesteps and noise, weighted by each node's validation images),
``final_val_loss`` and ``val_loss_drop`` (initial minus final), ``train_loss`` per round
and ``seconds`` (wall time of the run).

``summary``: per rule, over seeds, the mean ``final_val_loss`` and ``val_loss_drop``, and
each as a ratio to FedAvg's (``final_val_loss_vs_fedavg``: < 1 is better;
``val_loss_drop_vs_fedavg``: the share of FedAvg's improvement the rule keeps, > 1 is
better). The trimmed mean and the median count every node once; FedAvg weighs nodes by
images, so unequal shards (``--partitioner dirichlet``) also change the weighting. With
fewer than 3 nodes the trimmed mean cuts nothing and equals the unweighted mean.

Losses on ``--model tiny`` (a random toy UNet) only show whether a rule slows the
decrease of the denoising loss; they say nothing about image quality.

Usage::

    python bench/robust_aggregation.py                       # 5 nodes, 3 rounds, iid
    python bench/robust_aggregation.py --partitioner dirichlet --alpha 0.5 --seeds 0 1
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

RULES = ("fedavg", "trimmed-mean", "median")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = bench_parser(__doc__)
    p.add_argument("--nodes", type=int, default=5, help="nodes (shards), all honest")
    p.add_argument("--partitioner", choices=("iid", "dirichlet"), default="iid")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    p.add_argument("--images", type=int, default=120, help="synthetic images over all nodes")
    p.add_argument("--val-fraction", type=float, default=0.25, help="per-shard validation part")
    p.add_argument("--rounds", type=int, default=3, help="server rounds")
    p.add_argument("--local-epochs", type=int, default=1, help="epochs per node per round")
    p.add_argument("--batch-size", type=int, default=4, help="images per step")
    p.add_argument("--learning-rate", type=float, default=1e-3, help="learning rate")
    p.add_argument("--trim-fraction", type=float, default=0.2, help="trimmed mean: cut per end")
    p.add_argument("--rules", nargs="+", choices=RULES, default=list(RULES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="run seeds")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic shards")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch default)")
    return p.parse_args(argv)


def run_rule(
    rule: str, seed: int, args: argparse.Namespace, model: Path, shards: list[Path], work: Path
) -> dict[str, Any]:
    """One federation under ``rule``; its losses from history.json."""
    from fedsd.config import RunConfig
    from fedsd.server_app import Federation

    out = work / f"out-{rule}-{seed}"
    run_config = {
        "model": str(model),
        "resolution": args.resolution,
        "num-server-rounds": args.rounds,
        "min-nodes": args.nodes,
        "local-epochs": args.local_epochs,
        "batch-size": args.batch_size,
        "learning-rate": args.learning_rate,
        "aggregation": rule,
        "trim-fraction": args.trim_fraction,
        "seed": seed,
        "out-dir": str(out),
    }
    extra = {"device": args.device} if args.device != "cpu" else {}
    contexts = in_process_contexts(run_config, shards, work / "cache", extra)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the round loop's progress lines
        Federation(InProcessGrid(contexts), RunConfig.from_mapping(run_config)).run()
    seconds = time.perf_counter() - t0
    hist = json.loads((out / "history.json").read_text())
    val = [hist["baseline_val_loss"]] + [r["val_loss"] for r in hist["rounds"]]
    return {
        "rule": rule,
        "seed": seed,
        "val_loss": val,
        "final_val_loss": val[-1],
        "val_loss_drop": val[0] - val[-1],
        "train_loss": [r["train_loss"] for r in hist["rounds"]],
        "nodes_replied": [r["nodes_replied"] for r in hist["rounds"]],
        "seconds": seconds,
    }


def summarize(runs: list[dict[str, Any]], rules: list[str]) -> dict[str, Any]:
    by_rule = {
        rule: {
            "final_val_loss": statistics.mean(
                r["final_val_loss"] for r in runs if r["rule"] == rule
            ),
            "val_loss_drop": statistics.mean(r["val_loss_drop"] for r in runs if r["rule"] == rule),
        }
        for rule in rules
    }
    base = by_rule.get("fedavg")
    if base is not None:
        for figures in by_rule.values():
            figures["final_val_loss_vs_fedavg"] = figures["final_val_loss"] / base["final_val_loss"]
            if base["val_loss_drop"] > 0:
                figures["val_loss_drop_vs_fedavg"] = (
                    figures["val_loss_drop"] / base["val_loss_drop"]
                )
    return by_rule


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    set_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="fedsd-robust-") as tmp:
        work = Path(tmp)
        model, kind = build_model(args.model, work)
        shards, manifest = synthetic_shards(
            work / "shards",
            num_shards=args.nodes,
            images=args.images,
            resolution=args.resolution,
            partitioner=args.partitioner,
            alpha=args.alpha,
            val_fraction=args.val_fraction,
            seed=args.data_seed,
        )
        runs = []
        for seed in args.seeds:
            for rule in args.rules:
                say(f"seed {seed}: {rule}, {args.nodes} nodes, {args.rounds} rounds")
                runs.append(run_rule(rule, seed, args, model, shards, work))
                say(f"  final val loss {runs[-1]['final_val_loss']:.5f}")
    emit(
        round_floats(
            {
                "benchmark": "robust_aggregation",
                "model": args.model,
                "model_kind": kind,
                "settings": {k: v for k, v in vars(args).items() if k != "model"},
                "train_images_per_node": [s["train"]["images"] for s in manifest["shards"]],
                "environment": environment(args.device),
                "runs": runs,
                "summary": summarize(runs, args.rules),
            }
        )
    )


if __name__ == "__main__":
    sys.exit(main())
