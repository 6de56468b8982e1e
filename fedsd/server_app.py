"""The ServerApp: FedAvg over LoRA tensors, weighted by images, one checkpoint per round.

The round loop is written out (rather than hidden in a strategy) because each round
must record what operators ask about: nodes sampled, replied and failed, bytes each
way, train and validation loss, seconds; and because a restarted run must resume from
its last round (``fedsd.checkpoint``).

Each round: wait for ``min-nodes`` nodes, sample ``fraction-train`` of them, send the
global adapter (B only under FFA-LoRA), average the replies weighted by images, save
``OUT/round-<n>/`` and ``OUT/latest/``, then evaluate the new aggregate on every
connected node's validation split.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedsd.aggregation import weighted_mean, weighted_metric
from fedsd.checkpoint import RunDir
from fedsd.config import RunConfig

log = logging.getLogger("fedsd")
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Validate the run config, then run (or resume) the federation."""
    cfg = RunConfig.from_mapping(context.run_config)  # refused here, before round 1
    Federation(grid, cfg).run()


def _say(text: str) -> None:
    """Progress lines: the runner relays ``fedsd ...`` lines to the terminal."""
    print(f"fedsd {text}", flush=True)
    log.info("fedsd %s", text)


class Federation:
    """One run of the round loop against a Flower Grid."""

    def __init__(self, grid: Grid, cfg: RunConfig) -> None:
        self.grid = grid
        self.cfg = cfg
        self.out = RunDir.open(cfg)

    def initial_arrays(self) -> dict[str, np.ndarray]:
        """The seeded initial adapter (computed without loading model weights)."""
        from fedsd.model import init_lora_arrays, lora_shapes, resolve_model

        return init_lora_arrays(lora_shapes(resolve_model(self.cfg.model), self.cfg), self.cfg.seed)

    def run(self) -> None:
        """Rounds ``completed+1 .. num-server-rounds``."""
        cfg = self.cfg
        arrays = self.out.resume_arrays()
        start = self.out.completed_rounds + 1
        if arrays is None:
            arrays = self.initial_arrays()
            _say(
                f"run: {len(arrays)} LoRA tensors, {sum(a.size for a in arrays.values()):,} "
                f"parameters, variant {cfg.lora_variant}, out {self.out.root}"
            )
        else:
            _say(f"resuming after round {start - 1} from {self.out.round_dir(start - 1)}")
        if start > cfg.num_server_rounds:
            _say(f"nothing to do: {start - 1} of {cfg.num_server_rounds} rounds already done")
            return
        for server_round in range(start, cfg.num_server_rounds + 1):
            arrays, record = self.round(server_round, arrays)
            self.out.save_round(server_round, arrays, record)
            _say(
                f"round {server_round}/{cfg.num_server_rounds}: "
                f"train_loss={_fmt(record['train_loss'])} val_loss={_fmt(record['val_loss'])} "
                f"nodes={record['nodes_replied']}/{record['nodes_sampled']} "
                f"failed={record['nodes_failed']} time={record['seconds']:.1f}s"
            )
        _say(f"done: adapter in {self.out.root / 'latest'}")

    # -- one round ---------------------------------------------------------------------
    def round(self, server_round: int, arrays: dict[str, np.ndarray]) -> tuple[dict, dict]:
        """Train on sampled nodes, aggregate, evaluate; return new arrays and the record."""
        from fedsd.model import exchanged_keys, lora_a_digest

        cfg = self.cfg
        t0 = time.perf_counter()
        nodes = self.wait_for_nodes()
        sampled = self.sample(nodes, server_round)
        sent_keys = exchanged_keys(list(arrays), cfg.lora_variant)
        payload = {k: arrays[k] for k in sent_keys}
        config: dict[str, Any] = {"server-round": server_round}
        if cfg.lora_variant == "ffa":
            config["lora-a-digest"] = lora_a_digest(arrays)
        replies, bytes_sent = self.send(sampled, "train", payload, config, server_round)
        updates, losses, failed, bytes_received, node_metrics = [], [], 0, 0, []
        for reply in replies:
            if reply.has_error() or "arrays" not in reply.content.array_records:
                failed += 1
                reason = reply.error.reason if reply.has_error() else "no arrays in reply"
                _say(f"round {server_round}: node {reply.metadata.src_node_id} failed: {reason}")
                continue
            record = reply.content.array_records["arrays"]
            metrics = reply.content.metric_records["metrics"]
            got = {k: record[k].numpy() for k in record.keys()}
            if sorted(got) != sorted(sent_keys):
                failed += 1
                _say(f"round {server_round}: node {reply.metadata.src_node_id} sent wrong tensors")
                continue
            bytes_received += record.count_bytes()
            weight = float(metrics["num-examples"])
            updates.append((got, weight))
            losses.append((float(metrics["train-loss"]), weight))
            node_metrics.append({"node_id": reply.metadata.src_node_id, **dict(metrics)})
        failed += len(sampled) - len(replies)
        if len(updates) < min(cfg.min_nodes, len(sampled)):
            raise RuntimeError(
                f"round {server_round}: only {len(updates)} of {len(sampled)} sampled nodes "
                f"replied (min-nodes={cfg.min_nodes}); the global adapter is unchanged"
            )
        new_arrays = dict(arrays)
        new_arrays.update(weighted_mean(updates))
        train_seconds = time.perf_counter() - t0
        val_loss, val_nodes, eval_bytes = self.evaluate(new_arrays, server_round)
        record = {
            "round": server_round,
            "train_loss": _none_if_nan(weighted_metric(losses)),
            "val_loss": _none_if_nan(val_loss),
            "nodes_sampled": len(sampled),
            "nodes_replied": len(updates),
            "nodes_failed": failed,
            "eval_nodes_replied": val_nodes,
            "images": int(sum(w for _, w in updates)),
            "bytes_sent": bytes_sent + eval_bytes,
            "bytes_received": bytes_received,
            "seconds": time.perf_counter() - t0,
            "train_phase_seconds": train_seconds,
            "max_node_train_seconds": max((m["train-seconds"] for m in node_metrics), default=0),
            "nodes": node_metrics,
        }
        return new_arrays, record

    def evaluate(self, arrays: dict[str, np.ndarray], server_round: int) -> tuple[float, int, int]:
        """Weighted validation loss of ``arrays`` over every connected node."""
        from fedsd.model import exchanged_keys, lora_a_digest

        nodes = sorted(self.grid.get_node_ids())
        payload = {k: arrays[k] for k in exchanged_keys(list(arrays), self.cfg.lora_variant)}
        config: dict[str, Any] = {"server-round": server_round}
        if self.cfg.lora_variant == "ffa":
            config["lora-a-digest"] = lora_a_digest(arrays)
        replies, sent = self.send(nodes, "evaluate", payload, config, server_round)
        values = []
        for reply in replies:
            if reply.has_error():
                _say(
                    f"round {server_round}: evaluation failed on node "
                    f"{reply.metadata.src_node_id}: {reply.error.reason}"
                )
                continue
            m = reply.content.metric_records["metrics"]
            values.append((float(m["val-loss"]), float(m["num-examples"])))
        return weighted_metric(values), len(values), sent

    # -- plumbing ----------------------------------------------------------------------
    def wait_for_nodes(self) -> list[int]:
        """Connected node ids, once at least ``min-nodes`` are there (bounded wait)."""
        deadline = time.monotonic() + self.cfg.round_timeout
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= self.cfg.min_nodes:
                return nodes
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"only {len(nodes)} node(s) connected after {self.cfg.round_timeout:.0f}s, "
                    f"min-nodes={self.cfg.min_nodes}"
                )
            time.sleep(1.0)

    def sample(self, nodes: list[int], server_round: int) -> list[int]:
        """``fraction-train`` of the nodes (at least ``min-nodes``), seeded per round."""
        k = max(self.cfg.min_nodes, math.ceil(self.cfg.fraction_train * len(nodes)))
        k = min(k, len(nodes))
        return sorted(random.Random(self.cfg.seed * 7_919 + server_round).sample(nodes, k))

    def send(
        self,
        nodes: Iterable[int],
        message_type: str,
        arrays: dict[str, np.ndarray],
        config: dict[str, Any],
        server_round: int,
    ) -> tuple[list[Message], int]:
        """Send the same content to each node; return the replies and payload bytes sent."""
        record = ArrayRecord(array_dict={k: Array(v) for k, v in arrays.items()})
        messages = []
        for node_id in nodes:
            content = RecordDict({"arrays": record, "config": ConfigRecord(config)})
            messages.append(
                Message(
                    content=content,
                    message_type=message_type,
                    dst_node_id=node_id,
                    group_id=str(server_round),
                )
            )
        sent = record.count_bytes() * len(messages)
        replies = list(self.grid.send_and_receive(messages, timeout=self.cfg.round_timeout))
        return replies, sent


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _none_if_nan(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)
