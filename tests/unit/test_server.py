"""The ServerApp round loop against an in-process grid: history, checkpoints, resume.

The deployment itself (TLS, SuperNodes, SuperExec) is covered by tests/e2e/test_e2e.py;
here the grid hands messages straight to the ClientApp handlers so that failures and
restarts can be staged precisely.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Context, Error, Message, RecordDict

from fedsd.config import ConfigError, RunConfig
from fedsd.ml.model import load_adapter_arrays
from tests.unit.test_client import _write_split


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


class InProcessGrid:
    """Delivers each message to the ClientApp handler of its destination node."""

    def __init__(self, contexts, fail_train=(), fail_reasons=None, tamper=None):
        self.contexts = contexts
        self.fail_train = set(fail_train)
        self.fail_reasons = dict(fail_reasons or {})  # node -> its error reply's reason
        self.tamper = dict(tamper or {})  # node -> function rewriting its replies (a rogue)
        self.sent = []
        self.replies = []

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        messages = list(messages)
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = f"m{len(self.replies)}-{len(ids)}"
            ids.append(msg.metadata.message_id)
        self.replies.extend(self.send_and_receive(messages))
        return ids

    def pull_messages(self, ids):
        ids = set(ids)
        got = [r for r in self.replies if r.metadata.reply_to_message_id in ids]
        self.replies = [r for r in self.replies if r.metadata.reply_to_message_id not in ids]
        return got

    def send_and_receive(self, messages, *, timeout=None):
        from fedsd import client_app

        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            self.sent.append((msg.metadata.message_type, node))
            if msg.metadata.message_type == "train" and node in self.fail_train:
                reason = self.fail_reasons.get(node, "node crashed")
                replies.append(Message(Error(code=1, reason=reason), reply_to=msg))
                continue
            handler = {
                "train": client_app.train,
                "evaluate": client_app.evaluate,
                "evaluate.quality": client_app.quality,
            }[msg.metadata.message_type]
            # through the node's privacy-policy mod, as a SuperNode runs it
            reply = client_app.node_policy(msg, self.contexts[node], handler)
            if node in self.tamper:
                reply = self.tamper[node](reply)
            replies.append(reply)
        return replies


def make_shards(root_dir):
    """Two shards: 8 and 4 training images, 2 validation images each."""
    roots = []
    for i, n in enumerate((8, 4)):
        root = root_dir / f"shard-{i}"
        _write_split(root / "train", n, i)
        _write_split(root / "val", 2, 10 + i)
        roots.append(root)
    return roots


@pytest.fixture
def shards(tmp_path):
    return make_shards(tmp_path)


def _setup(tiny_model, tmp_path, shards, **kw):
    rc = {
        "model": str(tiny_model),
        "resolution": 64,
        "num-server-rounds": 2,
        "min-nodes": 1,
        "out-dir": str(tmp_path / "out"),
        "learning-rate": 1e-3,
        **kw,
    }
    contexts = {
        101 + i: Context(
            run_id=1,
            node_id=101 + i,
            node_config={"partition-id": i, "shard-dir": str(s), "cache-dir": str(tmp_path / "c")},
            state=RecordDict(),
            run_config=rc,
        )
        for i, s in enumerate(shards)
    }
    return rc, contexts


def test_rounds_write_adapters_and_history(tiny_model, tmp_path, shards):
    from fedsd.server_app import Federation

    rc, contexts = _setup(tiny_model, tmp_path, shards)
    grid = InProcessGrid(contexts)
    Federation(grid, RunConfig.from_mapping(rc)).run()
    out = tmp_path / "out"
    hist = json.loads((out / "history.json").read_text())
    assert [r["round"] for r in hist["rounds"]] == [1, 2]
    for r in hist["rounds"]:
        assert r["nodes_sampled"] == 2 and r["nodes_replied"] == 2 and r["nodes_failed"] == 0
        assert r["images"] == 12  # 8 + 4 images, not batches
        assert r["train_loss"] > 0 and r["val_loss"] > 0
        assert r["bytes_sent"] > 0 and r["bytes_received"] > 0 and r["seconds"] > 0
    latest = load_adapter_arrays(out / "latest")
    last = load_adapter_arrays(out / "round-2")
    assert all(np.array_equal(latest[k], last[k]) for k in latest)
    first = load_adapter_arrays(out / "round-1")
    assert any(not np.array_equal(first[k], last[k]) for k in first)
    # Round 1's messages score the initial adapter (the base model), round 2's score
    # round 1's aggregate, and one final evaluate-only exchange scores round 2's.
    assert hist["baseline_val_loss"] > 0 and hist["baseline_eval_nodes"] == 2
    assert [r["eval_nodes_replied"] for r in hist["rounds"]] == [2, 2]
    assert sorted(grid.sent) == sorted(
        [("train", 101), ("train", 102)] * 2 + [("evaluate", 101), ("evaluate", 102)]
    )


def test_failed_node_is_counted_and_round_continues(tiny_model, tmp_path, shards):
    from fedsd.server_app import Federation

    rc, contexts = _setup(tiny_model, tmp_path, shards, **{"num-server-rounds": 1})
    Federation(InProcessGrid(contexts, fail_train={102}), RunConfig.from_mapping(rc)).run()
    (rec,) = json.loads((tmp_path / "out" / "history.json").read_text())["rounds"]
    assert rec["nodes_sampled"] == 2 and rec["nodes_replied"] == 1 and rec["nodes_failed"] == 1
    assert rec["images"] == 8
    assert rec["eval_nodes_replied"] == 2  # the final evaluation reaches the failed node too


def test_refusing_nodes_are_named_and_the_run_fails(tiny_model, tmp_path, shards, capsys):
    """A node that does not run the app (fedsd.deploy.pinning) or whose privacy policy forbids the
    run (fedsd.privacy.node_policy) answers with an error: the server says which node refused and
    why, and a round without enough updates fails, saying how many refused."""
    from fedsd.deploy.pinning import AppRefused
    from fedsd.privacy.node_policy import PolicyRefusal
    from fedsd.server_app import Federation

    reasons = {
        101: (
            f"<class 'fedsd.deploy.pinning.AppRefused'>:"
            f"<'{AppRefused('app X is not one of them')}'>"
        ),
        102: str(PolicyRefusal("max-epsilon=1", "this shard's lifetime epsilon would reach 3")),
    }
    rc, contexts = _setup(tiny_model, tmp_path, shards, **{"min-nodes": 2})
    grid = InProcessGrid(contexts, fail_train={101, 102}, fail_reasons=reasons)
    with pytest.raises(RuntimeError, match=r"only 0 of 2 .*; 2 refused the run; 0 failed\)"):
        Federation(grid, RunConfig.from_mapping(rc)).run()
    said = capsys.readouterr().out
    assert f"round 1: node 101 refused the run (app-not-trusted): {reasons[101]}" in said
    assert f"round 1: node 102 refused the run (max-epsilon): {reasons[102]}" in said
    assert not (tmp_path / "out" / "round-1").exists()


def test_nodes_not_sampled_still_evaluate(tiny_model, tmp_path, shards):
    from fedsd.server_app import Federation

    rc, contexts = _setup(tiny_model, tmp_path, shards, **{"fraction-train": 0.5})
    grid = InProcessGrid(contexts)
    Federation(grid, RunConfig.from_mapping(rc)).run()
    hist = json.loads((tmp_path / "out" / "history.json").read_text())
    assert [r["nodes_sampled"] for r in hist["rounds"]] == [1, 1]
    assert [r["eval_nodes_replied"] for r in hist["rounds"]] == [2, 2]
    round2 = grid.sent[2:4]
    assert sorted(kind for kind, _ in round2) == ["evaluate", "train"]


def test_too_few_replies_abort_without_touching_the_checkpoint(tiny_model, tmp_path, shards):
    from fedsd.server_app import Federation

    rc, contexts = _setup(tiny_model, tmp_path, shards, **{"min-nodes": 2})
    with pytest.raises(RuntimeError, match="only 1 of 2"):
        Federation(InProcessGrid(contexts, fail_train={101}), RunConfig.from_mapping(rc)).run()
    hist = json.loads((tmp_path / "out" / "history.json").read_text())
    assert hist["rounds"] == [] and not (tmp_path / "out" / "round-1").exists()
    assert not (tmp_path / "out" / "latest").exists()


def test_restart_resumes_from_the_last_round(tiny_model, tmp_path, shards):
    from fedsd.server_app import Federation

    rc, contexts = _setup(tiny_model, tmp_path, shards, **{"num-server-rounds": 1})
    Federation(InProcessGrid(contexts), RunConfig.from_mapping(rc)).run()
    round1 = load_adapter_arrays(tmp_path / "out" / "round-1")
    # "Crash" after round 1, restart asking for 2 rounds: only round 2 runs, from round 1.
    rc2 = {**rc, "num-server-rounds": 2}
    grid = InProcessGrid(
        {
            k: Context(
                run_id=2, node_id=k, node_config=c.node_config, state=RecordDict(), run_config=rc2
            )
            for k, c in contexts.items()
        }
    )
    fed = Federation(grid, RunConfig.from_mapping(rc2))
    assert fed.out.completed_rounds == 1
    started_from = fed.out.resume_arrays()
    assert all(np.array_equal(started_from[k], round1[k]) for k in round1)
    fed.run()
    hist = json.loads((tmp_path / "out" / "history.json").read_text())
    assert [r["round"] for r in hist["rounds"]] == [1, 2]
    assert sum(1 for kind, _ in grid.sent if kind == "train") == 2  # one round, two nodes


def test_resume_with_different_lora_settings_is_refused(tiny_model, tmp_path, shards):
    from fedsd.fl.checkpoint import ResumeError
    from fedsd.server_app import Federation

    rc, contexts = _setup(tiny_model, tmp_path, shards, **{"num-server-rounds": 1})
    Federation(InProcessGrid(contexts), RunConfig.from_mapping(rc)).run()
    with pytest.raises(ResumeError, match="lora-rank"):
        Federation(InProcessGrid(contexts), RunConfig.from_mapping({**rc, "lora-rank": 4}))


def test_invalid_config_is_refused_before_round_one(tmp_path):
    from fedsd import server_app

    ctx = Context(
        run_id=1,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config={"num-server-rounds": 0, "out-dir": str(tmp_path / "o")},
    )
    with pytest.raises(ConfigError, match="num-server-rounds"):
        server_app.main(object(), ctx)
    assert not (tmp_path / "o").exists()


def test_nodes_with_spent_dp_budget_stop_and_the_run_ends_cleanly(
    tiny_model, tmp_path, shards, capsys
):
    """dp-sample with a fixed noise multiplier and a target that round 2 would exceed:
    round 1 trains, then every node refuses to train, says so, and the run stops with
    round 1's adapter (no round-2 checkpoint, no error)."""
    from fedsd.privacy import history_epsilon
    from fedsd.server_app import Federation

    # One local epoch at batch 4: 2 steps (q=1/2) on the 8-image shard, 1 step (q=1) on
    # the 4-image one. The target sits between one and two rounds for both.
    one = max(history_epsilon([(2.0, 0.5, 2)], 1e-5), history_epsilon([(2.0, 1.0, 1)], 1e-5))
    two = min(history_epsilon([(2.0, 0.5, 4)], 1e-5), history_epsilon([(2.0, 1.0, 2)], 1e-5))
    assert one < two
    rc, contexts = _setup(
        tiny_model,
        tmp_path,
        shards,
        **{
            "privacy": "dp-sample",
            "dp-noise-multiplier": 2.0,
            "dp-target-epsilon": (one + two) / 2,
            "num-server-rounds": 3,
        },
    )
    Federation(InProcessGrid(contexts), RunConfig.from_mapping(rc)).run()
    printed = capsys.readouterr().out
    assert "DP-SGD budget spent" in printed and "training stops here" in printed
    hist = json.loads((tmp_path / "out" / "history.json").read_text())
    assert [r["round"] for r in hist["rounds"]] == [1]
    assert not (tmp_path / "out" / "round-2").exists()
    assert all(p["epsilon"] <= (one + two) / 2 for p in hist["rounds"][0]["privacy"])


class _ConnectingGrid:
    """A Grid whose nodes connect one per ``get_node_ids`` call, up to ``nodes``."""

    def __init__(self, nodes: int) -> None:
        self.nodes, self.calls = nodes, 0

    def get_node_ids(self) -> list[int]:
        self.calls += 1
        return list(range(101, 101 + min(self.calls - 1, self.nodes)))


def test_the_server_waits_for_min_nodes_and_gives_up_after_round_timeout(tmp_path):
    from fedsd.server_app import Federation

    rc = {"out-dir": str(tmp_path / "out"), "min-nodes": 2, "round-timeout": 5}
    grid = _ConnectingGrid(2)
    assert Federation(grid, RunConfig.from_mapping(rc)).wait_for_nodes() == [101, 102]
    assert grid.calls == 3  # none, one, then two nodes
    lonely = Federation(_ConnectingGrid(1), RunConfig.from_mapping({**rc, "round-timeout": 1.5}))
    with pytest.raises(TimeoutError, match=r"only 1 node\(s\) connected after 2s, min-nodes=2"):
        lonely.wait_for_nodes()
