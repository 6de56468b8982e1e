"""Reply validation against real nodes (issue 12): one real TLS deployment (``LocalDeployment``
as ``fedsd up --local`` starts it: SuperLink with node authentication, SuperExec, warm app
launchers, metrics exporters; five registered SuperNodes; tiny model, synthetic shards,
64 px) runs two runs one after the other:

* **rogue nodes** (3 rounds): nodes 2-4 run the run's real ClientApp but corrupt its train
  reply on the way out (``tests/fixtures/rogue_node``: NaN, wrong length, int32, no
  weight, a huge norm, weight 1e12, a negative weight, an infinite shard size, NaN
  losses), a different corruption in each round. The run completes every round on the
  honest nodes; each rejection is printed with its node and reason, counted by reason in
  the ServerApp exporter's ``fedsd_server_rejected_updates_total`` and in the round
  records; every saved adapter is finite and loads in diffusers; history.json is strict
  JSON (the NaN losses of an accepted reply are stored as null).
* **diverging honest nodes**: the largest learning rate the config accepts (0.99; 1e6 and
  1e12 are refused before anything starts, below) with ``lora-alpha=1e6`` scaling every
  LoRA step by 1.25e5. Every node's update is non-finite: the run stops in round 1 with
  one error naming the reasons and what to change, fails (so ``fedsd up`` exits 1 and does
  not resubmit it), and leaves no adapter and no NaN in its OUT.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import free_port_block, node_configs, synthetic_shards
from tests.fixtures.rogue_node.rogue_clientapp import KINDS, PLAN_ENV

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
ROGUE_DIR = REPO / "tests" / "fixtures" / "rogue_node"
ROUNDS = 3
NODES = 5  # nodes 0 and 1 honest (min-nodes=2), 2-4 rogue
#: node index -> {server round: corruption}; every rejection reason within three rounds
PLANS = {
    2: {"1": "nan", "2": "short", "3": "int"},
    3: {"1": "no-num-examples", "2": "huge", "3": "nan-metrics"},
    4: {"1": "weight-1e12", "2": "negative", "3": "inf-images"},
}
RUN_CONFIG = "resolution=64 learning-rate=0.001 min-nodes=2 round-timeout=300.0"
DIVERGING = "resolution=64 learning-rate=0.99 lora-alpha=1e6 min-nodes=2 round-timeout=300.0"


def _strict_json(path: Path) -> Any:
    """Parse ``path`` as strict JSON: NaN, Infinity and -Infinity are errors."""

    def refuse(name: str) -> None:
        raise ValueError(f"{path} holds {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


def assert_adapters_load_and_are_finite(out: Path, model: Path, dirs: list[str]) -> None:
    """Every adapter in ``dirs`` is finite, loads into the diffusers pipeline of ``model``,
    and the adapted UNet's output is finite."""
    import torch
    from diffusers import StableDiffusionPipeline

    from fedsd.ml.model import load_adapter_arrays

    pipe = StableDiffusionPipeline.from_pretrained(str(model))
    x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32)
    for d in dirs:
        arrays = load_adapter_arrays(out / d)
        assert arrays and all(np.isfinite(a).all() for a in arrays.values()), d
        pipe.load_lora_weights(str(out / d))
        with torch.no_grad():
            assert torch.isfinite(pipe.unet(x, t, c).sample).all(), d
        pipe.unload_lora_weights()


def _scrape(url: str) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=30) as resp:
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.mark.heavy
@pytest.mark.timeout(600)
def test_rogue_nodes_are_rejected_and_a_diverging_run_stops_cleanly(tiny_model, tmp_path):
    from fedsd.deploy.local import LocalDeployment
    from fedsd.deploy.run_config import build_run_config, find_app_dir
    from fedsd.deploy.submission import resubmittable
    from fedsd.fl.validation import REASONS
    from fedsd.observability.scrape import MetricsPorts

    t0 = time.monotonic()
    out, dout = (tmp_path / "rogue-out").resolve(), (tmp_path / "diverging-out").resolve()

    class RogueDeployment(LocalDeployment):
        """Nodes in PLANS get the rogue fixture first on their PYTHONPATH."""

        def start_supernode(self, index: int, **kw: Any) -> Any:
            if index in PLANS:
                plan = {"out-dir": str(out), "rounds": PLANS[index]}
                path = os.pathsep.join([str(ROGUE_DIR), str(REPO)])
                kw["env"] = {"PYTHONPATH": path, PLAN_ENV: json.dumps(plan)}
            return super().start_supernode(index, **kw)

    shards = synthetic_shards(tmp_path, NODES, 8 * NODES)  # 6 train images: 2 steps
    base = free_port_block(MetricsPorts(0).node(NODES))
    app = find_app_dir()
    lines: list[str] = []
    with RogueDeployment(
        tmp_path / "deploy",
        NODES,
        node_configs=node_configs(shards, NODES, tmp_path / "cache"),
        stream=lines.append,
        extra_env={"PYTHONPATH": str(REPO)},
        warm_apps=True,
        metrics_port=base,
    ) as dep:
        dep.start()
        node_ids = dep.wait_nodes_online()  # supernode-i -> Flower node id
        overrides, _ = build_run_config(
            app, RUN_CONFIG, rounds=ROUNDS, model=str(tiny_model), out=out
        )
        result = dep.submit(app, overrides, timeout=400)
        rogue_said = "\n".join(lines)
        metrics = _scrape(f"http://127.0.0.1:{MetricsPorts(base).serverapp}/metrics")
        lines.clear()
        overrides, _ = build_run_config(app, DIVERGING, rounds=2, model=str(tiny_model), out=dout)
        diverged = dep.submit(app, overrides, timeout=300)
        said = "\n".join(lines)
    print(f"deployment and both runs: {time.monotonic() - t0:.0f}s")

    # -- rogue nodes: every round completes, every bad reply is rejected with its reason
    assert result.exit_code == 0, f"{result}\n{rogue_said[-6000:]}"
    hist = _strict_json(out / "history.json")
    rounds = hist["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1)), rogue_said[-6000:]
    expected: dict[str, int] = {}
    for rec in rounds:
        kinds = [plan[str(rec["round"])] for plan in PLANS.values()]
        bad = [KINDS[k] for k in kinds if KINDS[k] is not None]
        assert rec["nodes_sampled"] == NODES
        assert rec["nodes_rejected"] == len(bad), rec
        assert rec["nodes_replied"] == NODES - len(bad) and rec["nodes_failed"] == 0, rec
        assert rec["train_loss"] is not None and rec["train_loss"] > 0
        for reason in bad:
            expected[reason] = expected.get(reason, 0) + 1
    for index, plan in PLANS.items():
        node = node_ids[f"supernode-{index}"]
        for rnd, kind in plan.items():
            if KINDS[kind] is not None:
                line = f"round {rnd}: rejected the update of node {node}: {KINDS[kind]} ("
                assert line in rogue_said, f"{kind}: no {line!r}\n{rogue_said[-6000:]}"
            else:  # accepted: its NaN and Inf metrics are stored as null
                (rec,) = [n for n in rounds[int(rnd) - 1]["nodes"] if str(n["node_id"]) == node]
                assert rec["train-loss"] is None and rec["val-loss"] is None, rec
                assert rec["train-seconds"] is None and rec["num-examples"] > 0, rec
    assert set(expected) == {r for r in KINDS.values() if r is not None}  # all 7 reasons
    counted = {
        dict(labels)["reason"]: value
        for (name, labels), value in metrics.items()
        if name == "fedsd_server_rejected_updates_total" and dict(labels)["run"] == hist["run_key"]
    }
    assert counted == {r: float(expected.get(r, 0)) for r in REASONS}, counted
    saved = [f"round-{r}" for r in range(1, ROUNDS + 1)] + ["latest"]
    assert_adapters_load_and_are_finite(out, tiny_model, saved)

    # -- diverging honest nodes: the run stops with one clear error, nothing non-finite saved
    assert diverged.exit_code == 1 and diverged.status == "finished:failed", diverged
    assert not resubmittable(diverged), diverged  # the app's own verdict: fedsd up exits 1
    rejected = re.findall(r"round 1: rejected the update of node \d+: non-finite \(", said)
    assert len(rejected) == NODES, said[-6000:]
    stop = (
        f"fedsd error: round 1: only 0 of {NODES} sampled nodes sent an update that passed "
        f"validation (min-nodes=2; rejected: non-finite x{NODES}; 0 refused the run; 0 failed); "
        "the run stops without saving round 1 (no round has been saved); non-finite updates mean "
        "local training diverged: lower learning-rate (now 0.99)"
    )
    assert stop in said, said[-6000:]
    assert not (dout / "round-1").exists() and not (dout / "latest").exists()
    dhist = _strict_json(dout / "history.json")
    assert dhist["rounds"] == [] and dhist["baseline_val_loss"] > 0


@pytest.mark.parametrize("rate", ["1e6", "1e12"])
def test_an_absurd_learning_rate_is_refused_before_anything_starts(tmp_path, capsys, rate):
    from fedsd.cli import main

    shard = tmp_path / "shards" / "shard-0" / "train"
    shard.mkdir(parents=True)
    (shard / "metadata.jsonl").write_text("")
    argv = ["up", "--local", "--nodes", "1", "--shards", str(tmp_path / "shards")]
    argv += ["--out", str(tmp_path / "o"), "--run-config", f"learning-rate={rate}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "learning-rate" in err and "a finite number in (0, 1)" in err, err
    assert not (tmp_path / "o").exists()
