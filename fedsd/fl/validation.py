"""Server-side checks of one node's train reply, before it can touch the aggregate.

A reply is whatever a node chose to send: a buggy, diverging or malicious node can send
NaN, a vector of the wrong length, a huge update or a weight of 1e12. ``check_reply``
turns the reply's parts into either an ``Accepted`` (update, weight) or a ``Rejected``
with one short, stable reason (the label of ``fedsd_server_rejected_updates_total``).
numpy only: the ServerApp never imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedsd.fl.replies import Unreadable
from fedsd.privacy.node_policy import POLICY_KEYS

#: Every rejection reason, in the order the checks run.
REASONS = (
    "missing-key",
    "bad-type",
    "wrong-length",
    "non-finite",
    "norm-bound",
    "weight-range",
    "weight-cap",
)
#: Error replies by which a node refuses a whole run, not one message (label of
#: ``fedsd_server_node_refusals_total``): the node does not run the app
#: (``fedsd.deploy.pinning``), or the run breaks a rule of the node's privacy policy
#: (``fedsd.privacy.node_policy``, the rule's node-config key).
NODE_REFUSALS = ("app-not-trusted", *POLICY_KEYS)
#: Metrics a train reply must carry: the FedAvg weight and the train split's size.
REQUIRED_METRICS = ("num-examples", "shard-images")


@dataclass(frozen=True)
class Limits:
    """What the server knows before any reply arrives."""

    length: int  # values in the flat update (the exchanged LoRA tensors)
    max_norm: float  # L2 bound of one update (max-update-norm plus any dp-output noise)
    max_weight: float  # run-wide cap of one node's weight (max-node-weight)
    local_epochs: int = 1  # a weight counts images once per local epoch
    central_clip: float | None = None  # dp-central: re-clip here and weigh every node 1


@dataclass(frozen=True)
class Accepted:
    """An update that passed every check, with the weight the aggregate should use."""

    update: np.ndarray  # flat float32, re-clipped under dp-central
    weight: float
    norm: float  # L2 norm as received


@dataclass(frozen=True)
class Rejected:
    """Why a reply was dropped: ``reason`` is one of ``REASONS``."""

    reason: str
    detail: str


def _number(x: Any) -> bool:
    return isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool)


def check_reply(
    flat: Any, metrics: Mapping[str, Any] | None, limits: Limits
) -> Accepted | Rejected:
    """Validate one train reply: ``flat`` is its update vector (None when absent,
    ``Unreadable`` when it could not be decoded), ``metrics`` its metric record (None when
    absent).

    The weight must lie in [0, shard-images x local-epochs] (the node's own account of its
    train split) and not exceed ``max_weight``: the node's image count is a claim too, so
    the cap is what bounds a liar's weight.
    """
    if metrics is None:
        return Rejected("missing-key", "no metrics record")
    for key in REQUIRED_METRICS:
        if key not in metrics:
            return Rejected("missing-key", f"metrics lack {key!r}")
    if flat is None:
        return Rejected("missing-key", "no update array")
    weight, images = metrics["num-examples"], metrics["shard-images"]
    if not (_number(weight) and _number(images)):
        return Rejected("bad-type", "num-examples and shard-images must be numbers")
    if isinstance(flat, Unreadable):
        return Rejected("bad-type", f"update unreadable: {flat.reason}")
    if not isinstance(flat, np.ndarray) or not np.issubdtype(flat.dtype, np.floating):
        return Rejected("bad-type", f"update is {getattr(flat, 'dtype', type(flat).__name__)}")
    if flat.ndim != 1 or flat.size != limits.length:
        return Rejected(
            "wrong-length", f"update has shape {flat.shape}, expected ({limits.length},)"
        )
    x = flat.astype(np.float64)
    if not np.all(np.isfinite(x)):
        return Rejected("non-finite", f"{int(np.sum(~np.isfinite(x)))} non-finite values")
    norm = float(np.linalg.norm(x))
    if not norm <= limits.max_norm:
        return Rejected("norm-bound", f"L2 norm {norm:.4g} > {limits.max_norm:.4g}")
    weight, images = float(weight), float(images)
    if not (math.isfinite(weight) and weight >= 0):
        return Rejected("weight-range", f"weight {weight!r} is not a number >= 0")
    if not (math.isfinite(images) and images >= 0):  # the bound the weight is checked by
        return Rejected("weight-range", f"shard-images {images!r} is not a finite number >= 0")
    if weight > limits.max_weight:
        return Rejected("weight-cap", f"weight {weight:.4g} > max-node-weight {limits.max_weight}")
    if not weight <= images * limits.local_epochs:
        return Rejected(
            "weight-range",
            f"weight {weight:.4g} > shard-images {images:.4g} x local-epochs {limits.local_epochs}",
        )
    if limits.central_clip is not None:
        # dp-central: the noise is calibrated to one node moving the mean by <= C / m,
        # which holds only if the server itself clips to C and counts each node once.
        if norm > limits.central_clip:
            x = x * (limits.central_clip / norm)
        weight = 1.0 if weight > 0 else 0.0
    return Accepted(update=x.astype(np.float32), weight=weight, norm=norm)


def noise_norm_allowance(privacy: Any, length: int) -> float:
    """How far the dp-output noise alone can carry an honest update's L2 norm (0 without
    dp-output): clip plus the noise's norm at more than 10 standard deviations."""
    if "dp-output" not in privacy.components:
        return 0.0
    from fedsd.privacy import gaussian_sigma, laplace_scale

    clip, eps = float(privacy.dp_output_clip), float(privacy.dp_output_epsilon)
    if privacy.dp_output_mechanism == "gaussian":
        # ||N(0, s^2 I_P)|| <= s (sqrt(P) + t) except with probability exp(-t^2 / 2)
        sigma = gaussian_sigma(clip, eps, float(privacy.dp_output_delta))
        return clip + sigma * (math.sqrt(length) + 12.0)
    # Laplace(b): E x^2 = 2 b^2, Var x^2 = 20 b^4; 30 standard deviations of the sum
    b = laplace_scale(clip, eps)
    return clip + b * (math.sqrt(2 * length + 30 * math.sqrt(20 * length)) + 30.0)


def non_finite(arrays: Mapping[str, np.ndarray]) -> list[str]:
    """Names of the arrays holding any NaN or Inf."""
    return [k for k, v in arrays.items() if not np.all(np.isfinite(np.asarray(v)))]


def node_refusal(reason: str) -> str | None:
    """Which of ``NODE_REFUSALS`` an error reply's reason is, or None (a failure)."""
    from fedsd.deploy.pinning import REFUSAL_MARK as PINNING_MARK
    from fedsd.privacy.node_policy import refused_rule

    if PINNING_MARK in reason:
        return "app-not-trusted"
    return refused_rule(reason)
