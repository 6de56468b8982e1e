"""The quality benchmark: FID, KID and CLIP score per round for 2, 4 and 8 nodes, IID vs
Dirichlet shards, with and without DP-SGD, and what the evaluation costs next to training.

What it measures
----------------
For every configuration (node count x partitioner x DP epsilon x seed) it runs the real
fedsd federation in one process with ``eval-every=1``: the ServerApp's round loop
(``fedsd.server_app.Federation``: training rounds, validation loss, ``score_quality``,
history.json) talks to the ClientApp handlers (``fedsd.client_app.train`` / ``evaluate``
/ ``quality``, each behind the node-policy mod as a SuperNode runs them) through an
in-process grid; only the transport is missing. The base model (round 0) and every
round's aggregate are scored: each node generates ``eval-images-per-class`` images per
class of its validation split (``eval-steps`` scheduler steps, ``eval-guidance-scale``),
extracts features of them and of its held-out images and sends only statistics, which
the server pools into one FID (exact over all nodes), a mean KID and a mean CLIP score.

``--dp-epsilons``: 0 is a run without DP; any other value runs ``privacy=dp-sample``
(Opacus DP-SGD on every node) with ``dp-target-epsilon`` set to it (noise derived from
the target, ``dp-delta``, ``dp-max-grad-norm``). The shards of one (node count,
partitioner) are written once and shared by its DP variants and seeds, so those
comparisons are paired; each configuration gets a fresh latent cache and privacy ledger.

How to read the JSON
--------------------
``extractors``: which feature extractors the figures come from: ``real`` false (the
default here: ``fedsd.quality.extractors.write_tiny_extractors``, random stand-ins) means
every fid, kid and clip_score below is NOT an image-quality metric, only proof that the
pipeline runs; ``note`` says so in words.

``configs``: one entry per (nodes, partitioner, dp_epsilon, seed) with

* ``rounds``: one row per scored round, as history.json records it: ``round`` (0 = the
  base model), ``val_loss`` (validation denoising loss of that round's aggregate), ``fid``,
  ``kid``, ``clip_score`` (None when a figure could not be computed), ``epsilon`` (the
  largest cumulative DP-SGD epsilon any node reports after that round; DP runs only),
  ``round_seconds`` (wall time of that training round on the server: training on every
  node plus the validation loss of the previous aggregate; none for round 0),
  ``quality_seconds`` (wall time of that round's quality evaluation on the server),
  ``quality_nodes`` (nodes whose statistics were pooled) and ``generated_images``.
* ``eval_cost_ratio``: mean ``quality_seconds`` over every scored round (round 0
  included) / mean ``round_seconds`` over the training rounds, both from the same run:
  what ``eval-every=1`` adds to a round (1.0: doubles it). The in-process grid runs the
  nodes one after another, so both numerators and denominators are sums over nodes; on
  a real deployment the nodes work in parallel and both shrink alike. A DP run's ratio
  is lower because its training rounds are dearer (Opacus), not its evaluation cheaper.
* ``fid_drop`` (round 0's FID minus the last round's: > 0 means the adapter moved the
  images towards the nodes' held-out ones), ``rounds_trained`` (fewer than ``--rounds``
  when a DP budget ran out), ``train_images_per_node``, ``seconds`` (the whole run).

``summary``: per (nodes, partitioner, dp_epsilon), means over seeds of ``eval_cost_ratio``,
the last round's ``fid`` and ``clip_score`` and ``fid_drop``.

On a CPU with ``--model tiny`` (the default: a random toy pipeline that generates noise)
and the tiny stand-in extractors, every figure only proves the plumbing: that each node
generates, extracts and sends statistics, that the server pools them every round, and
what the evaluation costs relative to training for that toy. Neither the FIDs nor the
cost ratio transfer to a real model.

The real comparison (a GPU; real Tiny-SD, real extractors, Oxford Flowers)::

    fedsd fetch-extractors --out extractors        # once, on a machine with internet
    python -c "import datasets; datasets.load_dataset('nkirschi/oxford-flowers', \\
        split='train').save_to_disk('flowers')"     # once, likewise
    python bench/quality.py --model /path/to/tiny-sd --extractors extractors \\
        --shards-source flowers --resolution 512 --device cuda --threads 0 \\
        --nodes 2 4 8 --rounds 5 --eval-steps 25 --eval-images-per-class 2 --dp-epsilons 0 8 \\
        > quality.json

With a real ``--shards-source`` the whole source is partitioned (``--images`` applies to
the synthetic set only). The bench never downloads: a hub id works only when it is
already in the local cache.

Usage::

    python bench/quality.py > quality.json                  # tiny model, 32 px, CPU, ~4 min
    python bench/quality.py --nodes 2 4 8 > quality.json    # the full grid, ~10 min
    python bench/quality.py --nodes 2 --partitioners iid --dp-epsilons 0 --rounds 3
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
)

STAND_IN_NOTE = (
    "tiny random stand-in extractors: fid, kid and clip_score are NOT image-quality "
    "metrics, they only prove the evaluation runs end to end"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = bench_parser(__doc__)
    p.set_defaults(resolution=32)
    p.add_argument(
        "--extractors",
        default=None,
        help="feature-extractor directory (`fedsd fetch-extractors`), handed to every node "
        "as node config quality-extractors; default: <model>/fedsd-quality if the model has "
        "one, else tiny random stand-ins written for this run (NOT real metrics)",
    )
    p.add_argument(
        "--shards-source",
        default="synthetic",
        help="fedsd shards --source: 'synthetic', an image folder or save_to_disk directory "
        "(e.g. Oxford Flowers), or a hub id already in the local cache",
    )
    p.add_argument(
        "--nodes",
        nargs="+",
        type=int,
        default=[2, 4],
        help="node counts (add 8 for the full grid: ~10 min on 2 shared CPU cores)",
    )
    p.add_argument(
        "--partitioners", nargs="+", choices=("iid", "dirichlet"), default=["iid", "dirichlet"]
    )
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    p.add_argument("--images", type=int, default=12, help="synthetic images per node (train + val)")
    p.add_argument("--val-fraction", type=float, default=0.25, help="per-shard validation part")
    p.add_argument(
        "--dp-epsilons",
        nargs="+",
        type=float,
        default=[0.0, 8.0],
        help="dp-target-epsilon of privacy=dp-sample runs; 0 = a run without DP",
    )
    p.add_argument("--dp-delta", type=float, default=1e-5, help="dp-delta of the DP runs")
    p.add_argument("--dp-max-grad-norm", type=float, default=1.0, help="per-sample clip")
    p.add_argument("--rounds", type=int, default=2, help="server rounds")
    p.add_argument("--local-epochs", type=int, default=1, help="epochs per node per round")
    p.add_argument("--batch-size", type=int, default=4, help="images per step")
    p.add_argument("--learning-rate", type=float, default=1e-3, help="learning rate")
    p.add_argument("--eval-steps", type=int, default=2, help="eval-steps (scheduler steps)")
    p.add_argument(
        "--eval-images-per-class", type=int, default=1, help="eval-images-per-class per node"
    )
    p.add_argument(
        "--eval-guidance-scale", type=float, default=7.5, help="eval-guidance-scale (CFG)"
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="run seeds")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the shards")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch default)")
    return p.parse_args(argv)


def resolve_extractors(args: argparse.Namespace, model: Path, work: Path) -> tuple[Path, str]:
    """(extractor directory, where it came from)."""
    from fedsd.quality.extractors import INCEPTION, MODEL_SUBDIR, write_tiny_extractors

    if args.extractors:
        path = Path(args.extractors).expanduser().resolve()
        if not (path / INCEPTION).is_file():
            raise SystemExit(f"--extractors {path}: no {INCEPTION} (run `fedsd fetch-extractors`)")
        return path, "--extractors"
    if (model / MODEL_SUBDIR / INCEPTION).is_file():
        return model / MODEL_SUBDIR, "model directory"
    say("no extractors given: writing the tiny random stand-ins (NOT real metrics)")
    return write_tiny_extractors(work / "tiny-extractors"), "tiny stand-ins written for this run"


def write_config_shards(
    args: argparse.Namespace, nodes: int, partitioner: str, out: Path
) -> tuple[list[Path], dict[str, Any]]:
    from fedsd.ml.data import write_shards

    manifest = write_shards(
        source=args.shards_source,
        num_shards=nodes,
        partitioner=partitioner,
        alpha=args.alpha,
        val_fraction=args.val_fraction,
        seed=args.data_seed,
        out=out,
        image_size=args.resolution,
        synthetic_images=args.images * nodes,
    )
    return [out / s["name"] for s in manifest["shards"]], manifest


def run_config(
    args: argparse.Namespace,
    model: Path,
    extractors: Path,
    shards: list[Path],
    out: Path,
    epsilon: float,
    seed: int,
) -> tuple[dict[str, Any], float]:
    """One federation with eval-every=1; its history.json and wall time."""
    from fedsd.config import RunConfig
    from fedsd.server_app import Federation

    rc: dict[str, Any] = {
        "model": str(model),
        "resolution": args.resolution,
        "num-server-rounds": args.rounds,
        "min-nodes": len(shards),
        "local-epochs": args.local_epochs,
        "batch-size": args.batch_size,
        "learning-rate": args.learning_rate,
        "seed": seed,
        "out-dir": str(out / "run"),
        "eval-every": 1,
        "eval-steps": args.eval_steps,
        "eval-images-per-class": args.eval_images_per_class,
        "eval-guidance-scale": args.eval_guidance_scale,
    }
    if epsilon > 0:
        rc |= {
            "privacy": "dp-sample",
            "dp-target-epsilon": epsilon,
            "dp-delta": args.dp_delta,
            "dp-max-grad-norm": args.dp_max_grad_norm,
        }
    node = {"quality-extractors": str(extractors)}
    if args.device != "cpu":
        node["device"] = args.device
    contexts = in_process_contexts(rc, shards, out / "cache", node)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the round loop's progress lines
        Federation(InProcessGrid(contexts), RunConfig.from_mapping(rc)).run()
    seconds = time.perf_counter() - t0
    return json.loads((out / "run" / "history.json").read_text()), seconds


def rows_of(hist: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per scored round (0 = base model) from history.json."""
    from fedsd.fl.history import round_epsilon

    def quality(q: dict[str, Any] | None) -> dict[str, Any]:
        q = q or {}
        return {
            "fid": q.get("fid"),
            "kid": q.get("kid"),
            "clip_score": q.get("clip_score"),
            "quality_seconds": q.get("seconds"),
            "quality_nodes": q.get("nodes"),
            "generated_images": q.get("generated_images"),
        }

    rows = [
        {
            "round": 0,
            "val_loss": hist.get("baseline_val_loss"),
            **quality(hist.get("baseline_quality")),
            "round_seconds": None,
        }
    ]
    for r in hist["rounds"]:
        row = {"round": r["round"], "val_loss": r.get("val_loss"), **quality(r.get("quality"))}
        row["round_seconds"] = r.get("seconds")
        eps = round_epsilon(r) if r.get("privacy") else None
        if eps is not None:
            row["epsilon"] = eps
        rows.append(row)
    return rows


def eval_cost_ratio(rows: list[dict[str, Any]]) -> float | None:
    """Mean quality seconds per scored round / mean training-round seconds."""
    quality = [r["quality_seconds"] for r in rows if r["quality_seconds"] is not None]
    train = [r["round_seconds"] for r in rows if r["round_seconds"] is not None]
    if not quality or not train:
        return None
    return statistics.mean(quality) / statistics.mean(train)


def summarize(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Means over seeds per (nodes, partitioner, dp_epsilon)."""

    def mean(values: list[Any]) -> float | None:
        values = [v for v in values if v is not None]
        return statistics.mean(values) if values else None

    keys = sorted(
        {(e["nodes"], e["partitioner"], e["dp_epsilon"]) for e in entries},
        key=lambda k: (k[0], k[1], k[2] or 0.0),
    )
    out = []
    for nodes, partitioner, eps in keys:
        group = [
            e
            for e in entries
            if (e["nodes"], e["partitioner"], e["dp_epsilon"]) == (nodes, partitioner, eps)
        ]
        out.append(
            {
                "nodes": nodes,
                "partitioner": partitioner,
                "dp_epsilon": eps,
                "seeds": [e["seed"] for e in group],
                "eval_cost_ratio": mean([e["eval_cost_ratio"] for e in group]),
                "final_fid": mean([e["rounds"][-1]["fid"] for e in group]),
                "final_clip_score": mean([e["rounds"][-1]["clip_score"] for e in group]),
                "fid_drop": mean([e["fid_drop"] for e in group]),
            }
        )
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    set_threads(args.threads)
    from diffusers.utils import logging as diffusers_logging

    from fedsd.quality.extractors import read_info

    diffusers_logging.disable_progress_bar()  # the nodes' pipeline loads, on stderr

    t_start = time.perf_counter()
    entries: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fedsd-quality-") as tmp:
        work = Path(tmp)
        model, kind = build_model(args.model, work)
        extractors, origin = resolve_extractors(args, model, work)
        info = read_info(extractors)
        for nodes in args.nodes:
            for partitioner in args.partitioners:
                shards, manifest = write_config_shards(
                    args, nodes, partitioner, work / f"shards-{nodes}-{partitioner}"
                )
                per_node = [s["train"]["images"] for s in manifest["shards"]]
                for eps in args.dp_epsilons:
                    for seed in args.seeds:
                        name = f"{nodes}-{partitioner}-eps{eps:g}-seed{seed}"
                        say(f"{name}: {nodes} nodes, {args.rounds} rounds, eval-every=1")
                        hist, seconds = run_config(
                            args, model, extractors, shards, work / name, eps, seed
                        )
                        rows = rows_of(hist)
                        fids = [r["fid"] for r in rows]
                        entry = {
                            "nodes": nodes,
                            "partitioner": partitioner,
                            "dp_epsilon": eps if eps > 0 else None,
                            "seed": seed,
                            "train_images_per_node": per_node,
                            "rounds_trained": len(hist["rounds"]),
                            "rounds": rows,
                            "eval_cost_ratio": eval_cost_ratio(rows),
                            "fid_drop": (
                                fids[0] - fids[-1] if None not in (fids[0], fids[-1]) else None
                            ),
                            "extractors": sorted(
                                {
                                    q["extractors"]
                                    for q in [hist.get("baseline_quality")]
                                    + [r.get("quality") for r in hist["rounds"]]
                                    if q and q.get("extractors")
                                }
                            ),
                            "seconds": seconds,
                        }
                        entries.append(entry)
                        say(
                            f"  fid {[None if f is None else round(f, 3) for f in fids]}, "
                            f"eval_cost_ratio {entry['eval_cost_ratio']}, {seconds:.0f} s"
                        )
    real = bool(info.get("real"))
    emit(
        round_floats(
            {
                "benchmark": "quality",
                "model": args.model,
                "model_kind": kind,
                "extractors": {
                    "name": info.get("name"),
                    "real": real,
                    "from": origin,
                    "feature_dim": info.get("feature_dim"),
                    "note": "real extractors" if real else STAND_IN_NOTE,
                },
                "settings": {k: v for k, v in vars(args).items() if k != "model"},
                "environment": environment(args.device),
                "configs": entries,
                "summary": summarize(entries),
                "seconds": time.perf_counter() - t_start,
            }
        )
    )


if __name__ == "__main__":
    sys.exit(main())
