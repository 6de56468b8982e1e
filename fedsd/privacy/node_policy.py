"""A data owner's privacy policy: node config the run cannot change.

The run config (privacy mode, noise, ``dp-target-epsilon``) is chosen by whoever submits
the run, i.e. by the party DP protects against. These node-config keys (SuperNode
``--node-config``; ``fedsd up --local --node-config``; compose's and Kubernetes'
``FEDSD_NODE_CONFIG``) let the data owner refuse runs that would break its own rules:

``max-epsilon``
    lifetime cap for the shard: the epsilon already in its ledger (``fedsd.privacy.node``,
    every run ever trained on it) plus what this run's plan would still spend (the
    remaining rounds at the run's noise, assuming the node trains in each) must stay
    within it. Mechanisms add up (basic composition across DP-SGD and output DP, which is
    conservative when a run uses both); a run with neither has no bound and is refused.
``require-privacy``
    components the run must include, e.g. ``"secagg+dp-sample"`` (``+``, ``,`` or spaces).
``min-noise-multiplier``
    DP-SGD's noise multiplier (given or planned from ``dp-target-epsilon``) must be at
    least this; a run without ``dp-sample`` has none (0) and is refused.
``share-quality-stats``
    ``false`` refuses the image-quality messages (``fedsd.quality``): their Inception
    feature moments of the held-out images are not covered by any DP mechanism.

The check runs as a ClientApp mod, before the handlers and before SecAgg+'s stages: a
refused run gets an error reply naming the rule, before any image is read (the plan
counts the train split's ``metadata.jsonl`` lines, it does not open the images).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

POLICY_KEYS = ("max-epsilon", "require-privacy", "min-noise-multiplier", "share-quality-stats")
#: How every refusal's message (the node's error reply) starts: ``PREFIX RULE=VALUE: why``.
REFUSAL_PREFIX = "node privacy policy refuses this run: "
_REFUSAL = re.compile(re.escape(REFUSAL_PREFIX) + r"([a-z-]+)=")


class PolicyRefusal(Exception):
    """The run breaks the node's policy; ``rule`` is the node-config key=value."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(f"{REFUSAL_PREFIX}{rule}: {message}")
        self.rule = rule


def refused_rule(reason: str) -> str | None:
    """The policy key (one of ``POLICY_KEYS``) a node's error reply names, or None when
    the reply is not a policy refusal. The reply is the node's text: only a known key is
    returned (it becomes a metric label)."""
    m = _REFUSAL.search(reason)
    return m.group(1) if m and m.group(1) in POLICY_KEYS else None


@dataclass(frozen=True)
class NodePolicy:
    """The policy keys of one node's config (all optional)."""

    max_epsilon: float | None = None
    require_privacy: frozenset[str] = frozenset()
    min_noise_multiplier: float | None = None
    share_quality_stats: bool = True

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> NodePolicy:
        """Read and validate the policy keys; a bad value is an error, never ignored."""
        from fedsd.privacy import COMPONENTS

        def number(key: str) -> float | None:
            raw = node_config.get(key)
            if raw is None or raw == "":
                return None
            try:
                value = float(raw)
            except (TypeError, ValueError):
                value = math.nan
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"node config {key}={raw!r}: expected a number >= 0")
            return value

        raw_req = str(node_config.get("require-privacy") or "")
        required = frozenset(c for c in re.split(r"[+,\s]+", raw_req) if c and c != "none")
        unknown = sorted(required - set(COMPONENTS))
        if unknown:
            raise ValueError(
                f"node config require-privacy={raw_req!r}: unknown component(s) "
                f"{', '.join(unknown)}; known: {', '.join(COMPONENTS)}"
            )
        raw_share = str(node_config.get("share-quality-stats", "true")).strip().lower()
        if raw_share not in ("true", "false", "1", "0", ""):
            raise ValueError(
                f"node config share-quality-stats={raw_share!r}: expected true or false"
            )
        return cls(
            number("max-epsilon"),
            required,
            number("min-noise-multiplier"),
            raw_share not in ("false", "0"),
        )

    @property
    def empty(self) -> bool:
        """No rule set: nothing to check."""
        return (
            self.max_epsilon is None
            and not self.require_privacy
            and self.min_noise_multiplier is None
            and self.share_quality_stats
        )

    def check_quality(self) -> None:
        """Raise ``PolicyRefusal`` if the node does not send image-quality statistics."""
        if not self.share_quality_stats:
            raise PolicyRefusal(
                "share-quality-stats=false",
                "this node sends no image-quality statistics (Inception and CLIP feature "
                "moments of its held-out images)",
            )

    def check(self, privacy: Any, num_images: int, server_round: int) -> None:
        """Raise ``PolicyRefusal`` if the run (``privacy``: its ``NodePrivacy`` for this
        shard) breaks a rule. ``num_images``: the train split's listed images;
        ``server_round``: the round asking (0 or unknown: plan the whole run)."""
        cfg, p = privacy.cfg, privacy.p
        comps = p.components
        missing = sorted(self.require_privacy - comps)
        if missing:
            raise PolicyRefusal(
                f"require-privacy={'+'.join(sorted(self.require_privacy))}",
                f"the run's privacy={p.privacy} lacks {', '.join(missing)}",
            )
        plan = privacy.plan_dp_sgd(num_images) if num_images > 0 else None
        sigma = plan.noise_multiplier if plan is not None else 0.0
        if self.min_noise_multiplier is not None and sigma < self.min_noise_multiplier:
            what = f"noise multiplier {sigma:.4g}" if plan else f"no DP-SGD (privacy={p.privacy})"
            raise PolicyRefusal(
                f"min-noise-multiplier={self.min_noise_multiplier:g}",
                f"the run's DP-SGD has {what}",
            )
        if self.max_epsilon is not None:
            rounds_left = max(1, cfg.num_server_rounds - max(1, server_round) + 1)
            total, parts = self.planned_lifetime_epsilon(privacy, plan, rounds_left)
            if total > self.max_epsilon:
                detail = ", ".join(parts) or f"privacy={p.privacy} gives no epsilon bound"
                raise PolicyRefusal(
                    f"max-epsilon={self.max_epsilon:g}",
                    f"this shard's lifetime epsilon would reach {total:.4g} ({detail})",
                )

    @staticmethod
    def planned_lifetime_epsilon(
        privacy: Any, plan: Any, rounds_left: int
    ) -> tuple[float, list[str]]:
        """The shard's ledger plus this run's remaining plan, summed over mechanisms."""
        from fedsd.privacy import compose_releases, gaussian_sigma, history_epsilon

        p = privacy.p
        comps = p.components
        total, parts = 0.0, []
        if "dp-sample" in comps and plan is not None:
            history = privacy.lifetime_dp_sgd()
            history.append((plan.noise_multiplier, plan.sample_rate, plan.steps * rounds_left))
            eps = history_epsilon(history, p.dp_delta)
            total += eps
            parts.append(f"dp-sgd {eps:.4g}")
        if "dp-output" in comps:
            clip, eps1 = float(p.dp_output_clip), float(p.dp_output_epsilon)
            gaussian = p.dp_output_mechanism == "gaussian"
            delta = float(p.dp_output_delta) if gaussian else 0.0
            nm = gaussian_sigma(clip, eps1, delta) / clip if gaussian else None
            planned = {
                "mechanism": p.dp_output_mechanism,
                "epsilon": eps1,
                "delta": delta,
                "noise_multiplier": nm,
            }
            releases = privacy.lifetime_releases() + [planned] * rounds_left
            eps = compose_releases(releases).epsilon
            total += eps
            parts.append(f"output-{p.dp_output_mechanism} {eps:.4g}")
        if not parts:
            return math.inf, []
        return total, parts


def listed_images(split_dir: str | Path) -> int:
    """Entries in a split's ``metadata.jsonl`` (no image is opened)."""
    path = Path(split_dir) / "metadata.jsonl"
    with open(path, "rb") as fh:
        return sum(1 for line in fh if line.strip())
