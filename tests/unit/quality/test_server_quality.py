"""The ServerApp's quality evaluations against an in-process grid (the ClientApp handlers
and the node-policy mod run for real, with the tiny model and the tiny extractors)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, RecordDict

from fedsd.config import RunConfig
from tests.unit.test_server import (
    InProcessGrid,
    _setup,
    _task_identity,  # noqa: F401 (autouse: a ClientApp's identity)
    make_shards,
)


@pytest.fixture
def shards(tmp_path):
    return make_shards(tmp_path)


QUALITY = {"eval-every": 1, "eval-steps": 2, "eval-images-per-class": 2}


def _history(tmp_path):
    return json.loads((tmp_path / "out" / "history.json").read_text())


def test_base_model_and_every_round_are_scored_by_every_node(tiny_model, tmp_path, shards, capsys):
    from fedsd.server_app import Federation

    rc, contexts = _setup(tiny_model, tmp_path, shards, **QUALITY)
    grid = InProcessGrid(contexts)
    Federation(grid, RunConfig.from_mapping(rc)).run()
    hist = _history(tmp_path)
    scored = [hist["baseline_quality"]] + [r["quality"] for r in hist["rounds"]]
    assert len(scored) == 3
    for q in scored:
        assert q["nodes"] == 2 and q["nodes_refused"] == q["nodes_rejected"] == 0, q
        assert q["fid"] > 0 and q["clip_score"] is not None and q["kid"] is not None, q
        assert q["real_images"] == 4 and q["generated_images"] >= 4, q
    assert grid.sent.count(("evaluate.quality", 101)) == 3
    out = capsys.readouterr().out
    assert "fedsd quality base model: fid=" in out and "fedsd quality round 2: fid=" in out
    assert "NOT real metrics" in out


def _poisoned(reply):
    """A rogue node: moments no set of images has (second moment below the squared mean)."""
    if reply.has_error() or "quality" not in reply.content.array_records:
        return reply  # its training replies are honest
    record = reply.content.array_records["quality"]
    arrays = {k: v.numpy().copy() for k, v in record.items()}
    arrays["fake-cov-sum"] *= 0.0
    content = RecordDict(dict(reply.content))
    content["quality"] = ArrayRecord(array_dict={k: Array(v) for k, v in arrays.items()})
    reply.content = content
    return reply


def test_rogue_statistics_are_dropped_and_a_refusing_node_is_counted(
    tiny_model, tmp_path, shards, capsys
):
    from fedsd.server_app import Federation

    rc, contexts = _setup(tiny_model, tmp_path, shards, **{**QUALITY, "num-server-rounds": 1})
    contexts[102].node_config["share-quality-stats"] = "false"
    Federation(InProcessGrid(contexts), RunConfig.from_mapping(rc)).run()
    hist = _history(tmp_path)
    q = hist["rounds"][0]["quality"]
    assert q["nodes"] == 1 and q["nodes_refused"] == 1 and q["nodes_rejected"] == 0, q
    assert hist["rounds"][0]["nodes_replied"] == 2  # training is not refused
    assert "refused the run (share-quality-stats)" in capsys.readouterr().out

    contexts[102].node_config["share-quality-stats"] = "true"
    rc2 = {**rc, "out-dir": str(tmp_path / "out2")}
    for c in contexts.values():
        c.run_config.update(rc2)
    Federation(InProcessGrid(contexts, tamper={102: _poisoned}), RunConfig.from_mapping(rc2)).run()
    q2 = json.loads((tmp_path / "out2" / "history.json").read_text())["rounds"][0]["quality"]
    assert q2["nodes"] == 1 and q2["nodes_rejected"] == 1, q2
    # the honest node's figure alone: the rogue one moved nothing
    assert q2["fid"] == q["fid"] and np.isfinite(q2["fid"])
    assert "dropped the statistics of node 102: moments" in capsys.readouterr().out


def test_a_round_left_unscored_by_a_crash_is_scored_on_resume(tiny_model, tmp_path, shards):
    from fedsd.server_app import Federation

    rc, contexts = _setup(tiny_model, tmp_path, shards, **{"num-server-rounds": 1})
    Federation(InProcessGrid(contexts), RunConfig.from_mapping(rc)).run()
    assert "quality" not in _history(tmp_path)["rounds"][0]
    rc2 = {**rc, **QUALITY, "num-server-rounds": 2}
    for c in contexts.values():
        c.run_config.update(rc2)
    grid = InProcessGrid(contexts)
    Federation(grid, RunConfig.from_mapping(rc2)).run()
    hist = _history(tmp_path)
    assert [("quality" in r) for r in hist["rounds"]] == [True, True]
    assert "baseline_quality" not in hist  # round 1 trained before the evaluation was asked
    assert grid.sent.count(("evaluate.quality", 101)) == 2


def test_a_run_ended_early_by_its_dp_budget_scores_its_last_round(tiny_model, tmp_path, shards):
    """eval-every=2 of 3 rounds, but the DP-SGD budget ends the run after round 1: its
    adapter is the run's result, so it is scored too."""
    from fedsd.privacy import history_epsilon
    from fedsd.server_app import Federation

    one = max(history_epsilon([(2.0, 0.5, 2)], 1e-5), history_epsilon([(2.0, 1.0, 1)], 1e-5))
    two = min(history_epsilon([(2.0, 0.5, 4)], 1e-5), history_epsilon([(2.0, 1.0, 2)], 1e-5))
    dp = {"privacy": "dp-sample", "dp-noise-multiplier": 2.0, "dp-target-epsilon": (one + two) / 2}
    quality = {**QUALITY, "eval-every": 2, "num-server-rounds": 3}
    rc, contexts = _setup(tiny_model, tmp_path, shards, **dp, **quality)
    Federation(InProcessGrid(contexts), RunConfig.from_mapping(rc)).run()
    hist = _history(tmp_path)
    assert [r["round"] for r in hist["rounds"]] == [1]
    assert hist["baseline_quality"]["nodes"] == 2
    assert hist["rounds"][0]["quality"]["nodes"] == 2
