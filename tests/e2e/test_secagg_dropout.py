"""SecAgg+ survives a node that dies or hangs mid-round.

Two real TLS ``fedsd up --local`` deployments side by side (tiny model, synthetic shards,
64 px; 3 SuperNodes, ``min-nodes=2``, shares 3, threshold 2, ``round-timeout=60``), each
losing SuperNode 2 in round 2 (round 1 warms the nodes up) to a real signal while the
runner keeps it in its service list, as ``fedsd up --local`` does:

- kill: SIGKILL of the SuperNode process as round 2's collect-masked-vectors stage starts.
  Round 2 closes with the other two; the supervisor restarts the node, the SuperLink takes
  it back once its old session expired, and it trains again in a later round.
- hang: the SuperNode (with its child processes) frozen (SIGSTOP) once round 1 is saved,
  thawed (SIGCONT) once a round-2 stage closed without them: that stage waited at most its
  deadline (or until the SuperLink declared the node offline, two missed 30 s heartbeats,
  whichever came first), the round closed with the other two, and the node trains in
  round 3.

Plus the same dropouts in memory at every stage (Flower's server workflow and client mod,
a grid that loses nodes), checking the unmasked sum: fast, and what the deployments rely on.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import synthetic_shards
from tests.e2e.test_deploy import _wait_no_leftovers
from tests.support.fault_runs import run_up, saved_at, signal_tree, started_pid, up_argv

ROUND_TIMEOUT = 60.0  # each SecAgg+ stage's deadline; cold round-1 stages took 45 s at load 35
ROUNDS = {"kill": 5, "hang": 3}
RUN_CONFIG = (
    f"resolution=64 min-nodes=2 round-timeout={ROUND_TIMEOUT} "
    "secagg-num-shares=3 secagg-reconstruction-threshold=2"
)


@dataclass
class Fault:
    """One deployment, what it does to SuperNode 2, and what was seen (unix times)."""

    name: str
    out: Path
    lines: list[str] = field(default_factory=list)
    at: dict[str, float] = field(default_factory=dict)
    frozen: list[int] = field(default_factory=list)
    code: int | None = None

    def on_line(self, line: str) -> None:
        """Send the signals at their moments in the run's output."""
        if self.name == "kill" and "kill" not in self.at:
            if "round 2: secagg collect-masked-vectors: sent to 3 nodes" in line:
                pid = started_pid(self.lines, "supernode-2")
                assert pid is not None
                os.kill(pid, signal.SIGKILL)  # the SuperNode process alone, as a crash
                self.at["kill"] = time.time()
        if self.name == "hang":
            if not self.frozen and "fedsd round 1/" in line:
                roots = [started_pid(self.lines, "supernode-2")]  # ClientApps: shared launcher
                assert None not in roots
                self.frozen.extend(signal_tree(roots, signal.SIGSTOP))  # type: ignore[arg-type]
                self.at["stop"] = time.time()
            elif self.frozen and "round 2: secagg " in line and "dropped:" in line:
                self.thaw()

    def thaw(self) -> None:
        """SIGCONT whatever was frozen (once)."""
        if "cont" in self.at:
            return
        for pid in self.frozen:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        self.at["cont"] = time.time()

    def rounds(self) -> list[dict]:
        return json.loads((self.out / "history.json").read_text())["rounds"]


def _run(fault: Fault, tiny_model: Path, shards: Path) -> None:
    argv = up_argv(
        fault.out,
        nodes=3,
        rounds=ROUNDS[fault.name],
        model=tiny_model,
        shards=shards,
        run_config=RUN_CONFIG,
        extra=("--privacy", "secagg"),
    )
    try:
        fault.code = run_up(argv, fault.lines, fault.on_line)
    finally:
        fault.thaw()  # never leave a stopped process behind, whatever failed


def _ids(record: dict) -> set[int]:
    return {int(n["node_id"]) for n in record["nodes"]}


def _node_id(fault: Fault, service: str) -> int:
    """The node id the SuperLink gave ``service`` (its log says it once it is accepted)."""
    log = (fault.out / ".deploy" / "logs" / f"{service}.log").read_text()
    return int(re.findall(r"SuperNode ID: (\d+)", log)[0])


def _secagg(record: dict) -> dict:
    (rec,) = [p for p in record["privacy"] if p["mechanism"] == "secagg+"]
    return rec["extra"]


@pytest.mark.e2e
@pytest.mark.heavy
@pytest.mark.timeout(1200)  # two deployments side by side, each run bounded at 600 s
def test_secagg_round_survives_a_killed_and_a_hung_node(tiny_model, tmp_path):
    from fedsd.ml.model import load_adapter_arrays

    shards = synthetic_shards(tmp_path, 3, 12)
    kill, hang = Fault("kill", tmp_path / "out-kill"), Fault("hang", tmp_path / "out-hang")
    threads = [threading.Thread(target=_run, args=(f, tiny_model, shards)) for f in (kill, hang)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=800)
    for fault in (kill, hang):  # every round once, in order, loadable; nothing left running
        said = "".join(fault.lines[-100:])
        assert fault.code == 0, f"{fault.name}: exit {fault.code}\n{said}"
        rounds = fault.rounds()
        assert [r["round"] for r in rounds] == list(range(1, ROUNDS[fault.name] + 1)), said
        for r in rounds:
            adapter = load_adapter_arrays(fault.out / f"round-{r['round']}")
            assert adapter and all(np.isfinite(v).all() for v in adapter.values())
        assert _wait_no_leftovers(fault.out / ".deploy") == [], fault.name
    report = []

    # kill: round 2 closed without the node, which was restarted and trained again later
    said = "".join(kill.lines[-100:])
    assert "kill" in kill.at, f"round 2's masked-vector stage was never announced\n{said}"
    rounds, saved = kill.rounds(), saved_at(kill.out)
    r2 = rounds[1]
    assert (r2["nodes_sampled"], r2["nodes_replied"], r2["nodes_failed"]) == (3, 2, 1), r2
    assert _secagg(r2)["aggregated_nodes"] == 2
    stages = {s["stage"]: (s["ok"], s["sent"]) for s in r2["secagg_stages"]}
    assert stages["collect-masked-vectors"] == (2, 3), r2["secagg_stages"]
    assert "restarted supernode-2" in "".join(kill.lines), said
    lost = _node_id(kill, "supernode-2")
    assert lost not in _ids(r2)
    back = [r for r in rounds[2:] if lost in _ids(r)]
    assert back, f"the restarted node never trained again: {[sorted(_ids(r)) for r in rounds]}"
    report.append(
        f"kill: round 2 saved {saved[2] - kill.at['kill']:.1f}s after the kill (2 of 3 "
        f"nodes); the node trained again in round {back[0]['round']}, saved "
        f"{saved[back[0]['round']] - kill.at['kill']:.1f}s after the kill"
    )

    # hang: one round-2 stage waited its deadline for the frozen node, the rest did not
    said = "".join(hang.lines[-100:])
    assert "stop" in hang.at and "cont" in hang.at, f"never frozen and thawed\n{said}"
    rounds, saved = hang.rounds(), saved_at(hang.out)
    r2, r3 = rounds[1], rounds[2]
    assert (r2["nodes_sampled"], r2["nodes_replied"], r2["nodes_failed"]) == (3, 2, 1), r2
    dropped = [s for s in r2["secagg_stages"] if s["ok"] < s["sent"]]
    assert len(dropped) == 1, r2["secagg_stages"]  # dropped once, not waited for again
    assert all(s["seconds"] <= ROUND_TIMEOUT + 5 for s in r2["secagg_stages"]), r2
    assert (r3["nodes_sampled"], r3["nodes_replied"], r3["nodes_failed"]) == (3, 3, 0), r3
    frozen = _node_id(hang, "supernode-2")
    assert frozen not in _ids(r2) and frozen in _ids(r3)
    report.append(
        f"hang: round-2 {dropped[0]['stage']} stage closed without the node after "
        f"{dropped[0]['seconds']:.1f}s (deadline {ROUND_TIMEOUT:g}s); round 2 saved "
        f"{saved[2] - hang.at['stop']:.1f}s after SIGSTOP (round time {r2['seconds']:.1f}s, "
        f"round 1 {rounds[0]['seconds']:.1f}s); the thawed node trained in round 3"
    )
    print("\n".join(report))
    (tmp_path / "recovery.txt").write_text("\n".join(report) + "\n")


# --------------------------------------------------------------------------- in memory


STAGES = ("setup", "share_keys", "collect_masked_vectors", "unmask")


class _LossyGrid:
    """Delivers each SecAgg+ stage message to the node's own ``secaggplus_mod`` (the
    ClientApp's), except to nodes that dropped at that stage or before."""

    def __init__(self, nodes: list[int], drops: dict[int, str], updates, weights) -> None:
        from flwr.app import Context, RecordDict

        self.nodes, self.drops, self.updates, self.weights = nodes, drops, updates, weights
        self.contexts = {
            n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={})
            for n in nodes
        }
        self.box: dict[str, object] = {}  # message id -> its reply, until pulled
        self.count = itertools.count()

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def push_messages(self, messages) -> list[str]:
        from flwr.app import Error, Message
        from flwr.client.mod import secaggplus_mod
        from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
        from flwr.compat.common import recorddict_compat as compat

        ids = []
        for original in messages:
            node = original.metadata.dst_node_id
            stage = str(original.content.config_records["secaggplus_configs"]["stage"])
            mid = f"{next(self.count)}-{node}-{stage}"
            original.metadata.__dict__["_message_id"] = mid  # as a grid's push does
            ids.append(mid)
            if node in self.drops and STAGES.index(stage) >= STAGES.index(self.drops[node]):
                continue  # lost: never answered
            msg = copy.deepcopy(original)  # each node gets its own copy, as over the wire

            def train(m, _ctx, node=node):
                params = ndarrays_to_parameters([self.updates[node]])
                res = FitRes(Status(Code.OK, ""), params, self.weights[node], {})
                return Message(compat.fitres_to_recorddict(res, True), reply_to=m)

            try:
                reply = secaggplus_mod(msg, self.contexts[node], train)
            except Exception as exc:  # a node's failure is its error reply, as in Flower
                reply = Message(Error(code=0, reason=repr(exc)), reply_to=msg)
            self.box[mid] = reply
        return ids

    def pull_messages(self, ids) -> list:
        return [self.box.pop(i) for i in list(ids) if i in self.box]


@pytest.mark.parametrize(
    "nodes,shares,threshold,drops",
    [
        (3, 3, 2, {1: "setup"}),
        (3, 3, 2, {1: "share_keys"}),
        (3, 3, 2, {1: "collect_masked_vectors"}),
        (3, 3, 2, {1: "unmask"}),
        (5, 5, 3, {0: "setup", 1: "collect_masked_vectors"}),
        (5, 5, 3, {0: "share_keys", 2: "collect_masked_vectors"}),
        (5, 5, 3, {0: "collect_masked_vectors", 1: "collect_masked_vectors"}),
        (7, 7, 3, {0: "setup", 1: "share_keys", 4: "collect_masked_vectors", 5: "unmask"}),
    ],
)
def test_secagg_dropout_at_any_stage_unmasks_the_survivors_mean(nodes, shares, threshold, drops):
    """The unmasked mean is the weighted mean of the updates of the nodes whose masked
    vectors arrived. Flower 1.41's own workflow aborts every case with a dropout at setup
    or share-keys (or sums wrongly once those meet a later dropout)."""
    from flwr.app import Context, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedsd.fl.secagg import secure_round
    from fedsd.privacy import PrivacyConfig, check_secagg, secagg_error_bound

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    ids = [1000 + i for i in range(nodes)]
    rng = np.random.default_rng(7)
    updates = {n: rng.uniform(-0.5, 0.5, 40).astype(np.float32) for n in ids}
    weights = {n: 3 + 2 * i for i, n in enumerate(ids)}
    lost = {ids[i]: stage for i, stage in drops.items()}
    privacy = PrivacyConfig(
        privacy="secagg", secagg_num_shares=shares, secagg_reconstruction_threshold=threshold
    )
    said: list[str] = []
    deadline = 1.0  # each stage's (round-timeout): what a lost node costs
    res = secure_round(
        _LossyGrid(ids, lost, updates, weights),
        Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        1,
        np.zeros(40, np.float32),
        ids,
        {"server-round": 1},
        privacy,
        check_secagg(nodes, privacy),
        deadline,
        said.append,
    )
    summed = [n for n in ids if lost.get(n) in (None, "unmask")]
    assert res.halted() is None, res.log
    assert sorted(n for n, _, _ in res.nodes) == summed
    want = sum(updates[n] * weights[n] for n in summed) / sum(weights[n] for n in summed)
    bound = secagg_error_bound([weights[n] for n in summed], privacy, 0.5)  # quantization
    np.testing.assert_allclose(res.mean_update, want, rtol=0, atol=bound)
    seconds = {s["stage"]: s["seconds"] for s in res.log.stages}
    for stage in set(drops.values()):  # a stage that lost a node waited its deadline
        waited = seconds[stage.replace("_", "-")]
        assert deadline <= waited < deadline + 2, (stage, waited)  # + polls on a busy CPU
    for node, stage in lost.items():  # each loss announced at the stage it happened
        name = stage.replace("_", "-")
        assert any(
            s.startswith(f"round 1: secagg {name}: ")
            and "dropped: no reply from node(s)" in s
            and str(node) in s
            for s in said
        ), said


def test_secagg_halts_clearly_below_the_threshold():
    """Two of three nodes lost at setup: no node keeps `threshold` live neighbours; the
    round halts and says why instead of returning a sum."""
    from flwr.app import Context, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedsd.fl.secagg import secure_round
    from fedsd.privacy import PrivacyConfig, check_secagg

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    ids = [1, 2, 3]
    ones = {n: np.ones(4, np.float32) * 0.1 for n in ids}
    privacy = PrivacyConfig(
        privacy="secagg", secagg_num_shares=3, secagg_reconstruction_threshold=2
    )
    res = secure_round(
        _LossyGrid(ids, {1: "setup", 2: "setup"}, ones, dict.fromkeys(ids, 5)),
        Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        1,
        np.zeros(4, np.float32),
        ids,
        {"server-round": 1},
        privacy,
        check_secagg(3, privacy),
        1.0,
        lambda _: None,
    )
    assert res.mean_update is None and res.nodes == []
    assert res.halted() == (
        "SecAgg+ halted after its setup stage (1 of 3 nodes replied): a node had fewer than "
        "2 live neighbours (the reconstruction threshold), so the sum could not be unmasked"
    )
