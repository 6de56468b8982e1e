"""SecAgg+ round time over plain FedAvg round time, for 2, 5 and 10 nodes.

For each node count one real deployment (TLS SuperLink with node authentication, a
ServerApp SuperExec, N SuperNodes with warm ClientApp launchers, ``flwr run``) runs, back
to back on the same deployment: a 1-round warm-up (fills every node's latent cache), then
``--rounds`` rounds with ``privacy=none`` and ``--rounds`` rounds with ``privacy=secagg``
(default shares and threshold for N nodes), tiny model, synthetic shards.

Output fields, per node count:

* ``plain_round_seconds`` / ``secagg_round_seconds``: each round's ``seconds`` from
  history.json (sampling, messages, training, aggregation; not the checkpoint write);
* ``ratio``: median SecAgg+ round over median plain round;
* ``secagg_stage_seconds``: median seconds of each SecAgg+ stage (setup, share-keys,
  collect-masked-vectors = training, unmask) as the ServerApp saw them;
* ``payload_values``: LoRA values per update (the vector SecAgg+ masks).

On a 2-core machine 10 nodes share 2 cores: their ClientApps run concurrently and the
ratio then mostly measures CPU contention; read it with ``cpu_count``.
Usage: ``python bench/secagg_overhead.py [--nodes 2 5 10] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import emit, round_floats, say, synthetic_shards  # noqa: E402


def measure(
    nodes: int, rounds: int, work: Path, observe: Callable[[str, Any], None] | None = None
) -> dict:
    """One deployment of ``nodes``: warm-up, plain and SecAgg+ runs. ``observe(event,
    deployment)`` (``bench/scale.py``) is told ``started`` and ``TAG-begin``/``TAG-end``
    around each run (TAG: warmup, plain, secagg)."""
    from fedsd.deploy.local import LocalDeployment
    from fedsd.deploy.run_config import build_run_config, find_app_dir
    from fedsd.ml.model import write_tiny_pipeline

    model = write_tiny_pipeline(work / "model")
    shard_dirs, _ = synthetic_shards(
        work / "shards", num_shards=nodes, images=24 * nodes, resolution=64, val_fraction=0.2
    )
    configs = [
        {"partition-id": i, "shard-dir": str(d), "cache-dir": str(work / "cache")}
        for i, d in enumerate(shard_dirs)
    ]
    app = find_app_dir()
    out: dict = {"nodes": nodes}

    def note(event: str) -> None:
        if observe is not None:
            observe(event, dep)

    def run(tag: str, privacy: str, n_rounds: int) -> dict:
        overrides, _ = build_run_config(
            app,
            {
                "model": str(model),
                "resolution": 64,
                "num-server-rounds": n_rounds,
                "min-nodes": nodes,
                "privacy": privacy,
            },
            out=work / tag,
        )
        note(f"{tag}-begin")
        res = dep.submit(app, overrides, timeout=3600)
        note(f"{tag}-end")
        if res.exit_code != 0:
            raise RuntimeError(f"{tag} run failed: {res.status} {res.details}")
        return json.loads((work / tag / "history.json").read_text())

    with LocalDeployment(
        work / "deploy", nodes, node_configs=configs, stream=lambda _l: None, warm_apps=True
    ) as dep:
        say(f"{nodes} nodes: starting the deployment")
        dep.start()
        note("started")
        say(f"{nodes} nodes: warm-up round")
        run("warmup", "none", 1)
        say(f"{nodes} nodes: {rounds} plain rounds")
        plain = run("plain", "none", rounds)
        say(f"{nodes} nodes: {rounds} SecAgg+ rounds")
        secure = run("secagg", "secagg", rounds)
    p = [r["seconds"] for r in plain["rounds"]]
    s = [r["seconds"] for r in secure["rounds"]]
    stages: dict[str, list[float]] = {}
    for r in secure["rounds"]:
        for st in r.get("secagg_stages", []):
            stages.setdefault(st["stage"], []).append(st["seconds"])
    rec = next(x for x in secure["rounds"][0]["privacy"] if x["mechanism"] == "secagg+")
    out.update(
        plain_round_seconds=p,
        secagg_round_seconds=s,
        ratio=statistics.median(s) / statistics.median(p),
        secagg_stage_seconds={k: statistics.median(v) for k, v in stages.items()},
        shares=rec["extra"]["neighbourhood"],
        threshold=rec["extra"]["threshold_shares"],
        bytes_per_round_plain=statistics.median(r["bytes_sent"] for r in plain["rounds"]),
        bytes_per_round_secagg=statistics.median(r["bytes_sent"] for r in secure["rounds"]),
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[2, 5, 10])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import os

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results = []
    for n in args.nodes:
        with tempfile.TemporaryDirectory(prefix=f"fedsd-secagg-{n}-") as tmp:
            results.append(measure(n, args.rounds, Path(tmp)))
            say(f"{n} nodes: ratio {results[-1]['ratio']:.2f}")
    emit(
        round_floats(
            {
                "benchmark": "secagg_overhead",
                "cpu_count": os.cpu_count(),
                "rounds": args.rounds,
                "model": "tiny",
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
