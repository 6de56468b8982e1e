"""The ServerApp: FedAvg over LoRA tensors, weighted by images, one checkpoint per round.

The round loop is written out (rather than hidden in a strategy) because each round
must record what operators ask about: nodes sampled, replied and failed, bytes each
way, train and validation loss, seconds; and because a restarted run must resume from
its last round (``fedsd.checkpoint``).

Each round: wait for ``min-nodes`` nodes, sample ``fraction-train`` of them, send the
global adapter (B only under FFA-LoRA), average the replies weighted by images, save
``OUT/round-<n>/`` and ``OUT/latest/``. Every node scores the adapter it receives on its
validation split (sampled nodes before training), so round n's aggregate is evaluated
by round n+1's messages, the initial adapter by round 1's, and the last one by a final
evaluate-only message.
"""

from __future__ import annotations

import logging
import math
import random
import time
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
        """Rounds ``completed+1 .. num-server-rounds``, then the last round's evaluation."""
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
        for server_round in range(start, cfg.num_server_rounds + 1):
            arrays, record = self.round(server_round, arrays)
            self.out.save_round(server_round, arrays, record)
            _say(
                f"round {server_round}/{cfg.num_server_rounds}: "
                f"train_loss={_fmt(record['train_loss'])} "
                f"nodes={record['nodes_replied']}/{record['nodes_sampled']} "
                f"failed={record['nodes_failed']} time={record['seconds']:.1f}s"
            )
        last = self.out.completed_rounds
        if last and self.out.val_loss_pending(last):
            self.exchange(last + 1, arrays, train_nodes=[], eval_of=last)
        if start > cfg.num_server_rounds:
            _say(f"nothing to train: {last} of {cfg.num_server_rounds} rounds already done")
        _say(f"done: adapter in {self.out.root / 'latest'}")

    # -- one round ---------------------------------------------------------------------
    def round(self, server_round: int, arrays: dict[str, np.ndarray]) -> tuple[dict, dict]:
        """Train on sampled nodes and aggregate; return the new arrays and the round record.

        The same messages also evaluate ``arrays`` (the previous round's aggregate, or the
        initial adapter, i.e. the base model, in round 1): sampled nodes score it before
        training, the others get an evaluate-only message. One ClientApp start per node
        and round instead of two.
        """
        cfg = self.cfg
        t0 = time.perf_counter()
        nodes = self.wait_for_nodes()
        sampled = self.sample(nodes, server_round)
        result = self.exchange(server_round, arrays, sampled, eval_of=server_round - 1)
        updates, losses, node_metrics = result["updates"], result["losses"], result["nodes"]
        if len(updates) < min(cfg.min_nodes, len(sampled)):
            raise RuntimeError(
                f"round {server_round}: only {len(updates)} of {len(sampled)} sampled nodes "
                f"replied (min-nodes={cfg.min_nodes}); the global adapter is unchanged"
            )
        new_arrays = dict(arrays)
        new_arrays.update(weighted_mean(updates))
        record = {
            "round": server_round,
            "train_loss": _none_if_nan(weighted_metric(losses)),
            "val_loss": None,  # filled in by the next exchange, which evaluates this aggregate
            "nodes_sampled": len(sampled),
            "nodes_replied": len(updates),
            "nodes_failed": len(sampled) - len(updates),
            "images": int(sum(w for _, w in updates)),
            "bytes_sent": result["bytes_sent"],
            "bytes_received": result["bytes_received"],
            "seconds": time.perf_counter() - t0,
            "max_node_train_seconds": max((m["train-seconds"] for m in node_metrics), default=0),
            "nodes": node_metrics,
        }
        return new_arrays, record

    def exchange(
        self,
        server_round: int,
        arrays: dict[str, np.ndarray],
        train_nodes: list[int],
        eval_of: int,
    ) -> dict[str, Any]:
        """Send ``arrays`` to every connected node: ``train`` to ``train_nodes``,
        ``evaluate`` to the rest. Record the validation loss of ``arrays`` as round
        ``eval_of``'s (0 = the initial adapter) and return the training replies.
        """
        from fedsd.model import exchanged_keys, lora_a_digest

        sent_keys = exchanged_keys(list(arrays), self.cfg.lora_variant)
        config: dict[str, Any] = {"server-round": server_round}
        if self.cfg.lora_variant == "ffa":
            config["lora-a-digest"] = lora_a_digest(arrays)
        targets = [(n, "train") for n in train_nodes]
        targets += [
            (n, "evaluate") for n in sorted(self.grid.get_node_ids()) if n not in train_nodes
        ]
        replies, bytes_sent = self.send(
            targets, {k: arrays[k] for k in sent_keys}, config, server_round
        )
        out: dict[str, Any] = {
            "updates": [],
            "losses": [],
            "nodes": [],
            "bytes_sent": bytes_sent,
            "bytes_received": 0,
        }
        val = []
        for reply in replies:
            node = reply.metadata.src_node_id
            kind = reply.metadata.message_type
            if reply.has_error():
                _say(f"round {server_round}: {kind} failed on node {node}: {reply.error.reason}")
                continue
            metrics = reply.content.metric_records["metrics"]
            if "val-loss" in metrics:
                val.append((float(metrics["val-loss"]), float(metrics["val-examples"])))
            if kind != "train":
                continue
            record = reply.content.array_records.get("arrays")
            got = {k: record[k].numpy() for k in record.keys()} if record is not None else {}
            if sorted(got) != sorted(sent_keys):
                _say(f"round {server_round}: node {node} sent wrong tensors; ignored")
                continue
            out["bytes_received"] += record.count_bytes()
            weight = float(metrics["num-examples"])
            out["updates"].append((got, weight))
            out["losses"].append((float(metrics["train-loss"]), weight))
            out["nodes"].append({"node_id": node, **dict(metrics)})
        if eval_of == 0 or self.out.val_loss_pending(eval_of):
            loss = _none_if_nan(weighted_metric(val))
            self.out.set_val_loss(eval_of, loss, len(val))
            what = "initial adapter (base model)" if eval_of == 0 else f"round {eval_of}"
            _say(f"val_loss {what}: {_fmt(loss)} ({len(val)} nodes)")
        return out

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
        targets: list[tuple[int, str]],
        arrays: dict[str, np.ndarray],
        config: dict[str, Any],
        server_round: int,
    ) -> tuple[list[Message], int]:
        """Send the same content to each (node, message type); return the replies and
        the payload bytes sent."""
        record = ArrayRecord(array_dict={k: Array(v) for k, v in arrays.items()})
        messages = [
            Message(
                content=RecordDict({"arrays": record, "config": ConfigRecord(config)}),
                message_type=message_type,
                dst_node_id=node_id,
                group_id=str(server_round),
            )
            for node_id, message_type in targets
        ]
        sent = record.count_bytes() * len(messages)
        replies = list(self.grid.send_and_receive(messages, timeout=self.cfg.round_timeout))
        return replies, sent


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _none_if_nan(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)
