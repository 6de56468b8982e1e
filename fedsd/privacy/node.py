"""What a node does for privacy in one train message: plan DP-SGD, release the update.

Order on a node: (1) DP-SGD while training (``dp-sample``), whose noise multiplier is
planned for the whole run and whose accountant lives on the node's disk; (2) the update
(trained adapter minus the global adapter it started from) is clipped, and noised under
``dp-output`` or only clipped under ``dp-central`` (the server adds the noise); (3) under
``secagg`` the released update must fit SecAgg+'s clipping range, or the node refuses to
send it rather than let SecAgg+ clip it silently.

The ledgers belong to the data, not to the node or the run: DP protects the images of a
shard, so what matters is everything those images were ever trained on. They live in
``<cache-dir>/privacy/owner-<owner>/runs/<run-key>/`` (``dp-sgd.json``, ``output.json``),
where ``owner`` is :func:`data_owner_id` of the shard: a digest of its train split's
``metadata.jsonl`` (which images, with which prompts). The node's key and Flower's node
id do not enter: a re-enrolled node, a lost SuperLink state (new node ids), a container
restart or a new run on the same shard all find the same ledger, and two nodes serving
the same shard share (and add up) one ledger. A run's share is its own directory (the
run key comes from the server's ``history.json``, so a resumed run keeps adding to it);
the lifetime figures compose every run's directory. Adding or removing images changes
the owner id, i.e. starts a new ledger: keep the old shard's ledger in mind (or keep
the shard). Nothing sent to the server reveals the update's norm.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedsd.common.atomic import write_file
from fedsd.config import RunConfig
from fedsd.privacy import (
    NodeAccountant,
    OutputLedger,
    PrivacyRecord,
    check_secagg_values,
    check_secagg_weight,
    clip_update,
    compose_releases,
    history_epsilon,
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


def data_owner_id(shard_dir: str | Path) -> str:
    """The data owner's ledger key: 16 hex digits of SHA-256 over the shard's
    ``train/metadata.jsonl``.

    Content only (no file times, unlike the latent cache's ``split_fingerprint``), so a
    copied or restored shard keeps its ledger; read without decoding any image.
    """
    raw = (Path(shard_dir) / "train" / "metadata.jsonl").read_bytes()
    return hashlib.sha256(b"fedsd-data-owner/1\0" + raw).hexdigest()[:16]


class NodePrivacy:
    """One data owner's privacy state, seen from one run."""

    def __init__(self, cfg: RunConfig, cache_dir: Path, run_key: str, owner: str | int) -> None:
        """Ledgers under ``cache_dir/privacy/owner-<owner>/runs/<run_key>``."""
        owner = str(owner)
        for what, name in (("run key", run_key), ("data owner id", owner)):
            if not name or "/" in name or name.startswith("."):
                raise ValueError(f"invalid {what} {name!r}")
        self.cfg = cfg
        self.p = cfg.privacy
        self.owner = owner
        self.root = Path(cache_dir) / "privacy" / f"owner-{owner}"
        self.dir = self.root / "runs" / run_key

    def _run_dirs(self) -> list[Path]:
        runs = self.root / "runs"
        return sorted(d for d in runs.iterdir() if d.is_dir()) if runs.is_dir() else []

    def lifetime_dp_sgd(self) -> list[tuple[float, float, int]]:
        """Every run's DP-SGD history on this shard (Opacus ``RDPAccountant.history`` shape)."""
        return [h for d in self._run_dirs() for h in NodeAccountant(d / "dp-sgd.json").history]

    def lifetime_releases(self) -> list[dict[str, Any]]:
        """Every run's output-DP releases of this shard."""
        return [r for d in self._run_dirs() for r in OutputLedger(d / "output.json").releases]

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
        """This run's share of the shard's DP-SGD accountant (cumulative over its rounds)."""
        return NodeAccountant(self.dir / "dp-sgd.json")

    def dp_sgd_record(
        self, plan: DpSgdPlan, history: list[tuple[float, float, int]]
    ) -> PrivacyRecord:
        """Add this round's Opacus history to the accountant; the cumulative record."""
        acc = self.accountant()
        prior = self.lifetime_dp_sgd()
        if history:
            acc.extend(history)
        lifetime = self.lifetime_dp_sgd()
        delta = self.p.dp_delta
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
            owner=self.owner,
            lifetime_steps=sum(st for _, _, st in lifetime),
            lifetime_epsilon=history_epsilon(lifetime, delta),
            prior_steps=sum(st for _, _, st in prior),
            prior_epsilon=history_epsilon(prior, delta),
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
            prior = compose_releases(self.lifetime_releases())
            ledger = OutputLedger(self.dir / "output.json")
            ledger.record(server_round, report)
            budget = ledger.composed()
            lifetime = compose_releases(self.lifetime_releases())
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
                        "lifetime_delta": lifetime.delta,
                    },
                    owner=self.owner,
                    lifetime_steps=lifetime.rounds,
                    lifetime_epsilon=lifetime.epsilon,
                    prior_steps=prior.rounds,
                    prior_epsilon=prior.epsilon,
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
