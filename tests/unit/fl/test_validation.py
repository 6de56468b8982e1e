"""The server's checks of each train reply: a bad reply is dropped and counted by reason,
never aggregated, never a crash; no checkpoint holds a non-finite value."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
from prometheus_client import REGISTRY  # in-process values: imported before the env var

from fedsd.config import RunConfig
from fedsd.fl.payload import ADAPTER, from_bytes, vector_record
from fedsd.fl.validation import REASONS, Accepted, Limits, Rejected, check_reply
from fedsd.ml.model import load_adapter_arrays
from fedsd.privacy.node_policy import POLICY_KEYS, REFUSAL_PREFIX
from tests.unit.test_server import InProcessGrid, _setup, make_shards


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


@pytest.fixture
def shards(tmp_path):
    return make_shards(tmp_path)


LIMITS = Limits(length=4, max_norm=10.0, max_weight=100.0, local_epochs=2)
GOOD = {"num-examples": 8, "shard-images": 4, "train-loss": 0.5}


def _flat(*values: float) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


@pytest.mark.parametrize(
    ("flat", "metrics", "reason"),
    [
        (_flat(1, 2, 3, 4), None, "missing-key"),
        (_flat(1, 2, 3, 4), {"shard-images": 4}, "missing-key"),
        (_flat(1, 2, 3, 4), {"num-examples": 4}, "missing-key"),
        (None, GOOD, "missing-key"),
        (object(), GOOD, "bad-type"),
        (np.arange(4), GOOD, "bad-type"),
        (_flat(1, 2, 3, 4), {**GOOD, "num-examples": [1.0]}, "bad-type"),
        (_flat(1, 2, 3, 4), {**GOOD, "num-examples": True}, "bad-type"),
        (_flat(1, 2, 3), GOOD, "wrong-length"),
        (np.ones((2, 2), np.float32), GOOD, "wrong-length"),
        (_flat(1, np.nan, 3, 4), GOOD, "non-finite"),
        (_flat(1, np.inf, 3, 4), GOOD, "non-finite"),
        (_flat(10, 0, 0, 1), GOOD, "norm-bound"),
        (_flat(1, 2, 3, 4), {**GOOD, "num-examples": -1}, "weight-range"),
        (_flat(1, 2, 3, 4), {**GOOD, "num-examples": float("nan")}, "weight-range"),
        (_flat(1, 2, 3, 4), {**GOOD, "num-examples": 9}, "weight-range"),  # > 4 x 2 epochs
        (_flat(1, 2, 3, 4), {"num-examples": 1e12, "shard-images": 1e12}, "weight-cap"),
        (_flat(1, 2, 3, 4), {**GOOD, "shard-images": float("inf")}, "weight-range"),
        (_flat(1, 2, 3, 4), {**GOOD, "shard-images": -4}, "weight-range"),
    ],
)
def test_each_bad_reply_is_rejected_with_its_reason(flat, metrics, reason):
    verdict = check_reply(flat, metrics, LIMITS)
    assert isinstance(verdict, Rejected) and verdict.reason == reason and verdict.detail
    assert verdict.reason in REASONS


def test_a_good_reply_is_accepted_unchanged():
    verdict = check_reply(_flat(1, 2, 3, 4), GOOD, LIMITS)
    assert isinstance(verdict, Accepted)
    np.testing.assert_array_equal(verdict.update, _flat(1, 2, 3, 4))
    assert verdict.weight == 8.0 and verdict.norm == pytest.approx(np.sqrt(30))
    # weight 0 (a node whose DP budget is spent) is a valid reply that adds nothing
    assert check_reply(_flat(0, 0, 0, 0), {**GOOD, "num-examples": 0}, LIMITS).weight == 0.0


def test_dp_central_reclips_on_the_server_and_weighs_every_node_one():
    limits = Limits(length=4, max_norm=10.0, max_weight=100.0, central_clip=1.0)
    verdict = check_reply(_flat(3, 0, 4, 0), {"num-examples": 4, "shard-images": 4}, limits)
    assert isinstance(verdict, Accepted) and verdict.weight == 1.0 and verdict.norm == 5.0
    np.testing.assert_allclose(verdict.update, [0.6, 0, 0.8, 0], rtol=1e-6)
    small = check_reply(_flat(0.3, 0, 0.4, 0), {"num-examples": 1, "shard-images": 4}, limits)
    np.testing.assert_array_equal(small.update, _flat(0.3, 0, 0.4, 0))
    spent = check_reply(_flat(0, 0, 0, 0), {"num-examples": 0, "shard-images": 4}, limits)
    assert spent.weight == 0.0


def test_save_round_refuses_a_non_finite_adapter(tiny_model, tmp_path):
    from fedsd.fl.checkpoint import RunDir

    cfg = RunConfig.from_mapping({"model": str(tiny_model), "out-dir": str(tmp_path / "o")})
    rd = RunDir.open(cfg)
    arrays = {"a.lora_A.weight": np.ones((2, 2), np.float32)}
    arrays["a.lora_B.weight"] = np.array([[0.0, np.inf]], np.float32)
    with pytest.raises(ValueError, match="non-finite values in a.lora_B.weight"):
        rd.save_round(1, arrays, {"round": 1})
    assert not rd.round_dir(1).exists() and not (tmp_path / "o" / "latest").exists()
    assert rd.completed_rounds == 0


# -- the round loop against rogue nodes ------------------------------------------------
def _rogue_reply(kind: str, msg: Message) -> Message:
    n = from_bytes(msg.content.config_records["config"][ADAPTER], "float32").size
    flat = np.zeros(n, np.float32)
    metrics = {"num-examples": 4, "shard-images": 4, "train-loss": 0.1, "train-seconds": 0.0}
    metrics |= {"val-loss": 0.2, "val-examples": 2}
    if kind == "nan":
        flat[0] = np.nan
    elif kind == "inf":
        flat[-1] = -np.inf
    elif kind == "short":
        flat = flat[:-1]
    elif kind == "huge":
        flat[:] = 1e6
    elif kind == "poison":  # valid, under the norm bound, far from any honest update
        flat[:] = 50.0
    elif kind == "int":
        flat = np.zeros(n, np.int32)
    elif kind == "weight-1e12":
        metrics |= {"num-examples": 1e12, "shard-images": 1e12}
    elif kind == "negative":
        metrics["num-examples"] = -4
    elif kind == "over-images":
        metrics["num-examples"] = 5
    elif kind == "no-num-examples":
        del metrics["num-examples"]
    elif kind == "inf-images":  # once accepted, then int(inf) crashed the round
        metrics["shard-images"] = float("inf")
    elif kind == "refuse":
        reason = f"{REFUSAL_PREFIX}require-privacy=dp-sample: the run's privacy=none lacks it"
        return Message(Error(code=2, reason=reason), reply_to=msg)
    elif kind == "crash":
        return Message(Error(code=2, reason="<class 'OSError'>:<'disk gone'>"), reply_to=msg)
    content = RecordDict({"privacy": ConfigRecord({"records": "[]"})})
    if kind != "no-update":
        content["update"] = ConfigRecord(vector_record(flat))
    if kind != "no-metrics":
        content["metrics"] = MetricRecord(metrics)
    return Message(content=content, reply_to=msg)


ROGUES = {
    "nan": "non-finite",
    "inf": "non-finite",
    "short": "wrong-length",
    "huge": "norm-bound",
    "int": "bad-type",
    "weight-1e12": "weight-cap",
    "negative": "weight-range",
    "over-images": "weight-range",
    "no-num-examples": "missing-key",
    "no-metrics": "missing-key",
    "no-update": "missing-key",
    "inf-images": "weight-range",
}
#: rogue kinds that answer with an error: a privacy policy refusal and a crash
ERRORS = {"refuse": "require-privacy", "crash": None}


class RogueGrid(InProcessGrid):
    """Honest nodes run the ClientApp; each rogue node answers ``train`` with its bad reply
    and ``evaluate`` with plain metrics."""

    def __init__(self, contexts, rogues):
        super().__init__(contexts)
        self.rogues = rogues
        self.nodes = list(contexts) + list(rogues)

    def get_node_ids(self):
        return self.nodes

    def send_and_receive(self, messages, *, timeout=None):
        honest = [m for m in messages if m.metadata.dst_node_id not in self.rogues]
        replies = super().send_and_receive(honest)
        for msg in messages:
            kind = self.rogues.get(msg.metadata.dst_node_id)
            if kind is None:
                continue
            if msg.metadata.message_type == "train":
                replies.append(_rogue_reply(kind, msg))
            else:
                metrics = MetricRecord({"val-loss": 0.2, "val-examples": 2})
                replies.append(Message(RecordDict({"metrics": metrics}), reply_to=msg))
        return replies


def test_rogue_replies_are_dropped_counted_and_never_saved(
    tiny_model, tmp_path, shards, monkeypatch, capsys
):
    from fedsd.server_app import Federation

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "prom"))
    rc, contexts = _setup(tiny_model, tmp_path, shards, **{"num-server-rounds": 1})
    rogues = {201 + i: kind for i, kind in enumerate([*ROGUES, *ERRORS])}
    Federation(RogueGrid(contexts, rogues), RunConfig.from_mapping(rc)).run()
    out = tmp_path / "out"
    hist = json.loads((out / "history.json").read_text())
    (rec,) = hist["rounds"]
    assert rec["nodes_sampled"] == 2 + len(ROGUES) + len(ERRORS)
    assert rec["nodes_replied"] == 2 and rec["nodes_rejected"] == len(ROGUES)
    assert rec["nodes_failed"] == len(ERRORS)
    assert sorted(m["node_id"] for m in rec["nodes"]) == [101, 102]
    assert rec["images"] == 12  # the honest nodes' 8 + 4, nothing claimed by a rogue
    printed = capsys.readouterr().out
    sampled = 2 + len(ROGUES) + len(ERRORS)
    assert f"nodes=2/{sampled} failed={len(ERRORS)} rejected={len(ROGUES)} " in printed
    for node, kind in rogues.items():
        if kind in ROGUES:
            assert f"round 1: rejected the update of node {node}: {ROGUES[kind]}" in printed
    refuser, crasher = (n for n, k in rogues.items() if k in ERRORS)
    said = f"round 1: node {refuser} refused the run (require-privacy): {REFUSAL_PREFIX}"
    assert said in printed
    assert f"round 1: train failed on node {crasher}: <class 'OSError'>" in printed
    run = hist["run_key"]
    for reason in REASONS:
        got = REGISTRY.get_sample_value(
            "fedsd_server_rejected_updates_total", {"run": run, "reason": reason}
        )
        assert got == sum(r == reason for r in ROGUES.values()), reason
    for rule in POLICY_KEYS:  # each refusal counted by its rule; a crash is no refusal
        got = REGISTRY.get_sample_value(
            "fedsd_server_node_refusals_total", {"run": run, "reason": rule}
        )
        assert got == sum(r == rule for r in ERRORS.values()), rule
    for d in ("round-1", "latest"):
        arrays = load_adapter_arrays(out / d)
        assert all(np.all(np.isfinite(a)) for a in arrays.values())
        assert max(float(np.max(np.abs(a))) for a in arrays.values()) < 1e3


def test_a_non_finite_aggregate_ends_the_run_without_a_checkpoint(
    tiny_model, tmp_path, shards, monkeypatch, capsys
):
    from fedsd import server_app

    def poisoned(rule, updates, trim_fraction):
        return {k: np.full_like(v, np.nan) for k, v in updates[0][0].items()}

    monkeypatch.setattr(server_app, "aggregate", poisoned)
    rc, contexts = _setup(tiny_model, tmp_path, shards, **{"num-server-rounds": 1})
    with pytest.raises(server_app.NonFiniteAggregate, match="non-finite"):
        server_app.Federation(InProcessGrid(contexts), RunConfig.from_mapping(rc)).run()
    assert "error: round 1: the aggregate has non-finite values" in capsys.readouterr().out
    assert not (tmp_path / "out" / "round-1").exists()
    assert not (tmp_path / "out" / "latest").exists()
    assert json.loads((tmp_path / "out" / "history.json").read_text())["rounds"] == []


def test_node_privacy_records_that_would_crash_the_log_are_dropped():
    from fedsd.fl.replies import node_records
    from fedsd.privacy.report import privacy_lines

    good = {"mechanism": "dp-sgd", "epsilon": 1.0, "delta": 1e-5, "steps": 3}
    junk = [3, {"epsilon": 1.0}, {"mechanism": "secagg+"}, {"mechanism": "x", "epsilon": 1.0}]
    junk.append({"mechanism": "x", "epsilon": "big", "delta": 1e-5})
    junk.append({**good, "owner": "ab", "prior_steps": "x"})  # would crash the ledger check
    junk.append({**good, "owner": 5, "lifetime_steps": 3})
    junk.append({**good, "epsilon": float("nan")})  # would be NaN in history.json
    junk.append({**good, "owner": "ab", "lifetime_epsilon": float("inf")})
    junk.append({**good, "epsilon": 10**400})  # JSON ints are unbounded: no float
    records = node_records({"records": json.dumps([good, *junk])}, 7)
    assert records == [{**good, "node_id": 7}]
    assert len(privacy_lines({"round": 1, "privacy": records})) == 1
    assert node_records({"records": '{"mechanism": "dp-sgd"}'}, 7) == []
    assert node_records({"records": "not json"}, 7) == []


def test_an_honest_dp_output_update_passes_the_default_norm_bound():
    from fedsd.fl.validation import noise_norm_allowance
    from fedsd.privacy import PrivacyConfig, noise_rng, privatize_update

    n = 20_000
    for mech, extra in (("gaussian", {"dp-output-delta": 1e-5}), ("laplace", {})):
        p = PrivacyConfig.from_mapping(
            {"privacy": "dp-output", "dp-output-mechanism": mech, "dp-output-clip": 1.0}
            | {"dp-output-epsilon": 0.01, **extra}
        )
        update = {"x": np.full(n, 0.01, np.float32)}
        noised, _ = privatize_update(
            update, mech, 1.0, 0.01, extra.get("dp-output-delta"), noise_rng()
        )
        limits = Limits(length=n, max_norm=10_000 + noise_norm_allowance(p, n), max_weight=1e6)
        verdict = check_reply(noised["x"], {"num-examples": 4, "shard-images": 4}, limits)
        assert isinstance(verdict, Accepted), (mech, verdict)
        assert verdict.norm > 10_000  # the noise alone is above max-update-norm
        # and a real outlier is still refused
        assert (
            check_reply(noised["x"] * 10, GOOD | {"num-examples": 4}, limits).reason == "norm-bound"
        )


def test_trimmed_mean_in_the_round_loop_cuts_a_poisoner(tiny_model, tmp_path, shards):
    from fedsd.server_app import Federation

    rc, contexts = _setup(
        tiny_model, tmp_path, shards, **{"num-server-rounds": 1, "aggregation": "trimmed-mean"}
    )
    fed = Federation(RogueGrid(contexts, {201: "poison"}), RunConfig.from_mapping(rc))
    initial = fed.initial_arrays()
    fed.run()
    (rec,) = json.loads((tmp_path / "out" / "history.json").read_text())["rounds"]
    assert rec["nodes_replied"] == 3 and rec["nodes_rejected"] == 0
    after = load_adapter_arrays(tmp_path / "out" / "round-1")
    moved = max(float(np.max(np.abs(after[k] - initial[k]))) for k in after)
    assert 0 < moved < 1.0  # FedAvg would move every value by 50 x 4 / 16 = 12.5


def test_a_refusal_is_told_from_other_errors_by_its_rule():
    from fedsd.privacy.node_policy import PolicyRefusal, refused_rule

    for rule in POLICY_KEYS:
        reason = str(PolicyRefusal(f"{rule}=8", "why"))
        assert refused_rule(reason) == rule
        # raised inside a handler, Flower wraps the message in the exception's class name
        assert (
            refused_rule(f"<class 'fedsd.privacy.node_policy.PolicyRefusal'>:<'{reason}'>") == rule
        )
    assert refused_rule(f"{REFUSAL_PREFIX}made-up-rule=1: x") is None  # never a new label
    assert refused_rule("<class 'OSError'>:<'disk gone'>") is None


def test_history_json_is_strict_json_with_non_finite_metrics_as_null(tiny_model, tmp_path):
    from fedsd.fl.checkpoint import RunDir

    cfg = RunConfig.from_mapping({"model": str(tiny_model), "out-dir": str(tmp_path / "o")})
    rd = RunDir.open(cfg)
    arrays = {"a.lora_A.weight": np.ones((2, 2), np.float32)}
    node = {"node_id": 7, "train-loss": float("nan"), "val-loss": np.float32("inf"), "x": 2.5}
    rd.save_round(1, arrays, {"round": 1, "train_loss": 0.5, "nodes": [node]})
    text = (tmp_path / "o" / "history.json").read_text()
    (rec,) = json.loads(text, parse_constant=lambda c: pytest.fail(f"history.json holds {c}"))[
        "rounds"
    ]
    assert rec["nodes"] == [{"node_id": 7, "train-loss": None, "val-loss": None, "x": 2.5}]
    assert rec["train_loss"] == 0.5
