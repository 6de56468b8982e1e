"""The ServerApp: FedAvg over LoRA tensors, weighted by images, one checkpoint per round.

The round loop is written out (rather than hidden in a strategy) because each round
must record what operators ask about: nodes sampled, replied and failed, bytes each
way, train and validation loss, seconds; and because a restarted run must resume from
its last round (``fedsd.fl.checkpoint``).

Each round: wait for ``min-nodes`` nodes, sample ``fraction-train`` of them, send the
global adapter (B only under FFA-LoRA), average the replies weighted by images, save
``OUT/round-<n>/`` and ``OUT/latest/``. Every node scores the adapter it receives on its
validation split (sampled nodes before training), so round n's aggregate is evaluated
by round n+1's messages, the initial adapter by round 1's, and the last one by a final
evaluate-only message.

Elsewhere: replies are taken apart in ``fedsd.fl.replies`` and checked in
``fedsd.fl.validation``; a SecAgg+ round's exchange is ``fedsd.fl.secagg.secure_exchange``;
central DP noise is ``fedsd.privacy.central``; the round record and its line are
``fedsd.fl.history``'s.
"""

from __future__ import annotations

import logging
import math
import random
import time
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedsd.common.health import poll_until
from fedsd.config import RunConfig
from fedsd.fl.aggregation import aggregate, weighted_metric
from fedsd.fl.checkpoint import DiskFullError, RunDir
from fedsd.fl.history import RoundRecord, fmt_loss, quality_line, round_line
from fedsd.fl.payload import ADAPTER, pack, to_bytes, unpack
from fedsd.fl.replies import metrics_of, node_records, num, update_of, val_pair
from fedsd.fl.secagg import secure_exchange, send_and_receive
from fedsd.fl.validation import (
    Limits,
    Rejected,
    check_reply,
    node_refusal,
    noise_norm_allowance,
    non_finite,
)
from fedsd.observability import metrics as prom
from fedsd.privacy import central_noise
from fedsd.privacy.owner_ledgers import OwnerLedgers
from fedsd.privacy.report import privacy_lines
from fedsd.quality import MESSAGE_TYPE as QUALITY_MESSAGE

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


class TooFewUpdates(RuntimeError):
    """Fewer than ``min-nodes`` sampled nodes sent an update that passed validation (all
    rejected, failed or refused): the run ends, nothing of that round is saved."""


def _say(text: str) -> None:
    """Progress lines: the runner relays ``fedsd ...`` lines to the terminal."""
    print(f"fedsd {text}", flush=True)
    log.info("fedsd %s", text)


class Federation:
    """One run of the round loop against a Flower Grid."""

    say = staticmethod(_say)  # for the exchange written outside (fedsd.fl.secagg)

    def __init__(self, grid: Grid, cfg: RunConfig, context: Context | None = None) -> None:
        self.grid = grid
        self.cfg = cfg
        self.context = context
        self.out = RunDir.open(cfg)
        self.privacy = cfg.privacy
        # each data owner's last ledger figures, saved as guardedly as a checkpoint
        self.ledgers = OwnerLedgers(self.out.root, guard=self.out.guard)
        for key in self.privacy.ignored_keys():
            _say(f"warning: {key} is set but privacy={self.privacy.privacy!r} does not use it")

    def initial_arrays(self) -> dict[str, np.ndarray]:
        """The seeded initial adapter (computed without loading model weights)."""
        from fedsd.ml.model import init_lora_arrays, lora_shapes, resolve_model

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
        self.score_quality(start - 1, arrays)  # the base model, or a resumed round unscored
        for server_round in range(start, cfg.num_server_rounds + 1):
            try:
                arrays, record = self.round(server_round, arrays)
            except BudgetSpent as spent:
                _say(str(spent))
                break
            except (NonFiniteAggregate, TooFewUpdates) as bad:
                _say(f"error: {bad}")
                raise
            self.out.save_round(server_round, arrays, record)
            prom.record_round(self.out.run_key, record)
            prom.record_checkpoint(self.out.run_key, time.time())
            # printed after save_round: whoever reads the line finds the round in history.json
            _say(round_line(record, cfg.num_server_rounds))
            for line in privacy_lines(record):
                _say(line)
            self.score_quality(server_round, arrays)
        last = self.out.completed_rounds
        if last and self.cfg.quality.enabled:  # a run ended early (DP budget): its result
            self.score_quality(last, arrays, due=True)
        if last and self.out.val_loss_pending(last):
            self.exchange(last + 1, arrays, train_nodes=[], eval_of=last)
        if start > cfg.num_server_rounds:
            _say(f"nothing to train: {last} of {cfg.num_server_rounds} rounds already done")
        _say(f"done: adapter in {self.out.root / 'latest'}")

    # -- one round ---------------------------------------------------------------------
    def round(
        self, server_round: int, arrays: dict[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], RoundRecord]:
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
            result = secure_exchange(self, server_round, arrays, sampled)
        else:
            result = self.exchange(server_round, arrays, sampled, eval_of=server_round - 1)
        updates, node_metrics = result["updates"], result["nodes"]
        rejected = int(result.get("rejected", 0))
        contributing = [(u, w) for u, w in updates if w > 0]
        spent = [m for m in node_metrics if num(m, "dp-budget-spent")]
        if updates and not contributing and len(spent) == len(updates):
            raise BudgetSpent(
                f"round {server_round}: every node that replied has spent its DP-SGD budget "
                f"(dp-target-epsilon={self.privacy.dp_target_epsilon}); training stops here, "
                f"the adapter of round {server_round - 1} is the result"
            )
        if len(updates) < min(cfg.min_nodes, len(sampled)) or (
            result.get("mean") is None and not contributing
        ):
            raise TooFewUpdates(self.too_few(server_round, len(sampled), result))
        mean = result.get("mean")
        if mean is None:
            mean = aggregate(cfg.aggregation, contributing, cfg.trim_fraction)
        records = list(result.get("privacy", []))
        if "dp-central" in self.privacy.components:
            mean, central = central_noise(
                mean, len(contributing), server_round, self.privacy, self.out.history["rounds"]
            )
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
        record: RoundRecord = {
            "round": server_round,
            "train_loss": _none_if_nan(weighted_metric(result["losses"])),
            "val_loss": None,  # filled in by the next exchange, which evaluates this aggregate
            "nodes_sampled": len(sampled),
            "nodes_replied": len(updates),
            "nodes_rejected": rejected,
            "nodes_failed": max(0, len(sampled) - len(updates) - rejected),
            "images": int(sum(num(m, "shard-images") for m in node_metrics)),
            "bytes_sent": result["bytes_sent"],
            "bytes_received": result["bytes_received"],
            "seconds": time.perf_counter() - t0,
            "max_node_train_seconds": max(
                (num(m, "train-seconds") for m in node_metrics), default=0
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
            "refused": 0,  # nodes that refused the run (app pinning, privacy policy)
            "rejections": [],  # the reason of each rejected reply
        }
        shapes = {k: arrays[k].shape for k in sent_keys}
        limits = self.limits(sum(int(np.prod(s, dtype=np.int64)) for s in shapes.values()))
        val = []
        for reply in replies:
            node = reply.metadata.src_node_id
            kind = reply.metadata.message_type
            if reply.has_error():
                out["refused"] += self.node_error(server_round, node, kind, reply.error.reason)
                out["errors"].append(f"node {node}: {reply.error.reason}")
                continue
            metrics = metrics_of(reply)
            pair = val_pair(metrics)
            if pair is not None:
                val.append(pair)
            if kind != "train":
                continue
            flat, nbytes = update_of(reply)
            verdict = check_reply(flat, metrics, limits)
            if isinstance(verdict, Rejected):
                self.reject(server_round, node, verdict)
                out["rejected"] += 1
                out["rejections"].append(verdict.reason)
                continue
            assert metrics is not None
            records = node_records(reply.content.config_records.get("privacy", {}), node)
            backwards = self.ledgers.backwards(records)
            if backwards:  # a wiped ledger: its epsilon restarted from zero
                _say(f"round {server_round}: node {node}: update refused: {backwards}")
                out["errors"].append(f"node {node}: {backwards}")
                continue
            self.ledgers.remember(records, server_round)
            out["privacy"] += records
            out["nodes"].append({"node_id": node, **metrics})
            self.say_budget_spent(server_round, node, metrics)
            out["bytes_received"] += nbytes
            out["updates"].append((unpack(verdict.update, shapes), verdict.weight))
            if verdict.weight > 0:
                out["losses"].append((num(metrics, "train-loss", math.nan), verdict.weight))
        self.record_val(eval_of, val)
        return out

    def score_quality(
        self, evaluated: int, arrays: dict[str, np.ndarray], *, due: bool = False
    ) -> None:
        """FID, KID and CLIP score of round ``evaluated``'s aggregate (0 = base model), when
        ``eval-every`` asks (or ``due``) and history.json lacks them: every connected node
        scores it on its held-out images and sends statistics (``fedsd.quality``), pooled
        here."""
        from fedsd.quality.pooled import pool, stats_from_reply

        due = due or self.cfg.quality.due(evaluated, self.cfg.num_server_rounds)
        if not (due and self.out.quality_pending(evaluated)):
            return
        t0 = time.perf_counter()
        nodes = self.wait_for_nodes()
        config = self.message_config(evaluated + 1, arrays)
        flat = pack({k: arrays[k] for k in self.sent_keys(arrays)})
        replies, _ = self.send([(n, QUALITY_MESSAGE) for n in nodes], flat, config, evaluated + 1)
        stats, refused, failed, rejected = [], 0, len(nodes) - len(replies), 0
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                if self.node_error(evaluated + 1, node, "quality", reply.error.reason):
                    refused += 1
                else:
                    failed += 1
                continue
            checked = stats_from_reply(node, reply.content)
            if isinstance(checked, str):
                _say(f"quality: dropped the statistics of node {node}: {checked}")
                rejected += 1
                continue
            stats.append(checked)
        figures, others = pool(stats)
        for other in others:
            _say(f"quality: dropped node {other.node}: extractor {other.extractors!r} differs")
        record = {
            **figures,
            "nodes_refused": refused,
            "nodes_failed": failed,
            "nodes_rejected": rejected + len(others),
            "seconds": time.perf_counter() - t0,
        }
        self.out.set_quality(evaluated, record)
        prom.record_quality(self.out.run_key, evaluated, record)
        _say(quality_line(evaluated, record))

    def too_few(self, server_round: int, sampled: int, result: dict[str, Any]) -> str:
        """Why round ``server_round`` cannot be aggregated, and what happens now."""
        reasons: list[str] = result.get("rejections", [])
        tally = ", ".join(f"{r} x{reasons.count(r)}" for r in sorted(set(reasons)))
        usable, refused = len(result["updates"]), int(result.get("refused", 0))
        failed = max(0, sampled - usable - len(reasons) - refused)
        kept = (
            f"{self.out.root / 'latest'} keeps round {server_round - 1}'s adapter"
            if server_round > 1
            else "no round has been saved"
        )
        text = (
            f"round {server_round}: only {usable} of {sampled} sampled nodes sent an update "
            f"that passed validation (min-nodes={self.cfg.min_nodes}; rejected: "
            f"{tally or 'none'}; {refused} refused the run; {failed} failed); the run stops "
            f"without saving "
            f"round {server_round} ({kept})"
        )
        if "non-finite" in reasons:
            text += (
                "; non-finite updates mean local training diverged: lower learning-rate "
                f"(now {self.cfg.learning_rate:g})"
            )
        if "norm-bound" in reasons:
            text += (
                "; updates over max-update-norm mean local training diverged, or the bound "
                f"(now {self.cfg.max_update_norm:g}) is below honest updates"
            )
        errors = result.get("errors", [])
        return text + (f". Node errors: {'; '.join(errors[:5])}" if errors else "")

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

    def node_error(self, server_round: int, node: int | str, kind: str, reason: str) -> bool:
        """Count and announce an error reply: a node refusing the run (it does not run this
        app, or the run breaks its privacy policy), or a failure. True for a refusal."""
        refusal = node_refusal(reason)
        if refusal is None:
            _say(f"round {server_round}: {kind} failed on node {node}: {reason}")
            return False
        prom.record_node_refusal(self.out.run_key, refusal)
        _say(f"round {server_round}: node {node} refused the run ({refusal}): {reason}")
        return True

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
            _say(f"val_loss {what}: {fmt_loss(loss)} ({len(val)} nodes)")

    def say_budget_spent(self, server_round: int, node: int, metrics: Any) -> None:
        """Announce a node that has spent its DP-SGD budget (it sent no update)."""
        if num(metrics, "dp-budget-spent"):
            _say(
                f"round {server_round}: node {node}: DP-SGD budget spent (dp-target-epsilon "
                "reached); it no longer trains and sends no update"
            )

    def val_losses(self) -> list[float | None]:
        """Validation losses so far: the initial adapter's, then each round's aggregate."""
        hist = self.out.history
        losses = [hist.get("baseline_val_loss")] if "baseline_val_loss" in hist else []
        rounds = hist.get("rounds", [])
        return losses + [r.get("val_loss") for r in rounds if "eval_nodes_replied" in r]

    def sent_keys(self, arrays: dict[str, np.ndarray]) -> list[str]:
        """The tensors that travel (B only under FFA-LoRA), sorted."""
        from fedsd.ml.model import exchanged_keys

        return exchanged_keys(list(arrays), self.cfg.lora_variant)

    def message_config(self, server_round: int, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        """``config`` of this round's messages."""
        config: dict[str, Any] = {"server-round": server_round, "run-key": self.out.run_key}
        if self.cfg.lora_variant == "ffa":
            from fedsd.ml.model import lora_a_digest

            config["lora-a-digest"] = lora_a_digest(arrays)
        return config

    # -- plumbing ----------------------------------------------------------------------
    def wait_for_nodes(self) -> list[int]:
        """Connected node ids, once at least ``min-nodes`` are there (bounded wait)."""
        seen: list[int] = []

        def enough() -> list[int] | None:
            seen[:] = sorted(self.grid.get_node_ids())
            return list(seen) if len(seen) >= self.cfg.min_nodes else None

        nodes = poll_until(enough, self.cfg.round_timeout, 1.0)
        if nodes is None:
            raise TimeoutError(
                f"only {len(seen)} node(s) connected after {self.cfg.round_timeout:.0f}s, "
                f"min-nodes={self.cfg.min_nodes}"
            )
        return nodes

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
        adapter = to_bytes(np.asarray(flat, dtype=np.float32))
        messages = [
            Message(
                content=RecordDict({"config": ConfigRecord({**config, ADAPTER: adapter})}),
                message_type=message_type,
                dst_node_id=node_id,
                group_id=str(server_round),
                ttl=None if push_only else self.cfg.round_timeout,
            )
            for node_id, message_type in targets
        ]
        sent = len(adapter) * len(messages)
        if push_only:
            return list(self.grid.push_messages(messages)), sent
        return send_and_receive(self.grid, messages, self.cfg.round_timeout), sent


def _none_if_nan(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)
