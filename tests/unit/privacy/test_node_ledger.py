"""A data owner's privacy ledger (keyed by the shard, kept across runs and node keys), the
server's memory of it, and the node-side privacy policy."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedsd.config import RunConfig
from fedsd.fl.payload import ADAPTER, to_bytes
from fedsd.privacy.node import NodePrivacy, data_owner_id
from fedsd.privacy.node_policy import NodePolicy, PolicyRefusal, listed_images, refused_rule
from fedsd.privacy.owner_ledgers import OwnerLedgers
from fedsd.privacy.report import format_report, load_report
from tests.unit.test_client import _write_split


@pytest.fixture
def shard(tmp_path):
    root = tmp_path / "shard-0"
    _write_split(root / "train", 8, 0)
    _write_split(root / "val", 4, 1)
    return root


def _cfg(mode="dp-sample", **kw):
    return RunConfig.from_mapping({"privacy": mode, "num-server-rounds": 2, "batch-size": 2, **kw})


def _opacus_epsilon(history, delta=1e-5):
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = list(history)
    return acc.get_epsilon(delta=delta)


def test_owner_id_follows_the_data_not_file_times_or_place(shard, tmp_path):
    owner = data_owner_id(shard)
    assert len(owner) == 16 and int(owner, 16) >= 0
    copy = tmp_path / "restored"
    shutil.copytree(shard, copy)  # a restore: new mtimes, other path
    for png in (copy / "train").glob("*.png"):
        os.utime(png, (1, 1))
    assert data_owner_id(copy) == owner
    meta = copy / "train" / "metadata.jsonl"
    meta.write_text(meta.read_text().splitlines()[0] + "\n")  # other images: other owner
    assert data_owner_id(copy) != owner


def test_ledger_is_the_shards_across_runs_resumes_and_node_ids(shard, tmp_path):
    """Runs and resumes add up per shard; nothing depends on Flower's node id (a new
    NodePrivacy per message, as every fresh ClientApp process builds it)."""
    cache, owner = tmp_path / "cache", data_owner_id(shard)
    step = (1.0, 0.25, 3)

    def train_round(run_key):
        priv = NodePrivacy(_cfg(**{"dp-noise-multiplier": 1.0}), cache, run_key, owner)
        plan = priv.plan_dp_sgd(8)
        return priv.dp_sgd_record(plan, [step]).to_dict()

    first = train_round("run-a")  # round 1
    resumed = train_round("run-a")  # round 2, after a new `fedsd up` (new node ids)
    other = train_round("run-b")  # a new run on the same shard
    assert (first["steps"], resumed["steps"], other["steps"]) == (3, 6, 3)  # this run's
    assert (first["lifetime_steps"], resumed["lifetime_steps"], other["lifetime_steps"]) == (
        3,
        6,
        9,
    )
    assert (other["prior_steps"], other["owner"]) == (6, owner)
    assert resumed["epsilon"] == pytest.approx(_opacus_epsilon([(1.0, 0.25, 6)]))
    assert other["lifetime_epsilon"] == pytest.approx(_opacus_epsilon([(1.0, 0.25, 9)]))
    assert other["prior_epsilon"] == pytest.approx(resumed["lifetime_epsilon"])
    runs = cache / "privacy" / f"owner-{owner}" / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["run-a", "run-b"]
    assert json.loads((runs / "run-a" / "dp-sgd.json").read_text())["history"] == [[1.0, 0.25, 6]]


def test_output_dp_ledger_counts_releases_over_runs(shard, tmp_path):
    owner = data_owner_id(shard)
    extra = {"dp-output-clip": 0.05, "dp-output-epsilon": 2.0, "dp-output-delta": 1e-5}
    recs = []
    for run in ("a", "a", "b"):
        priv = NodePrivacy(_cfg("dp-output", **extra), tmp_path, run, owner)
        _, out = priv.release({"w": np.ones(4, np.float32)}, 1)
        recs.append(out[0].to_dict())
    assert [r["steps"] for r in recs] == [1, 2, 1]
    assert [r["lifetime_steps"] for r in recs] == [1, 2, 3]
    assert [r["prior_steps"] for r in recs] == [0, 1, 2]
    assert recs[2]["lifetime_epsilon"] > recs[1]["lifetime_epsilon"] > recs[2]["epsilon"]


def test_server_refuses_a_ledger_that_went_backwards_and_remembers_in_out(tmp_path):
    def rec(prior, lifetime, owner="ab" * 8):
        return {
            "mechanism": "dp-sgd",
            "owner": owner,
            "node_id": 7,
            "prior_steps": prior,
            "prior_epsilon": 0.0 if prior == 0 else 5.2,
            "lifetime_steps": lifetime,
            "lifetime_epsilon": 5.2 if lifetime == 3 else 6.8,
        }

    ledgers = OwnerLedgers(tmp_path)
    assert ledgers.backwards([rec(0, 3)]) is None
    ledgers.remember([rec(0, 3)], 1)
    again = OwnerLedgers(tmp_path)  # a resumed run: read back from OUT
    assert again.backwards([rec(3, 6)]) is None  # the honest next round
    why = again.backwards([rec(0, 3)])  # the cache was wiped: 0 steps before this round
    assert why is not None and "abababababab's dp-sgd ledger went backwards" in why
    assert "held 0 steps" in why and "reported 3 steps (epsilon 5.2) in round 1" in why
    assert again.backwards([rec(0, 3, owner="cd" * 8)]) is None  # another owner: new


def test_policy_parsing():
    pol = NodePolicy.from_node_config(
        {"max-epsilon": 8, "require-privacy": "secagg+dp-sample", "shard-dir": "x"}
    )
    assert pol.max_epsilon == 8.0 and pol.require_privacy == {"secagg", "dp-sample"}
    assert NodePolicy.from_node_config({"partition-id": 0}).empty
    with pytest.raises(ValueError, match="require-privacy='dp-sgd': unknown component"):
        NodePolicy.from_node_config({"require-privacy": "dp-sgd"})
    with pytest.raises(ValueError, match="max-epsilon='lots'"):
        NodePolicy.from_node_config({"max-epsilon": "lots"})


def test_share_quality_stats_refuses_only_the_quality_messages():
    assert NodePolicy.from_node_config({"share-quality-stats": "true"}).empty
    NodePolicy.from_node_config({}).check_quality()  # sharing is the default
    refusing = NodePolicy.from_node_config({"share-quality-stats": "false"})
    assert not refusing.empty
    with pytest.raises(PolicyRefusal, match="share-quality-stats=false") as info:
        refusing.check_quality()
    assert refused_rule(str(info.value)) == "share-quality-stats"
    with pytest.raises(ValueError, match="share-quality-stats='maybe'"):
        NodePolicy.from_node_config({"share-quality-stats": "maybe"})


def test_policy_rules(shard, tmp_path):
    owner = data_owner_id(shard)
    n = listed_images(shard / "train")
    assert n == 8

    def check(policy, mode="dp-sample", server_round=1, **kw):
        priv = NodePrivacy(_cfg(mode, **kw), tmp_path / "c", "run", owner)
        NodePolicy.from_node_config(policy).check(priv, n, server_round)

    with pytest.raises(PolicyRefusal, match=r"require-privacy=dp-sample: .*privacy=none lacks"):
        check({"require-privacy": "dp-sample"}, "none")
    check({"require-privacy": "dp-sample"}, **{"dp-noise-multiplier": 1.0})
    with pytest.raises(PolicyRefusal, match=r"min-noise-multiplier=1: .*noise multiplier 0.5"):
        check({"min-noise-multiplier": 1}, **{"dp-noise-multiplier": 0.5})
    with pytest.raises(PolicyRefusal, match=r"min-noise-multiplier=1: .*no DP-SGD"):
        check({"min-noise-multiplier": 1}, "secagg")
    with pytest.raises(PolicyRefusal, match="max-epsilon=8: .*no epsilon bound"):
        check(
            {"max-epsilon": 8},
            "dp-central",
            **{"dp-central-clip": 1.0, "dp-central-noise-multiplier": 1.0},
        )
    # 2 rounds x 4 steps at sigma 1, q 0.25: within 8 on a fresh shard...
    planned = _opacus_epsilon([(1.0, 0.25, 8)])
    assert planned < 8
    check({"max-epsilon": 8}, **{"dp-noise-multiplier": 1.0})
    # ...but not once the shard's ledger holds an earlier run's steps
    priv = NodePrivacy(_cfg(**{"dp-noise-multiplier": 1.0}), tmp_path / "c", "old", owner)
    priv.dp_sgd_record(priv.plan_dp_sgd(n), [(1.0, 0.25, 40)])
    total = _opacus_epsilon([(1.0, 0.25, 48)])
    with pytest.raises(PolicyRefusal, match=f"max-epsilon=8: .*would reach {total:.4g}"):
        check({"max-epsilon": 8}, **{"dp-noise-multiplier": 1.0})
    check({"max-epsilon": 100}, **{"dp-noise-multiplier": 1.0})


@pytest.fixture
def _task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


@pytest.mark.usefixtures("_task_identity")
@pytest.mark.parametrize("kind", ["train", "evaluate"])
def test_clientapp_refuses_a_weaker_run_before_reading_any_image(
    shard, tmp_path, monkeypatch, kind
):
    """privacy=none against require-privacy=dp-sample: an error reply naming the rule;
    no image opened, no model loaded, nothing cached."""
    import PIL.Image

    from fedsd import client_app

    def no_images(*a, **k):
        raise AssertionError("an image was read")

    monkeypatch.setattr(PIL.Image, "open", no_images)
    monkeypatch.setattr("fedsd.task.NodeTask.__init__", no_images)
    adapter = to_bytes(np.zeros(4, np.float32))
    content = RecordDict(
        {"config": ConfigRecord({"server-round": 1, "run-key": "k", ADAPTER: adapter})}
    )
    msg = Message(content=content, dst_node_id=1, message_type=kind, group_id="1")
    cache = tmp_path / "cache"
    node_config = {
        "partition-id": 0,
        "shard-dir": str(shard),
        "cache-dir": str(cache),
        "require-privacy": "dp-sample",
    }
    run_config = {"model": "unused", "privacy": "none", "out-dir": str(tmp_path / "o")}
    ctx = Context(
        run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config=run_config
    )
    reply = client_app.app(msg, ctx)
    assert reply.has_error()
    assert "require-privacy=dp-sample" in reply.error.reason
    assert "privacy=none lacks dp-sample" in reply.error.reason
    assert not cache.exists() or not any(cache.rglob("*"))


def test_privacy_report_lists_each_owner_once(tmp_path):
    def rec(node, owner, steps, eps):
        return {
            "mechanism": "dp-sgd",
            "node_id": node,
            "owner": owner,
            "noise_multiplier": 1.0,
            "clip": 1.0,
            "sample_rate": 0.25,
            "steps": steps,
            "epsilon": eps,
            "delta": 1e-5,
            "lifetime_steps": steps + 3,
            "lifetime_epsilon": eps + 1,
        }

    hist = {
        "config": {"privacy": "dp-sample"},
        "rounds": [  # round 2 after a resume: new node ids for the same two owners
            {"round": 1, "privacy": [rec(11, "a" * 16, 3, 5.0), rec(12, "b" * 16, 3, 5.0)]},
            {"round": 2, "privacy": [rec(21, "a" * 16, 6, 6.8), rec(22, "b" * 16, 6, 6.8)]},
        ],
    }
    (tmp_path / "history.json").write_text(json.dumps(hist))
    report = load_report(tmp_path)
    assert sorted(report["final"]) == [
        f"data owner {'a' * 16} dp-sgd",
        f"data owner {'b' * 16} dp-sgd",
    ]
    text = format_report(report)
    line = f"data owner {'a' * 16} dp-sgd: epsilon 6.8 at delta 1e-05 this run (6 steps); "
    assert line + "lifetime epsilon 7.8 (9 steps)" in text
    assert "node 11" in text and "node 21" in text  # rows still say which node sent what


def test_fedsd_up_node_config_is_parsed_and_checked_before_anything_starts():
    from fedsd.common.errors import ConfigError
    from fedsd.deploy.run_config import format_config_pairs, node_config_pairs

    pairs = node_config_pairs(["max-epsilon=8 require-privacy='secagg+dp-sample'"])
    assert pairs == {"max-epsilon": 8, "require-privacy": "secagg+dp-sample"}
    assert NodePolicy.from_node_config(pairs).max_epsilon == 8.0
    assert format_config_pairs(pairs) == 'max-epsilon=8 require-privacy="secagg+dp-sample"'
    with pytest.raises(ConfigError, match="require-privacy='dp-sgd': unknown component"):
        node_config_pairs("require-privacy='dp-sgd'")
    with pytest.raises(ConfigError, match="cannot set shard-dir"):
        node_config_pairs("shard-dir='/elsewhere'")
