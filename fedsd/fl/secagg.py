"""One SecAgg+ round on the server: Flower's ``SecAggPlusWorkflow``, driven per round.

The workflow is written for Flower's legacy strategies: it asks ``strategy.configure_fit``
for the FitIns of each sampled node, runs the four stages (setup, share keys, collect
masked vectors, unmask) and hands ``strategy.aggregate_fit`` only the unmasked weighted
average, with each node's FitRes metrics. ``_OneRound`` is the smallest strategy that
feeds it fedsd's sampled nodes and global adapter and captures that result.
``secure_exchange`` is the round's exchange built on it (the sampled nodes train under
SecAgg+, the others evaluate); the round loop, checkpoints and history stay in
``fedsd.server_app``.

The grid given to the workflow is wrapped so every stage is announced on the terminal
(``fedsd round N: secagg <stage> ...``), its bytes are counted, node errors are kept for
the round's message, and replies are polled from every 0.05 s (backing off to 0.5 s)
instead of every 3 s.

Dropouts (Flower 1.41). ``round-timeout`` is each stage's deadline: the workflow waits
that long for the stage's replies and goes on with the nodes that answered, so a node
that hangs or dies is dropped at the first stage it misses and costs at most one
deadline. Each stage message lives only as long as its stage (its TTL is the deadline),
so a node that wakes later starts no stale stage. Flower's own workflow then asks the
survivors, at the unmask stage, for key shares of every dropped node, including one that
dropped before it shared its keys (at setup or share-keys): the survivors hold none, all
of them fail and the round aborts; and it removes a dropped node's pairwise masks with
every neighbour, also those that never shared keys or sent no vector (a server KeyError,
or a wrong sum). ``DropoutTolerantSecAggPlus`` follows the SecAgg+ protocol instead: the
dropped nodes are those that shared keys but sent no vector, and their masks are removed
with the nodes whose vectors are in the sum. A round then survives a dropout at any stage
while every remaining node keeps at least ``threshold`` live neighbours; below that it
halts and the round fails, naming the stage.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message
from flwr.server.strategy import Strategy
from flwr.serverapp import Grid

from fedsd.common.health import poll_until
from fedsd.fl.payload import pack, unpack
from fedsd.fl.replies import metrics_of, node_records, num, val_pair
from fedsd.privacy import (
    PrivacyConfig,
    PrivacyRecord,
    SecAggPlan,
    check_secagg,
    secagg_error_bound,
)

if TYPE_CHECKING:
    from fedsd.server_app import Federation

STAGE_NAMES = {
    "setup": "setup",
    "share_keys": "share-keys",
    "collect_masked_vectors": "collect-masked-vectors",
    "unmask": "unmask",
}


#: The ServerApp's wait between pulls of replies: from 0.05 s, doubling to 0.5 s while
#: replies are pending, and from 0.05 s again after each reply that arrives.
REPLY_POLL, REPLY_POLL_MAX = 0.05, 0.5


def send_and_receive(
    grid: Grid, messages: Iterable[Message], timeout: float | None
) -> list[Message]:
    """``Grid.send_and_receive`` with shorter waits (Flower's HTTP grid sleeps 3 s between
    pulls, which is most of a short round)."""
    return pull_replies(grid, list(grid.push_messages(messages)), timeout)


def pull_replies(grid: Grid, ids: list[str], timeout: float | None) -> list[Message]:
    """Replies to already pushed messages ``ids``, until all are in or ``timeout``."""
    pending = set(ids)
    out: list[Message] = []

    def some_in() -> bool | None:
        got = list(grid.pull_messages(pending))
        out.extend(got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        return True if got or not pending else None

    deadline = None if timeout is None else time.monotonic() + timeout
    while pending:  # after each reply, fast again: the next is likely near
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        if poll_until(some_in, left, REPLY_POLL, max_interval=REPLY_POLL_MAX) is None:
            break  # timed out
    return out


@dataclass
class StageLog:
    """What the wrapped grid saw during one secure round."""

    bytes_sent: int = 0
    bytes_received: int = 0
    errors: list[str] = field(default_factory=list)
    stages: list[dict[str, Any]] = field(default_factory=list)


class AnnouncingGrid:
    """A Grid for the workflow: fast polling, stage announcements, byte counts, errors."""

    def __init__(self, grid: Grid, say: Callable[[str], None], server_round: int) -> None:
        """Wrap ``grid``; ``say`` prints progress lines."""
        self._grid = grid
        self._say = say
        self._round = server_round
        self.log = StageLog()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Send one stage's messages; wait for the replies (or ``timeout``)."""
        messages = list(messages)
        stage = "?"
        if messages:
            cfg = messages[0].content.config_records.get("secaggplus_configs")
            stage = STAGE_NAMES.get(str(cfg.get("stage")), "?") if cfg is not None else "?"
        if timeout is not None:
            for m in messages:  # a node that wakes after the stage starts nothing stale
                m.metadata.ttl = float(timeout)
        t0 = time.perf_counter()
        self._say(f"round {self._round}: secagg {stage}: sent to {len(messages)} nodes")
        self.log.bytes_sent += sum(_nbytes(m) for m in messages)
        replies = send_and_receive(self._grid, messages, timeout)
        # A reply made by the SuperLink (node offline, message expired) comes from the
        # link's own id: name the node the message was for.
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        ok_nodes, failed = set(), set()
        for r in replies:
            node = sent_to.get(r.metadata.reply_to_message_id, r.metadata.src_node_id)
            if r.has_error():
                failed.add(node)
                self.log.errors.append(f"node {node}: {r.error.reason}")
            else:
                ok_nodes.add(node)
                self.log.bytes_received += _nbytes(r)
        seconds = time.perf_counter() - t0
        self.log.stages.append(
            {"stage": stage, "sent": len(messages), "ok": len(ok_nodes), "seconds": seconds}
        )
        silent = sorted(set(sent_to.values()) - ok_nodes - failed)
        if len(ok_nodes) < len(messages):
            self._say(
                f"round {self._round}: secagg {stage}: {len(ok_nodes)} of {len(messages)} "
                f"nodes replied in {seconds:.1f}s (deadline {timeout:g}s); dropped: "
                + "; ".join(
                    part
                    for part in (
                        f"no reply from node(s) {', '.join(map(str, silent))}" if silent else "",
                        f"error from node(s) {', '.join(map(str, sorted(failed)))}"
                        if failed
                        else "",
                    )
                    if part
                )
            )
        return replies


def _nbytes(msg: Message) -> int:
    return sum(rec.count_bytes() for rec in msg.content.array_records.values()) + sum(
        len(v) if isinstance(v, bytes) else sum(len(b) for b in v if isinstance(b, bytes))
        for rec in msg.content.config_records.values()
        for v in rec.values()
        if isinstance(v, bytes | list)
    )


@dataclass
class SecureResult:
    """The unmasked weighted mean of the updates and each contributing node's FitRes."""

    mean_update: np.ndarray | None
    nodes: list[tuple[int, int, dict[str, Any]]]  # (node id, weight, metrics)
    log: StageLog
    threshold: int = 0  # shares needed to unmask a node

    def halted(self) -> str | None:
        """Why the round produced no aggregate (None when it did)."""
        if self.mean_update is not None:
            return None
        if not self.log.stages:
            return "SecAgg+ sent nothing"
        last = self.log.stages[-1]
        return (
            f"SecAgg+ halted after its {last['stage']} stage ({last['ok']} of {last['sent']} "
            f"nodes replied): a node had fewer than {self.threshold} live neighbours (the "
            "reconstruction threshold), so the sum could not be unmasked"
        )


def _dropout_tolerant_workflow() -> type:
    """``SecAggPlusWorkflow`` whose unmask stage asks only for the key shares of nodes
    that shared keys (see the module docstring); imported lazily with Flower's workflow."""
    from flwr.server.workflow import SecAggPlusWorkflow

    class DropoutTolerantSecAggPlus(SecAggPlusWorkflow):  # type: ignore[misc]
        """Flower's workflow with the protocol's dropout set at the unmask stage."""

        def share_keys_stage(self, grid: Any, context: Any, state: Any) -> bool:
            """Flower's stage; then the nodes that shared keys become the set whose
            masks the unmask stage removes (the dropped ones by their key shares)."""
            super().share_keys_stage(grid, context, state)
            state.sampled_node_ids = set(state.active_node_ids)
            return bool(self._check_threshold(state))

        def unmask_stage(self, grid: Any, context: Any, state: Any) -> bool:
            """Flower's stage, removing a dropped node's pairwise masks only with the
            nodes whose vectors are in the sum (Flower's loop takes every neighbour: one
            that never shared keys has no key there, and one that shared keys but sent
            no vector has no mask in the sum)."""
            alive = state.active_node_ids
            for nid in state.sampled_node_ids - alive:
                state.nid_to_neighbours[nid] = (state.nid_to_neighbours[nid] & alive) | {nid}
            return bool(super().unmask_stage(grid, context, state))

    return DropoutTolerantSecAggPlus


def secure_round(
    grid: Grid,
    context: Context,
    server_round: int,
    flat_adapter: np.ndarray,
    sampled: list[int],
    config: dict[str, Any],
    privacy: PrivacyConfig,
    plan: SecAggPlan,
    timeout: float,
    say: Callable[[str], None],
) -> SecureResult:
    """Run SecAgg+ once over ``sampled``: each node trains on ``flat_adapter`` and sends its
    masked update; return the unmasked weighted mean (None when the round aborted)."""
    from flwr.common import Parameters, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common.recorddict_compat import parameters_to_arrayrecord
    from flwr.server import LegacyContext

    strategy = _OneRound(sampled, config)
    legacy = LegacyContext(context, strategy=strategy)
    params: Parameters = ndarrays_to_parameters([flat_adapter])
    legacy.state.array_records["parameters"] = parameters_to_arrayrecord(params, True)
    legacy.state.config_records["config"] = ConfigRecord({"current_round": server_round})
    workflow = _dropout_tolerant_workflow()(
        num_shares=plan.num_shares,
        reconstruction_threshold=plan.reconstruction_threshold,
        max_weight=privacy.secagg_max_weight,
        clipping_range=privacy.secagg_clipping_range,
        quantization_range=privacy.secagg_quantization_range,
        modulus_range=privacy.secagg_modulus_range,
        timeout=timeout,
    )
    wrapped = AnnouncingGrid(grid, say, server_round)
    workflow(wrapped, legacy)  # type: ignore[arg-type]
    nodes = [
        (proxy.node_id, int(res.num_examples), dict(res.metrics)) for proxy, res in strategy.results
    ]
    mean = None
    if strategy.results:
        (mean,) = parameters_to_ndarrays(strategy.results[0][1].parameters)
    return SecureResult(mean_update=mean, nodes=nodes, log=wrapped.log, threshold=plan.threshold)


def secure_exchange(
    fed: Federation, server_round: int, arrays: dict[str, np.ndarray], sampled: list[int]
) -> dict[str, Any]:
    """``Federation.exchange`` for a SecAgg+ round: sampled nodes train inside
    ``secure_round`` (the server only sees the unmasked weighted mean of their updates);
    the other nodes get an evaluate message at the same time. Returns the same result
    dict as ``exchange``, with the mean already computed (``mean``) and the stages."""
    if fed.context is None:
        raise RuntimeError("SecAgg+ needs the ServerApp's Context")
    privacy, timeout = fed.privacy, fed.cfg.round_timeout
    plan = check_secagg(len(sampled), privacy)  # refused here, before any message
    for warning in plan.warnings:
        fed.say(f"round {server_round}: secagg warning: {warning}")
    sent_keys = fed.sent_keys(arrays)
    flat = pack({k: arrays[k] for k in sent_keys})
    config = fed.message_config(server_round, arrays)
    others = [n for n in sorted(fed.grid.get_node_ids()) if n not in sampled]
    pushed = time.monotonic()
    eval_ids, eval_bytes = (
        fed.send([(n, "evaluate") for n in others], flat, config, server_round, push_only=True)
        if others
        else ([], 0)
    )
    res = secure_round(
        fed.grid, fed.context, server_round, flat, sampled, config, privacy, plan, timeout, fed.say
    )
    # The evaluate replies had the whole secure round to arrive: wait only for what is
    # left of their own deadline, so a hung node outside the sample adds nothing to it.
    evals = pull_replies(fed.grid, eval_ids, max(0.0, pushed + timeout - time.monotonic()))
    out: dict[str, Any] = {
        "updates": [],
        "losses": [],
        "nodes": [],
        "privacy": [],
        "errors": [why for why in [res.halted()] if why] + res.log.errors,
        "bytes_sent": eval_bytes + res.log.bytes_sent,
        "bytes_received": res.log.bytes_received,
        "stages": res.log.stages,
    }
    if res.mean_update is not None:
        out["mean"] = unpack(res.mean_update, {k: arrays[k].shape for k in sent_keys})
    val = []
    for node, weight, metrics in res.nodes:
        out["privacy"] += node_records({"records": metrics.pop("privacy", "[]")}, node)
        out["nodes"].append({"node_id": node, **metrics})
        out["updates"].append((None, float(weight)))
        fed.say_budget_spent(server_round, node, metrics)
        pair = val_pair(metrics)
        if pair is not None:
            val.append(pair)
        if weight > 0:
            out["losses"].append((num(metrics, "train-loss", math.nan), float(weight)))
    for reply in evals:
        if reply.has_error():
            out["errors"].append(f"node {reply.metadata.src_node_id}: {reply.error.reason}")
            continue
        pair = val_pair(metrics_of(reply))
        if pair is not None:
            val.append(pair)
    out["refused"] = 0
    for err in out["errors"]:
        node, _, reason = err.partition(": ")
        out["refused"] += fed.node_error(server_round, node.removeprefix("node "), "secagg", reason)
    fed.record_val(server_round - 1, val)
    weights = [w for _, w in out["updates"]]
    bound = (
        secagg_error_bound(weights, privacy, privacy.secagg_clipping_range)
        if sum(weights) > 0
        else None
    )
    out["privacy"].append(
        PrivacyRecord(
            mechanism="secagg+",
            noise_multiplier=None,
            clip=privacy.secagg_clipping_range,
            sample_rate=None,
            steps=None,
            epsilon=None,
            delta=None,
            round=server_round,
            extra={
                "num_shares": plan.num_shares,
                "reconstruction_threshold": plan.reconstruction_threshold,
                "neighbourhood": plan.neighbourhood,
                "threshold_shares": plan.threshold,
                "dropouts_tolerated": plan.dropouts_tolerated,
                "quantization_range": privacy.secagg_quantization_range,
                "modulus_range": privacy.secagg_modulus_range,
                "max_weight": privacy.secagg_max_weight,
                "aggregated_nodes": len(res.nodes),
                "max_quantization_error": bound,
            },
        ).to_dict()
    )
    return out


class _Proxy:
    """What the workflow needs of a ClientProxy: the node id."""

    def __init__(self, node_id: int) -> None:
        self.node_id = node_id
        self.cid = str(node_id)


class _OneRound(Strategy):
    """FitIns for the sampled nodes; capture the unmasked aggregate."""

    def __init__(self, sampled: list[int], config: dict[str, Any]) -> None:
        self.sampled = sampled
        self.config = config
        self.results: list[tuple[Any, Any]] = []
        self.failures: list[Any] = []

    def initialize_parameters(self, client_manager: Any) -> None:  # noqa: D102
        return None

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> list:  # noqa: D102
        from flwr.common import FitIns

        return [(_Proxy(n), FitIns(parameters, dict(self.config))) for n in self.sampled]

    def aggregate_fit(self, server_round: int, results: list, failures: list) -> tuple:  # noqa: D102
        self.results = list(results)
        self.failures = list(failures)
        return (results[0][1].parameters if results else None), {}

    def configure_evaluate(self, server_round: int, parameters: Any, client_manager: Any) -> list:  # noqa: D102
        return []

    def aggregate_evaluate(self, server_round: int, results: list, failures: list) -> tuple:  # noqa: D102
        return None, {}

    def evaluate(self, server_round: int, parameters: Any) -> None:  # noqa: D102
        return None
