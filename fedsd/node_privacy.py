"""What a node does for privacy in one train message: plan DP-SGD, release the update.

Order on a node: (1) DP-SGD while training (``dp-sample``), whose noise multiplier is
planned for the whole run and whose accountant lives on the node's disk; (2) the update
(trained adapter minus the global adapter it started from) is clipped, and noised under
``dp-output`` or only clipped under ``dp-central`` (the server adds the noise); (3) under
``secagg`` the released update must fit SecAgg+'s clipping range, or the node refuses to
send it rather than let SecAgg+ clip it silently.

The ledgers live in ``<cache-dir>/privacy/<run-key>/node-<id>/``: the run key comes from the
server's ``history.json``, so a resumed run keeps accumulating while a new run starts
from zero. Nothing sent to the server reveals the update's norm.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedsd.atomic import write_file
from fedsd.config import RunConfig
from fedsd.privacy import (
    NodeAccountant,
    OutputLedger,
    PrivacyRecord,
    check_secagg_values,
    check_secagg_weight,
    clip_update,
    noise_multiplier_for,
    noise_rng,
    planned_steps,
    privatize_update,
    sample_rate_for,
)


@dataclass(frozen=True)
class DpSgdPlan:
    """This round's DP-SGD settings, or why the node does not train."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int  # this round's steps (local epochs x batches per epoch)
    budget_spent: bool
    epsilon_so_far: float


class NodePrivacy:
    """One node's privacy state for one run."""

    def __init__(self, cfg: RunConfig, cache_dir: Path, run_key: str, node_id: int) -> None:
        """Ledgers under ``cache_dir/privacy/<run_key>/node-<node_id>`` (a cache directory
        may be shared by several nodes)."""
        if not run_key or "/" in run_key or run_key.startswith("."):
            raise ValueError(f"invalid run key {run_key!r} from the server")
        self.cfg = cfg
        self.p = cfg.privacy
        self.dir = Path(cache_dir) / "privacy" / run_key / f"node-{int(node_id)}"

    @property
    def components(self) -> frozenset[str]:
        """The run's privacy components."""
        return self.p.components

    # -- DP-SGD -------------------------------------------------------------------------
    def plan_dp_sgd(self, num_images: int) -> DpSgdPlan | None:
        """The DP-SGD plan for this round (None without ``dp-sample``).

        The noise multiplier is either given, or the smallest that keeps the whole planned
        run (every round, every local step, assuming the node joins every round) within
        ``dp-target-epsilon``; with a target, a node that would exceed it stops training.
        """
        if "dp-sample" not in self.components:
            return None
        p, cfg = self.p, self.cfg
        q = sample_rate_for(num_images, cfg.batch_size)
        per_round = planned_steps(1, cfg.local_epochs, num_images, cfg.batch_size)
        if p.dp_noise_multiplier > 0:
            sigma = p.dp_noise_multiplier
        else:
            total = planned_steps(
                cfg.num_server_rounds, cfg.local_epochs, num_images, cfg.batch_size
            )
            sigma = self._planned_sigma(p.dp_target_epsilon, p.dp_delta, q, total)
        acc = self.accountant()
        spent = p.dp_target_epsilon > 0 and acc.budget_spent(
            p.dp_target_epsilon, p.dp_delta, per_round, sigma, q
        )
        return DpSgdPlan(sigma, p.dp_max_grad_norm, q, per_round, spent, acc.epsilon(p.dp_delta))

    def _planned_sigma(self, target: float, delta: float, q: float, total: int) -> float:
        """``noise_multiplier_for``, remembered per run: Opacus' search takes seconds, and
        the plan is the same every round."""
        path = self.dir / "noise-multiplier.json"
        key = f"{target!r}|{delta!r}|{q!r}|{total}"
        try:
            cached = json.loads(path.read_text())
            if cached.get("key") == key:
                return float(cached["noise_multiplier"])
        except (OSError, ValueError, KeyError, AttributeError):
            pass
        sigma = noise_multiplier_for(target, delta, q, total)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file(path, json.dumps({"key": key, "noise_multiplier": sigma}))
        return sigma

    def accountant(self) -> NodeAccountant:
        """The node's cumulative DP-SGD accountant for this run."""
        return NodeAccountant(self.dir / "dp-sgd.json")

    def dp_sgd_record(
        self, plan: DpSgdPlan, history: list[tuple[float, float, int]]
    ) -> PrivacyRecord:
        """Add this round's Opacus history to the accountant; the cumulative record."""
        acc = self.accountant()
        if history:
            acc.extend(history)
        return PrivacyRecord(
            mechanism="dp-sgd",
            noise_multiplier=plan.noise_multiplier,
            clip=plan.max_grad_norm,
            sample_rate=plan.sample_rate,
            steps=acc.steps,
            epsilon=acc.epsilon(self.p.dp_delta),
            delta=self.p.dp_delta,
            extra={
                "accountant": "rdp (opacus)",
                "grad_sample_mode": self.p.dp_grad_sample_mode,
                "target_epsilon": self.p.dp_target_epsilon or None,
                "budget_spent": plan.budget_spent,
                "steps_this_round": sum(s for _, _, s in history),
            },
        )

    # -- the update -----------------------------------------------------------------------
    def release(
        self, update: Mapping[str, np.ndarray], server_round: int
    ) -> tuple[dict[str, np.ndarray], list[PrivacyRecord]]:
        """Clip/noise the update as the mode says; refuse what SecAgg+ would clip."""
        comps, p = self.components, self.p
        out = {k: np.asarray(v, dtype=np.float32) for k, v in update.items()}
        records: list[PrivacyRecord] = []
        if "dp-output" in comps:
            out, report = privatize_update(
                out,
                p.dp_output_mechanism,
                float(p.dp_output_clip),
                float(p.dp_output_epsilon),
                p.dp_output_delta,
                noise_rng(),
            )
            ledger = OutputLedger(self.dir / "output.json")
            ledger.record(server_round, report)
            budget = ledger.composed()
            records.append(
                PrivacyRecord(
                    mechanism=f"output-{report.mechanism}",
                    noise_multiplier=report.noise_multiplier,
                    clip=report.clip,
                    sample_rate=1.0,
                    steps=budget.rounds,
                    epsilon=budget.epsilon,
                    delta=budget.delta,
                    extra={
                        "norm": report.norm,
                        "sigma": report.sigma,
                        "scale": report.scale,
                        "per_round_epsilon": report.epsilon,
                        "per_round_delta": report.delta,
                        "composition": budget.method,
                        "basic_epsilon": budget.basic_epsilon,
                        "rdp_epsilon": budget.rdp_epsilon,
                    },
                )
            )
        if "dp-central" in comps:
            out, _ = clip_update(out, float(p.dp_central_clip), "l2")
            records.append(
                PrivacyRecord(
                    mechanism="central-clip",
                    noise_multiplier=None,
                    clip=p.dp_central_clip,
                    sample_rate=None,
                    steps=None,
                    epsilon=None,
                    delta=None,
                    extra={"note": "update clipped on the node; the server adds the noise"},
                )
            )
        if "secagg" in comps:
            check_secagg_values(out, p)
        return out, records

    def weight(self, images: int, shard_images: int) -> int:
        """FedAvg weight of this node's update.

        dp-central: 1 (unweighted mean, so one node moves the mean by at most clip / n);
        dp-sample: the train split's size (not the random Poisson count). Otherwise the
        images trained on. Under SecAgg+ it must not exceed ``secagg-max-weight``.
        """
        comps = self.components
        if "dp-central" in comps:
            w = 1
        elif "dp-sample" in comps:
            w = shard_images
        else:
            w = images
        if "secagg" in comps:
            check_secagg_weight(w, self.p)
        return int(w)


def records_json(records: list[PrivacyRecord]) -> str:
    """Records as one JSON string (ConfigRecord values are scalars)."""
    return json.dumps([r.to_dict() for r in records], default=_finite)


def _finite(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(type(x))
