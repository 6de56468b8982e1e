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

import json
import logging
import math
import random
import time
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedsd import metrics as prom
from fedsd.aggregation import aggregate, weighted_metric
from fedsd.checkpoint import DiskFullError, RunDir
from fedsd.config import RunConfig
from fedsd.owner_ledgers import OwnerLedgers
from fedsd.payload import FLAT, pack, unpack
from fedsd.secagg import pull_replies, send_and_receive
from fedsd.validation import Limits, Rejected, check_reply, noise_norm_allowance, non_finite

log = logging.getLogger("fedsd")
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Validate the run config, then run (or resume) the federation."""
    cfg = RunConfig.from_mapping(context.run_config)  # refused here, before round 1
    try:
        Federation(grid, cfg, context).run()
    except DiskFullError as full:
        _say(f"error: {full}")  # the run stops; the same command resumes after the last good
        raise


class BudgetSpent(RuntimeError):
    """Every node of a round has spent its DP-SGD budget: the run ends early, cleanly."""


class NonFiniteAggregate(RuntimeError):
    """A round's aggregate holds NaN or Inf: the run ends, nothing of that round is saved."""


def _say(text: str) -> None:
    """Progress lines: the runner relays ``fedsd ...`` lines to the terminal."""
    print(f"fedsd {text}", flush=True)
    log.info("fedsd %s", text)


class Federation:
    """One run of the round loop against a Flower Grid."""

    def __init__(self, grid: Grid, cfg: RunConfig, context: Context | None = None) -> None:
        self.grid = grid
        self.cfg = cfg
        self.context = context
        self.out = RunDir.open(cfg)
        self.privacy = cfg.privacy
        self.ledgers = OwnerLedgers(self.out.root)  # each data owner's last ledger figures
        for key in self.privacy.ignored_keys():
            _say(f"warning: {key} is set but privacy={self.privacy.privacy!r} does not use it")

    def initial_arrays(self) -> dict[str, np.ndarray]:
        """The seeded initial adapter (computed without loading model weights)."""
        from fedsd.model import init_lora_arrays, lora_shapes, resolve_model

        return init_lora_arrays(lora_shapes(resolve_model(self.cfg.model), self.cfg), self.cfg.seed)

    def run(self) -> None:
        """Rounds ``completed+1 .. num-server-rounds``, then the last round's evaluation."""
        cfg = self.cfg
        arrays = self.out.resume_arrays()
        start = self.out.completed_rounds + 1
        prom.record_run_start(
            self.out.run_key,
            cfg.num_server_rounds,
            cfg.round_timeout,
            prom.epsilon_budgets(self.privacy),
        )
        if arrays is None:
            arrays = self.initial_arrays()
            _say(
                f"run: {len(arrays)} LoRA tensors, {sum(a.size for a in arrays.values()):,} "
                f"parameters, variant {cfg.lora_variant}, privacy {self.privacy.privacy}, "
                f"out {self.out.root}"
            )
        else:
            _say(f"resuming after round {start - 1} from {self.out.round_dir(start - 1)}")
        for server_round in range(start, cfg.num_server_rounds + 1):
            try:
                arrays, record = self.round(server_round, arrays)
            except BudgetSpent as spent:
                _say(str(spent))
                break
            except NonFiniteAggregate as bad:
                _say(f"error: {bad}")
                raise
            self.out.save_round(server_round, arrays, record)
            prom.record_round(self.out.run_key, record)
            prom.record_checkpoint(self.out.run_key, time.time())
            eps = [float(p["epsilon"]) for p in record["privacy"] if p.get("epsilon") is not None]
            _say(
                f"round {server_round}/{cfg.num_server_rounds}: "
                f"train_loss={_fmt(record['train_loss'])} "
                f"nodes={record['nodes_replied']}/{record['nodes_sampled']} "
                f"failed={record['nodes_failed']} rejected={record['nodes_rejected']} "
                f"time={record['seconds']:.1f}s" + (f" epsilon={max(eps):.4g}" if eps else "")
            )
            for line in privacy_lines(record):
                _say(line)
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
        if "secagg" in self.privacy.components:
            result = self.secure_exchange(server_round, arrays, sampled)
        else:
            result = self.exchange(server_round, arrays, sampled, eval_of=server_round - 1)
        updates, node_metrics = result["updates"], result["nodes"]
        rejected = int(result.get("rejected", 0))
        contributing = [(u, w) for u, w in updates if w > 0]
        spent = [m for m in node_metrics if _num(m, "dp-budget-spent")]
        if updates and not contributing and len(spent) == len(updates):
            raise BudgetSpent(
                f"round {server_round}: every node that replied has spent its DP-SGD budget "
                f"(dp-target-epsilon={self.privacy.dp_target_epsilon}); training stops here, "
                f"the adapter of round {server_round - 1} is the result"
            )
        if len(updates) < min(cfg.min_nodes, len(sampled)) or (
            result.get("mean") is None and not contributing
        ):
            why = "; ".join(result.get("errors", [])[:5])
            raise RuntimeError(
                f"round {server_round}: only {len(updates)} of {len(sampled)} sampled nodes "
                f"replied with an update ({rejected} rejected; min-nodes={cfg.min_nodes}); the "
                f"global adapter is unchanged" + (f". Node errors: {why}" if why else "")
            )
        mean = result.get("mean")
        if mean is None:
            mean = aggregate(cfg.aggregation, contributing, cfg.trim_fraction)
        records = list(result.get("privacy", []))
        if "dp-central" in self.privacy.components:
            mean, central = self.central_noise(mean, len(contributing), server_round)
            records.append(central)
        new_arrays = dict(arrays)
        for k, v in mean.items():
            new_arrays[k] = (arrays[k].astype(np.float64) + v).astype(np.float32)
        bad = non_finite(new_arrays)
        if bad:
            raise NonFiniteAggregate(
                f"round {server_round}: the aggregate has non-finite values in {len(bad)} "
                f"tensor(s) (e.g. {bad[0]}); nothing of this round is saved, the run ends "
                f"and round {server_round - 1}'s adapter stays the latest"
            )
        record = {
            "round": server_round,
            "train_loss": _none_if_nan(weighted_metric(result["losses"])),
            "val_loss": None,  # filled in by the next exchange, which evaluates this aggregate
            "nodes_sampled": len(sampled),
            "nodes_replied": len(updates),
            "nodes_rejected": rejected,
            "nodes_failed": max(0, len(sampled) - len(updates) - rejected),
            "images": int(sum(_num(m, "shard-images") for m in node_metrics)),
            "bytes_sent": result["bytes_sent"],
            "bytes_received": result["bytes_received"],
            "seconds": time.perf_counter() - t0,
            "max_node_train_seconds": max(
                (_num(m, "train-seconds") for m in node_metrics), default=0
            ),
            "nodes": node_metrics,
            "privacy": records,
        }
        if result.get("stages"):
            record["secagg_stages"] = result["stages"]
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
        sent_keys = self.sent_keys(arrays)
        config = self.message_config(server_round, arrays)
        targets = [(n, "train") for n in train_nodes]
        targets += [
            (n, "evaluate") for n in sorted(self.grid.get_node_ids()) if n not in train_nodes
        ]
        replies, bytes_sent = self.send(
            targets, pack({k: arrays[k] for k in sent_keys}), config, server_round
        )
        out: dict[str, Any] = {
            "updates": [],
            "losses": [],
            "nodes": [],
            "privacy": [],
            "errors": [],
            "bytes_sent": bytes_sent,
            "bytes_received": 0,
            "rejected": 0,
        }
        shapes = {k: arrays[k].shape for k in sent_keys}
        limits = self.limits(sum(int(np.prod(s, dtype=np.int64)) for s in shapes.values()))
        val = []
        for reply in replies:
            node = reply.metadata.src_node_id
            kind = reply.metadata.message_type
            if reply.has_error():
                _say(f"round {server_round}: {kind} failed on node {node}: {reply.error.reason}")
                out["errors"].append(f"node {node}: {reply.error.reason}")
                continue
            metrics = _metrics_of(reply)
            pair = _val_pair(metrics)
            if pair is not None:
                val.append(pair)
            if kind != "train":
                continue
            flat, nbytes = _update_of(reply)
            verdict = check_reply(flat, metrics, limits)
            if isinstance(verdict, Rejected):
                self.reject(server_round, node, verdict)
                out["rejected"] += 1
                continue
            assert metrics is not None
            records = _node_records(reply.content.config_records.get("privacy", {}), node)
            backwards = self.ledgers.backwards(records)
            if backwards:  # a wiped ledger: its epsilon restarted from zero
                _say(f"round {server_round}: node {node}: update refused: {backwards}")
                out["errors"].append(f"node {node}: {backwards}")
                continue
            self.ledgers.remember(records, server_round)
            out["privacy"] += records
            out["nodes"].append({"node_id": node, **metrics})
            _say_budget_spent(server_round, node, metrics)
            out["bytes_received"] += nbytes
            out["updates"].append((unpack(verdict.update, shapes), verdict.weight))
            if verdict.weight > 0:
                out["losses"].append((_num(metrics, "train-loss", math.nan), verdict.weight))
        self.record_val(eval_of, val)
        return out

    def limits(self, length: int) -> Limits:
        """This run's bounds for one update of ``length`` values."""
        p = self.privacy
        return Limits(
            length=length,
            max_norm=self.cfg.max_update_norm + noise_norm_allowance(p, length),
            max_weight=self.cfg.max_node_weight,
            local_epochs=self.cfg.local_epochs,
            central_clip=float(p.dp_central_clip) if "dp-central" in p.components else None,
        )

    def reject(self, server_round: int, node: int, verdict: Rejected) -> None:
        """Count and announce a dropped reply."""
        prom.record_rejection(self.out.run_key, verdict.reason)
        _say(
            f"round {server_round}: rejected the update of node {node}: {verdict.reason} "
            f"({verdict.detail})"
        )

    def record_val(self, eval_of: int, val: list[tuple[float, float]]) -> None:
        """Store the validation loss of round ``eval_of``'s aggregate (0 = initial adapter)."""
        if eval_of == 0 or self.out.val_loss_pending(eval_of):
            loss = _none_if_nan(weighted_metric(val))
            self.out.set_val_loss(eval_of, loss, len(val))
            prom.record_val_loss(self.out.run_key, loss, prom.rising_rounds(self.val_losses()))
            what = "initial adapter (base model)" if eval_of == 0 else f"round {eval_of}"
            _say(f"val_loss {what}: {_fmt(loss)} ({len(val)} nodes)")

    def val_losses(self) -> list[float | None]:
        """Validation losses so far: the initial adapter's, then each round's aggregate."""
        hist = self.out.history
        losses = [hist.get("baseline_val_loss")] if "baseline_val_loss" in hist else []
        rounds = hist.get("rounds", [])
        return losses + [r.get("val_loss") for r in rounds if "eval_nodes_replied" in r]

    def secure_exchange(
        self, server_round: int, arrays: dict[str, np.ndarray], sampled: list[int]
    ) -> dict[str, Any]:
        """Like ``exchange`` for a SecAgg+ round: sampled nodes train inside Flower's
        SecAggPlusWorkflow (the server only sees the unmasked weighted mean of their
        updates); the other nodes get an evaluate message at the same time."""
        from fedsd.privacy import PrivacyRecord, check_secagg, secagg_error_bound
        from fedsd.secagg import secure_round

        if self.context is None:
            raise RuntimeError("SecAgg+ needs the ServerApp's Context")
        plan = check_secagg(len(sampled), self.privacy)  # refused here, before any message
        for warning in plan.warnings:
            _say(f"round {server_round}: secagg warning: {warning}")
        sent_keys = self.sent_keys(arrays)
        flat = pack({k: arrays[k] for k in sent_keys})
        config = self.message_config(server_round, arrays)
        others = [n for n in sorted(self.grid.get_node_ids()) if n not in sampled]
        pushed = time.monotonic()
        eval_ids, eval_bytes = (
            self.send([(n, "evaluate") for n in others], flat, config, server_round, push_only=True)
            if others
            else ([], 0)
        )
        res = secure_round(
            self.grid,
            self.context,
            server_round,
            flat,
            sampled,
            config,
            self.privacy,
            plan,
            self.cfg.round_timeout,
            _say,
        )
        # The evaluate replies had the whole secure round to arrive: wait only for what is
        # left of their own deadline, so a hung node outside the sample adds nothing to it.
        left = max(0.0, pushed + self.cfg.round_timeout - time.monotonic())
        evals = pull_replies(self.grid, eval_ids, left)
        out: dict[str, Any] = {
            "updates": [],
            "losses": [],
            "nodes": [],
            "privacy": [],
            "errors": list(res.log.errors),
            "bytes_sent": eval_bytes + res.log.bytes_sent,
            "bytes_received": res.log.bytes_received,
            "stages": res.log.stages,
        }
        shapes = {k: arrays[k].shape for k in sent_keys}
        if res.mean_update is not None:
            out["mean"] = unpack(res.mean_update, shapes)
        val = []
        for node, weight, metrics in res.nodes:
            records = _node_records({"records": metrics.pop("privacy", "[]")}, node)
            out["privacy"] += records
            out["nodes"].append({"node_id": node, **metrics})
            out["updates"].append((None, float(weight)))
            _say_budget_spent(server_round, node, metrics)
            pair = _val_pair(metrics)
            if pair is not None:
                val.append(pair)
            if weight > 0:
                out["losses"].append((_num(metrics, "train-loss", math.nan), float(weight)))
        for reply in evals:
            if reply.has_error():
                out["errors"].append(f"node {reply.metadata.src_node_id}: {reply.error.reason}")
                continue
            pair = _val_pair(_metrics_of(reply))
            if pair is not None:
                val.append(pair)
        for err in out["errors"]:
            _say(f"round {server_round}: secagg: {err}")
        self.record_val(server_round - 1, val)
        weights = [w for _, w in out["updates"]]
        bound = (
            secagg_error_bound(weights, self.privacy, self.privacy.secagg_clipping_range)
            if sum(weights) > 0
            else None
        )
        out["privacy"].append(
            PrivacyRecord(
                mechanism="secagg+",
                noise_multiplier=None,
                clip=self.privacy.secagg_clipping_range,
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
                    "quantization_range": self.privacy.secagg_quantization_range,
                    "modulus_range": self.privacy.secagg_modulus_range,
                    "max_weight": self.privacy.secagg_max_weight,
                    "aggregated_nodes": len(res.nodes),
                    "max_quantization_error": bound,
                },
            ).to_dict()
        )
        return out

    def central_noise(
        self, mean: dict[str, np.ndarray], aggregated: int, server_round: int
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Central DP: Gaussian noise on the mean of ``aggregated`` clipped updates.

        Each update is clipped to C on its node and weighs 1, so one node moves the mean by
        at most C/m (m = updates actually aggregated, not the number sampled: a dropout
        raises the sensitivity, and Flower's wrapper, which divides by the number sampled,
        would then under-noise). std = z * C / m, from OS entropy.
        """
        from fedsd.privacy import PrivacyRecord, central_dp_epsilon, noise_rng

        z = float(self.privacy.dp_central_noise_multiplier)
        clip = float(self.privacy.dp_central_clip)
        std = z * clip / max(1, aggregated)
        rng = noise_rng()
        noised = {
            k: (v.astype(np.float64) + rng.normal(0.0, std, size=v.shape)).astype(np.float32)
            for k, v in mean.items()
        }
        releases = 1 + sum(
            1
            for r in self.out.history.get("rounds", [])
            if int(r["round"]) < server_round
            and any(p.get("mechanism") == "central-gaussian" for p in r.get("privacy", []))
        )
        delta = self.privacy.dp_delta
        record = PrivacyRecord(
            mechanism="central-gaussian",
            noise_multiplier=z,
            clip=clip,
            sample_rate=1.0,
            steps=releases,
            epsilon=central_dp_epsilon(z, 1.0, releases, delta),
            delta=delta,
            round=server_round,
            extra={
                "std": std,
                "aggregated_nodes": aggregated,
                "level": "node (user-level): one node's whole update",
                "amplification": "none claimed (nodes are not Poisson-sampled)",
            },
        )
        return noised, record.to_dict()

    def sent_keys(self, arrays: dict[str, np.ndarray]) -> list[str]:
        """The tensors that travel (B only under FFA-LoRA), sorted."""
        from fedsd.model import exchanged_keys

        return exchanged_keys(list(arrays), self.cfg.lora_variant)

    def message_config(self, server_round: int, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        """``config`` of this round's messages."""
        config: dict[str, Any] = {"server-round": server_round, "run-key": self.out.run_key}
        if self.cfg.lora_variant == "ffa":
            from fedsd.model import lora_a_digest

            config["lora-a-digest"] = lora_a_digest(arrays)
        return config

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
        flat: np.ndarray,
        config: dict[str, Any],
        server_round: int,
        *,
        push_only: bool = False,
    ) -> tuple[list[Message], int]:
        """Send the same content to each (node, message type); return the replies and
        the payload bytes sent (with ``push_only``, the pushed message ids instead).

        Without ``push_only`` the messages live only as long as the round (``ttl`` =
        round-timeout): a node that was hung past the deadline starts no stale work when
        it wakes, and its late reply is refused by the SuperLink. Replies are pulled by
        message id, so a late one could never be counted in a later round anyway. Pushed
        evaluate messages of a SecAgg+ round keep Flower's default lifetime: they are
        pulled after the secure round, which may outlast one round-timeout.
        """
        record = ArrayRecord(array_dict={FLAT: Array(flat)})
        messages = [
            Message(
                content=RecordDict({"adapter": record, "config": ConfigRecord(config)}),
                message_type=message_type,
                dst_node_id=node_id,
                group_id=str(server_round),
                ttl=None if push_only else self.cfg.round_timeout,
            )
            for node_id, message_type in targets
        ]
        sent = record.count_bytes() * len(messages)
        if push_only:
            return list(self.grid.push_messages(messages)), sent
        return send_and_receive(self.grid, messages, self.cfg.round_timeout), sent


LEDGER_FIGURES = ("prior_steps", "prior_epsilon", "lifetime_steps", "lifetime_epsilon")


def _node_records(config: Any, node: int) -> list[dict[str, Any]]:
    """A node's privacy records (JSON in its reply), tagged with its node id."""
    raw = config.get("records", "[]") if config else "[]"
    try:
        records = json.loads(str(raw))
    except ValueError:
        return []
    if not isinstance(records, list):
        return []
    records = [r for r in records if _sane_record(r)]  # a node's JSON is untrusted too
    for r in records:
        r["node_id"] = node
    return records


def _sane_record(r: Any) -> bool:
    """Whether a node's privacy record has the fields the log lines and metrics read."""

    def number(x: Any) -> bool:
        return x is None or (isinstance(x, int | float) and not isinstance(x, bool))

    return (
        isinstance(r, dict)
        and isinstance(r.get("mechanism"), str)
        and r["mechanism"] != "secagg+"  # the server writes that record itself
        and all(number(r.get(k)) for k in ("epsilon", "delta", "noise_multiplier", "sample_rate"))
        and (r.get("epsilon") is None or "delta" in r)
        # the data owner's ledger figures (fedsd.owner_ledgers compares and stores them)
        and all(number(r.get(k)) for k in LEDGER_FIGURES)
        and (r.get("owner") is None or isinstance(r["owner"], str))
    )


def _num(metrics: Any, key: str, default: float = 0.0) -> float:
    """A scalar metric as float; ``default`` when absent or not a number (a list)."""
    x = metrics.get(key, default)
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else default


def _metrics_of(reply: Message) -> dict[str, Any] | None:
    """The reply's ``metrics`` record as a dict, None when it has none."""
    records = reply.content.metric_records
    return dict(records["metrics"]) if "metrics" in records else None


_UNREADABLE = object()  # an update array that could not be decoded: check_reply's bad-type


def _update_of(reply: Message) -> tuple[Any, int]:
    """(the reply's flat update or None, its bytes); ``_UNREADABLE`` if undecodable."""
    records = reply.content.array_records
    if "update" not in records or FLAT not in records["update"]:
        return None, 0
    record = records["update"]
    try:
        return record[FLAT].numpy(), record.count_bytes()
    except Exception:  # whatever bytes a node sent: it is refused, not a crash
        return _UNREADABLE, 0


def _val_pair(metrics: dict[str, Any] | None) -> tuple[float, float] | None:
    """(val-loss, val-examples) when the reply carries both as numbers."""
    if metrics is None or "val-loss" not in metrics:
        return None
    loss, n = _num(metrics, "val-loss", math.nan), _num(metrics, "val-examples", math.nan)
    return None if math.isnan(n) else (loss, n)


def _say_budget_spent(server_round: int, node: int, metrics: Any) -> None:
    if _num(metrics, "dp-budget-spent"):
        _say(
            f"round {server_round}: node {node}: DP-SGD budget spent (dp-target-epsilon "
            "reached); it no longer trains and sends no update"
        )


def privacy_lines(record: dict[str, Any]) -> list[str]:
    """One terminal line per privacy record of a round."""
    lines = []
    for p in record.get("privacy", []):
        who = f"node {p['node_id']}" if p.get("node_id") is not None else "server"
        head = f"privacy round {record['round']}: {who} {p['mechanism']}"
        if p["mechanism"] == "secagg+":
            x = p["extra"]
            lines.append(
                f"{head}: {x['aggregated_nodes']} nodes, threshold {x['threshold_shares']} of "
                f"{x['neighbourhood']}, tolerates {x['dropouts_tolerated']} dropout(s)"
            )
            continue
        if p.get("epsilon") is None:
            lines.append(f"{head}: clip {p.get('clip')}")
            continue
        parts = [f"epsilon={p['epsilon']:.4g}", f"delta={p['delta']:.3g}"]
        if p.get("noise_multiplier") is not None:
            parts.append(f"noise_multiplier={p['noise_multiplier']:.4g}")
        parts.append(f"clip={p.get('clip')}")
        if p.get("sample_rate") is not None:
            parts.append(f"sample_rate={p['sample_rate']:.4g}")
        parts.append(f"steps={p.get('steps')}")
        if p.get("lifetime_epsilon") is not None:  # everything the owner's shard spent
            parts.append(
                f"| data owner {p['owner']}: lifetime epsilon={p['lifetime_epsilon']:.4g} "
                f"steps={p['lifetime_steps']}"
            )
        lines.append(f"{head} (cumulative): " + " ".join(parts))
    return lines


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _none_if_nan(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)
