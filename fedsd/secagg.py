"""One SecAgg+ round on the server: Flower's ``SecAggPlusWorkflow``, driven per round.

The workflow is written for Flower's legacy strategies: it asks ``strategy.configure_fit``
for the FitIns of each sampled node, runs the four stages (setup, share keys, collect
masked vectors, unmask) and hands ``strategy.aggregate_fit`` only the unmasked weighted
average, with each node's FitRes metrics. ``_OneRound`` is the smallest strategy that
feeds it fedsd's sampled nodes and global adapter and captures that result; the round
loop, checkpoints and history stay in ``fedsd.server_app``.

The grid given to the workflow is wrapped so every stage is announced on the terminal
(``fedsd round N: secagg <stage> ...``), its bytes are counted, node errors are kept for
the round's message, and replies are polled twice a second instead of every 3 s.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message
from flwr.server.strategy import Strategy
from flwr.serverapp import Grid

from fedsd.privacy import PrivacyConfig, SecAggPlan

STAGE_NAMES = {
    "setup": "setup",
    "share_keys": "share-keys",
    "collect_masked_vectors": "collect-masked-vectors",
    "unmask": "unmask",
}


def send_and_receive(
    grid: Grid, messages: Iterable[Message], timeout: float | None, poll: float = 0.5
) -> list[Message]:
    """``Grid.send_and_receive`` with a shorter poll interval (Flower's HTTP grid sleeps
    3 s between pulls, which is most of a short round)."""
    return pull_replies(grid, list(grid.push_messages(messages)), timeout, poll)


def pull_replies(
    grid: Grid, ids: list[str], timeout: float | None, poll: float = 0.5
) -> list[Message]:
    """Replies to already pushed messages ``ids``, until all are in or ``timeout``."""
    pending = set(ids)
    end = None if timeout is None else time.monotonic() + timeout
    out: list[Message] = []
    while pending:
        got = list(grid.pull_messages(pending))
        out.extend(got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        if not pending or (end is not None and time.monotonic() >= end):
            break
        time.sleep(poll)
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
        t0 = time.perf_counter()
        self._say(f"round {self._round}: secagg {stage}: sent to {len(messages)} nodes")
        self.log.bytes_sent += sum(_nbytes(m) for m in messages)
        replies = send_and_receive(self._grid, messages, timeout)
        for r in replies:
            if r.has_error():
                self.log.errors.append(f"node {r.metadata.src_node_id}: {r.error.reason}")
            else:
                self.log.bytes_received += _nbytes(r)
        ok = sum(not r.has_error() for r in replies)
        self.log.stages.append(
            {"stage": stage, "sent": len(messages), "ok": ok, "seconds": time.perf_counter() - t0}
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
    from flwr.server.workflow import SecAggPlusWorkflow

    strategy = _OneRound(sampled, config)
    legacy = LegacyContext(context, strategy=strategy)
    params: Parameters = ndarrays_to_parameters([flat_adapter])
    legacy.state.array_records["parameters"] = parameters_to_arrayrecord(params, True)
    legacy.state.config_records["config"] = ConfigRecord({"current_round": server_round})
    workflow = SecAggPlusWorkflow(
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
    return SecureResult(mean_update=mean, nodes=nodes, log=wrapped.log)


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
