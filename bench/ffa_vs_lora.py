"""FFA-LoRA vs plain LoRA under federated averaging: loss, bytes, time, aggregation error.

What it measures
----------------
For each LoRA variant (``lora-variant=lora``: A and B trained and averaged;
``lora-variant=ffa``: A frozen at the seeded initial value every node computes, only B
trained and sent) it runs the real fedsd federation in one process: the ServerApp's
round loop (``fedsd.server_app.Federation``) talks to the ClientApp handlers
(``fedsd.client_app.train`` / ``evaluate``, i.e. ``NodeTask``: load the global adapter,
train local epochs on the node's shard, reply) through an in-process grid that hands
each Flower ``Message`` straight to the destination node's handler. Only the transport
is missing. Each round: every node trains -> ``weighted_mean`` (FedAvg by images); every
aggregate (and the initial adapter) is scored on every node's validation split
(``NodeTask.evaluate``) wherever the server loop schedules it, and read back from the
run's ``history.json``.

The shards are written by ``fedsd.ml.data.write_shards(source="synthetic")`` (``iid`` and
``dirichlet`` with ``--alpha``, 0.1 by default: strongly label-skewed nodes). All
variants share the shards, the seeds (so the same initial A, data order, noise and
timesteps) and the number of rounds; every (partitioner, learning rate, seed) cell is
run for both variants back to back, so each comparison is paired.

How to read the JSON
--------------------
``runs``: one entry per (partitioner, learning_rate, seed, variant) with

* ``val_loss``: validation denoising loss (fixed timesteps and noise, weighted by each
  node's validation images) of the initial adapter (index 0, identical for both
  variants: B = 0, i.e. the base model) and of the aggregate after each round, as the
  server records them in ``history.json``; ``final_val_loss`` is the last one.
* ``train_loss``: image-weighted mean local training loss per round.
* ``payload_bytes_per_node_per_round``: the adapter vectors' bytes (``fedsd.fl.payload``):
  ``train_down`` (global adapter to a node) and ``train_up`` (its reply) per train
  message; ``evaluate_only_messages`` and ``evaluate_only_down``: messages that only
  score an adapter, over the whole run (how many depends on the server loop: one per
  node per round in a loop that evaluates separately, or only the final evaluation of
  the last aggregate in one that scores the incoming adapter inside the train
  message); ``total``: every byte of the run, both ways, divided by nodes x rounds.
  FFA sends B only: half of LoRA's parameters when A and B have the same size (square
  projections; cross-attention ``to_k``/``to_v`` have ``A`` r x 768 (or the text
  width) and B C x r, so the ratio moves a little off 0.5).
* ``train_seconds_per_node_per_round``: mean ``train_lora`` time on a node (no model
  loading); ``node_seconds_per_node_per_round``: the whole train message on the node
  (NodeTask set-up with the UNet load, any evaluation the handler does, training).
* ``aggregation_inexactness``: per round, for each LoRA module,
  ``||mean_i(B_i A_i) - mean(B) mean(A)||_F / ||mean_i(B_i A_i)||_F`` (image-weighted
  means over nodes, computed with ``fedsd.fl.aggregation.weighted_mean``), averaged over
  modules: how far the averaged adapter is from the average of the nodes' actual
  weight updates. FedAvg of plain LoRA is inexact; FFA's is exact because A is shared
  (it is computed for FFA too, as a check: float32 rounding only).

``summary``: per (partitioner, learning_rate), per variant, the mean over seeds of the
final validation loss and of its drop from round 0; and the paired difference
``ffa - lora`` in final validation loss per seed with its mean and spread. A difference
smaller than the seed-to-seed spread is noise.

``trainable_parameters``: LoRA parameters with ``requires_grad`` after ``add_lora``.

Losses on ``--model tiny`` (a random toy UNet) only show whether and how fast each
variant reduces the denoising loss; they say nothing about image quality. ``--model
sd-shape --resolution 32`` runs the Tiny-SD shapes (random weights: realistic timings
and payloads, not realistic losses); a real checkpoint directory gives real losses.

Usage::

    python bench/ffa_vs_lora.py                         # tiny model, iid + dirichlet
    python bench/ffa_vs_lora.py --partitioner dirichlet --learning-rate 1e-3 --seeds 0 1 2
    python bench/ffa_vs_lora.py --model sd-shape --resolution 32 --rounds 2 \\
        --learning-rate 1e-4 --seeds 0 --partitioner iid
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

import numpy as np
from common import (
    bench_parser,
    build_model,
    emit,
    environment,
    round_floats,
    say,
    set_threads,
    synthetic_shards,
    timed,
)

VARIANTS = ("lora", "ffa")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = bench_parser(__doc__)
    p.add_argument("--nodes", type=int, default=2, help="nodes (shards)")
    p.add_argument(
        "--partitioner",
        nargs="+",
        choices=("iid", "dirichlet"),
        default=["iid", "dirichlet"],
        help="data partitioning(s) to run",
    )
    p.add_argument("--alpha", type=float, default=0.1, help="Dirichlet concentration")
    p.add_argument("--images", type=int, default=96, help="synthetic images over all nodes")
    p.add_argument("--val-fraction", type=float, default=0.25, help="per-shard validation part")
    p.add_argument("--rounds", type=int, default=5, help="server rounds")
    p.add_argument("--local-epochs", type=int, default=1, help="epochs per node per round")
    p.add_argument("--batch-size", type=int, default=4, help="images per step")
    p.add_argument(
        "--learning-rate", nargs="+", type=float, default=[1e-3, 1e-4], help="learning rate(s)"
    )
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA rank r")
    p.add_argument("--lora-alpha", type=float, default=8.0, help="LoRA alpha (scale alpha/r)")
    p.add_argument(
        "--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="LoRA variants"
    )
    p.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=[0, 1],
        help="run seeds (initial A, data order, noise); more seeds = a better noise estimate",
    )
    p.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic shards")
    p.add_argument("--eval-timesteps", type=int, default=8, help="timesteps of the validation loss")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (0: torch default). 1 by default: the tiny model gains little "
        "from more, and one thread keeps timings steady when other processes share the CPU",
    )
    return p.parse_args(argv)


class RecordingGrid:
    """An in-process Flower grid: delivers each message to the node's ClientApp handler.

    Records, per message, the round, type, node, payload bytes each way and (for train
    replies) the tensors and metrics the node sent back.
    """

    def __init__(self, contexts: dict[int, Any]) -> None:
        self.contexts = contexts
        self.log: list[dict[str, Any]] = []
        self.replies: list[Any] = []  # pushed messages' replies, until pulled

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: Any) -> list[str]:
        """Deliver now; the replies wait for ``pull_messages`` (fedsd's server pulls)."""
        messages = list(messages)
        ids = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{len(self.log)}-{i}"
            ids.append(msg.metadata.message_id)
        self.replies.extend(self.send_and_receive(messages))
        return ids

    def pull_messages(self, ids: Any) -> list[Any]:
        wanted = set(ids)
        got = [r for r in self.replies if r.metadata.reply_to_message_id in wanted]
        self.replies = [r for r in self.replies if r not in got]
        return got

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Any]:
        from fedsd import client_app
        from fedsd.fl.payload import ADAPTER, from_bytes, read_vector

        replies = []
        for msg in messages:
            kind = msg.metadata.message_type
            node = msg.metadata.dst_node_id
            handler = client_app.train if kind == "train" else client_app.evaluate
            reply = handler(msg, self.contexts[node])
            if reply.has_error():
                raise RuntimeError(f"node {node} failed on {kind}: {reply.error.reason}")
            entry: dict[str, Any] = {
                "round": int(msg.metadata.group_id),
                "type": kind,
                "node": node,
                "down": len(msg.content.config_records["config"][ADAPTER]),
                "up": 0,
                "metrics": dict(reply.content.metric_records["metrics"]),
            }
            if "update" in reply.content.config_records:
                update = read_vector(reply.content.config_records["update"])
                entry["up"] = int(update.nbytes)
                # what the node trained to: the adapter it received plus its update
                sent = from_bytes(msg.content.config_records["config"][ADAPTER], "float32")
                entry["trained"] = sent + update
            self.log.append(entry)
            replies.append(reply)
        return replies


def inexactness(
    full: list[tuple[dict[str, np.ndarray], float]],
) -> float:
    """Mean over modules of ||mean(B_i A_i) - mean(B) mean(A)||_F / ||mean(B_i A_i)||_F."""
    from fedsd.fl.aggregation import weighted_mean

    keys = full[0][0]
    modules = sorted(k.split(".lora_A.")[0] for k in keys if ".lora_A." in k)

    def a(m: str) -> str:
        return f"{m}.lora_A.weight"

    def b(m: str) -> str:
        return f"{m}.lora_B.weight"

    products = [
        ({m: arrays[b(m)].astype(np.float64) @ arrays[a(m)] for m in modules}, w)
        for arrays, w in full
    ]
    mean_product = weighted_mean(products)
    mean = weighted_mean(full)
    errors = []
    for m in modules:
        exact = mean_product[m].astype(np.float64)
        approx = mean[b(m)].astype(np.float64) @ mean[a(m)].astype(np.float64)
        norm = float(np.linalg.norm(exact))
        if norm > 0:
            errors.append(float(np.linalg.norm(exact - approx)) / norm)
    return float(np.mean(errors)) if errors else float("nan")


def trainable_parameters(model_path: Path, variant: str, args: argparse.Namespace) -> dict:
    """LoRA parameters that require grad, and all LoRA parameters, after ``add_lora``."""
    from fedsd.config import RunConfig
    from fedsd.ml.model import add_lora, load_unet

    cfg = RunConfig.from_mapping(
        {
            "model": str(model_path),
            "lora-rank": args.lora_rank,
            "lora-alpha": args.lora_alpha,
            "lora-variant": variant,
        }
    )
    unet = add_lora(load_unet(str(model_path)), cfg)
    lora = [p for n, p in unet.named_parameters() if ".lora_" in n]
    return {
        "trainable": sum(p.numel() for p in lora if p.requires_grad),
        "lora_total": sum(p.numel() for p in lora),
    }


def run_federation(
    *,
    model_path: Path,
    shards: list[Path],
    cache_dir: Path,
    out_dir: Path,
    variant: str,
    lr: float,
    seed: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """One federation (the real ServerApp loop) of ``args.rounds`` rounds; its record."""
    from flwr.app import Context, RecordDict

    from fedsd.config import RunConfig
    from fedsd.fl.payload import shapes_of, unpack
    from fedsd.server_app import Federation

    rc = {
        "model": str(model_path),
        "resolution": args.resolution,
        "num-server-rounds": args.rounds,
        "fraction-train": 1.0,
        "min-nodes": len(shards),
        "local-epochs": args.local_epochs,
        "batch-size": args.batch_size,
        "learning-rate": lr,
        "lora-rank": args.lora_rank,
        "lora-alpha": args.lora_alpha,
        "lora-variant": variant,
        "seed": seed,
        "eval-timesteps": args.eval_timesteps,
        "out-dir": str(out_dir),
    }
    contexts = {
        101 + i: Context(
            run_id=1,
            node_id=101 + i,
            node_config={
                "partition-id": i,
                "shard-dir": str(shard),
                "cache-dir": str(cache_dir / f"node-{i}"),
                "device": args.device,
            },
            state=RecordDict(),
            run_config=rc,
        )
        for i, shard in enumerate(shards)
    }
    grid = RecordingGrid(contexts)
    start = time.perf_counter()
    # Federation prints "fedsd ..." progress lines to stdout: keep stdout for the JSON.
    with contextlib.redirect_stdout(sys.stderr):
        fed = Federation(grid, RunConfig.from_mapping(rc))
        initial = fed.initial_arrays()
        val0 = None
        if hasattr(fed, "evaluate"):  # a server loop that does not score the base model
            val0 = fed.evaluate(initial, 0)[0]
        fed.run()
    wall = time.perf_counter() - start
    hist = json.loads((out_dir / "history.json").read_text())
    history = hist["rounds"]
    if val0 is None:
        val0 = hist.get("baseline_val_loss")

    val_loss = [val0] + [r["val_loss"] for r in history]
    # The tensors that travel (sorted names, fedsd.fl.payload): all, or B only under FFA.
    sent_shapes = shapes_of(
        {k: v for k, v in initial.items() if variant != "ffa" or ".lora_B." in k}
    )
    inexact, down, up, train_s, node_s, tensors = [], [], [], [], [], len(sent_shapes)
    for r in range(1, args.rounds + 1):
        trains = [e for e in grid.log if e["round"] == r and e["type"] == "train"]
        # Each node's full adapter: what it trained, plus (FFA) the shared frozen A.
        full = [
            ({**initial, **unpack(e["trained"], sent_shapes)}, float(e["metrics"]["num-examples"]))
            for e in trains
        ]
        inexact.append(inexactness(full))
        down += [e["down"] for e in trains]
        up += [e["up"] for e in trains]
        train_s += [e["metrics"]["train-seconds"] for e in trains]
        node_s += [e["metrics"]["node-seconds"] for e in trains]
    evaluate_only = [e for e in grid.log if e["type"] == "evaluate"]
    all_bytes = sum(e["down"] + e["up"] for e in grid.log)
    payload = {
        "train_down": statistics.mean(down),
        "train_up": statistics.mean(up),
        "evaluate_only_messages": len(evaluate_only),
        "evaluate_only_down": sum(e["down"] for e in evaluate_only),
        "total": all_bytes / (len(shards) * args.rounds),
    }
    return {
        "variant": variant,
        "val_loss": val_loss,
        "final_val_loss": val_loss[-1],
        "train_loss": [r["train_loss"] for r in history],
        "aggregation_inexactness": inexact,
        "payload_bytes_per_node_per_round": payload,
        "tensors_per_message": tensors,
        "train_seconds_per_node_per_round": statistics.mean(train_s),
        "node_seconds_per_node_per_round": statistics.mean(node_s),
        "images_per_round": history[-1]["images"],
        "wall_seconds": wall,
    }


def summarize(runs: list[dict[str, Any]], variants: list[str]) -> list[dict[str, Any]]:
    """Per (partitioner, lr): per-variant means over seeds and the paired ffa - lora gap."""
    cells: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for run in runs:
        cells.setdefault((run["partitioner"], run["learning_rate"]), []).append(run)
    out = []
    for (part, lr), cell in cells.items():
        entry: dict[str, Any] = {"partitioner": part, "learning_rate": lr}
        by_seed: dict[int, dict[str, dict[str, Any]]] = {}
        for run in cell:
            by_seed.setdefault(run["seed"], {})[run["variant"]] = run
        seeds = list(by_seed.values())
        for v in variants:
            finals = [s[v]["final_val_loss"] for s in by_seed.values()]
            drops = [s[v]["val_loss"][0] - s[v]["final_val_loss"] for s in by_seed.values()]
            entry[v] = {
                "final_val_loss_mean": statistics.mean(finals),
                "final_val_loss_each_seed": finals,
                "val_loss_drop_mean": statistics.mean(drops),
                "val_loss_drop_each_seed": drops,
                "mean_aggregation_inexactness": statistics.mean(
                    x for s in by_seed.values() for x in s[v]["aggregation_inexactness"]
                ),
                "payload_bytes_per_node_per_round": next(iter(by_seed.values()))[v][
                    "payload_bytes_per_node_per_round"
                ]["total"],
                "train_seconds_per_node_per_round": statistics.mean(
                    s[v]["train_seconds_per_node_per_round"] for s in by_seed.values()
                ),
            }
        if set(variants) >= {"lora", "ffa"}:
            gaps = [s["ffa"]["final_val_loss"] - s["lora"]["final_val_loss"] for s in seeds]
            lora_drops = entry["lora"]["val_loss_drop_each_seed"]
            entry["ffa_minus_lora_final_val_loss"] = {
                "each_seed": gaps,
                "mean": statistics.mean(gaps),
                "stdev": statistics.stdev(gaps) if len(gaps) > 1 else None,
                "relative_to_lora_drop": (
                    statistics.mean(gaps) / statistics.mean(lora_drops)
                    if statistics.mean(lora_drops) != 0
                    else None
                ),
            }
            entry["payload_ratio_ffa_over_lora"] = (
                entry["ffa"]["payload_bytes_per_node_per_round"]
                / entry["lora"]["payload_bytes_per_node_per_round"]
            )
        out.append(entry)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    set_threads(args.threads)
    from flwr.supercore.task_identity import TaskIdentity

    # Flower reads the current task's identity when Messages are created; a SuperExec
    # sets it for a real ServerApp/ClientApp process.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1

    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedsd-bench-ffa-") as tmp:
        work = Path(tmp)
        model_path, kind = build_model(args.model, work, seed=0)
        trainable = {v: trainable_parameters(model_path, v, args) for v in args.variants}
        say(f"trainable LoRA parameters: {trainable}")
        runs, data = [], {}
        for part in args.partitioner:
            shards, manifest = synthetic_shards(
                work / f"shards-{part}",
                num_shards=args.nodes,
                images=args.images,
                resolution=args.resolution,
                partitioner=part,
                alpha=args.alpha,
                val_fraction=args.val_fraction,
                seed=args.data_seed,
            )
            data[part] = [
                {
                    "train": s["train"]["images"],
                    "val": s["val"]["images"],
                    "classes_train": s["train"]["per_class"],
                }
                for s in manifest["shards"]
            ]
            say(f"{part}: shards {[(d['train'], d['val']) for d in data[part]]} (train, val)")
            for lr in args.learning_rate:
                for seed in args.seeds:
                    for variant in args.variants:
                        name = f"{part}-lr{lr:g}-s{seed}-{variant}"
                        say(f"run {name}: {args.rounds} rounds x {args.nodes} nodes")
                        with timed() as t:
                            run = run_federation(
                                model_path=model_path,
                                shards=shards,
                                cache_dir=work / f"cache-{part}",
                                out_dir=work / "out" / name,
                                variant=variant,
                                lr=lr,
                                seed=seed,
                                args=args,
                            )
                        runs.append({"partitioner": part, "learning_rate": lr, "seed": seed, **run})
                        say(
                            f"run {name}: val {run['val_loss'][0]:.4f} -> "
                            f"{run['final_val_loss']:.4f}, inexactness "
                            f"{statistics.mean(run['aggregation_inexactness']):.2e}, "
                            f"{t['s']:.0f}s"
                        )
        result = {
            "benchmark": "ffa_vs_lora",
            "model": kind if kind != "directory" else str(model_path),
            **environment(args.device),
            "setup": {
                "nodes": args.nodes,
                "images": args.images,
                "val_fraction": args.val_fraction,
                "alpha": args.alpha,
                "rounds": args.rounds,
                "local_epochs": args.local_epochs,
                "batch_size": args.batch_size,
                "resolution": args.resolution,
                "lora_rank": args.lora_rank,
                "lora_alpha": args.lora_alpha,
                "seeds": args.seeds,
                "eval_timesteps": args.eval_timesteps,
                "shards": data,
            },
            "trainable_parameters": trainable,
            "summary": summarize(runs, args.variants),
            "runs": runs,
            "wall_seconds": time.perf_counter() - t_start,
        }
    return round_floats(result, 5)


if __name__ == "__main__":
    emit(main())
