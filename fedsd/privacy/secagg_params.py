"""SecAgg+ parameters checked against what Flower would accept but mishandle silently,
and the quantization error they leave in the aggregate."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from fedsd.common.errors import ConfigError
from fedsd.privacy.config import PrivacyConfig

#: Above this many sampled nodes the default neighbourhood stops growing (odd, as Flower wants).
MAX_DEFAULT_SHARES = 21


def secagg_defaults(num_nodes: int) -> dict[str, int | float]:
    """Default ``secagg-num-shares`` and ``secagg-reconstruction-threshold`` for
    ``num_nodes`` nodes sampled per round.

    Shares: every sampled node (full neighbourhood) up to 21 nodes, then 21 (an odd
    neighbourhood, as SecAgg+ wants, which bounds each node's key-sharing cost).
    Threshold: ``max(2, ceil(0.6 * shares))``, a strict majority, because SecAgg+ is only
    safe against a server that lies about who dropped out when the threshold exceeds half
    the neighbourhood (otherwise it could collect both the self-mask and the mask-key shares
    of one node and unmask its individual update); 0.6 rather than "half + 1" still lets
    ``shares - threshold`` (about 40 %) of a neighbourhood drop out without aborting the
    round. Integers, not fractions: Flower rounds fractions with ``round()``, which can give
    exactly half (0.6 of 4 shares -> 2).

    With 2 nodes the only option is both shares and threshold 2 (Flower refuses integer
    shares <= 2, so 1.0 = all nodes): one dropout aborts the round, and either node can
    recover the other's update by subtracting its own from the aggregate. SecAgg hides
    nothing between two nodes; it still hides each update from the server.
    """
    if num_nodes < 2:
        raise ConfigError(f"SecAgg+ needs at least 2 nodes per round, got {num_nodes}")
    if num_nodes == 2:
        return {"secagg-num-shares": 1.0, "secagg-reconstruction-threshold": 2}
    shares = min(num_nodes, MAX_DEFAULT_SHARES)
    return {
        "secagg-num-shares": shares,
        "secagg-reconstruction-threshold": max(2, math.ceil(0.6 * shares)),
    }


@dataclass(frozen=True)
class SecAggPlan:
    """What Flower's SecAgg+ will actually use for ``num_nodes`` sampled nodes."""

    num_nodes: int
    num_shares: int | float  # as configured (Flower's parameter)
    reconstruction_threshold: int | float  # as configured
    neighbourhood: int  # nodes each node shares its keys with, itself included
    threshold: int  # shares needed to reconstruct, as Flower computes it
    dropouts_tolerated: int  # per neighbourhood, before the round aborts
    warnings: tuple[str, ...] = ()


def check_secagg(num_nodes: int, cfg: PrivacyConfig) -> SecAggPlan:
    """Resolve the SecAgg+ parameters as Flower will for ``num_nodes`` sampled nodes and
    refuse what it would accept but mishandle: a threshold above the neighbourhood (every
    round aborts), a modulus too small for the sum of ``num_nodes`` quantized updates
    (silent wrap-around). Flower's own refusals (integer shares <= 2, integer threshold >=
    integer shares, modulus not a power of two above the quantization range) are refused
    already by ``PrivacyConfig``. Softer problems come back as ``warnings``.
    """
    if num_nodes < 2:
        raise ConfigError(f"SecAgg+ needs at least 2 nodes per round, got {num_nodes}")
    defaults = secagg_defaults(num_nodes)
    shares_cfg = cfg.secagg_num_shares
    thr_cfg = cfg.secagg_reconstruction_threshold
    if shares_cfg is None:
        shares_cfg = defaults["secagg-num-shares"]
    if thr_cfg is None:
        thr_cfg = defaults["secagg-reconstruction-threshold"]
    # Mirrors flwr.server.workflow.SecAggPlusWorkflow.setup_stage (flwr 1.41).
    if isinstance(shares_cfg, float):
        shares = round(shares_cfg * num_nodes)
        if shares < num_nodes and shares & 1 == 0:
            shares += 1
        if shares <= 2:
            shares = num_nodes
    else:
        shares = shares_cfg
    threshold = max(round(thr_cfg * shares), 2) if isinstance(thr_cfg, float) else thr_cfg
    if num_nodes != shares and shares & 1 == 0:
        shares += 1
    neighbourhood = min(num_nodes, 2 * (shares >> 1) + 1)
    if threshold > neighbourhood:
        raise ConfigError(
            f"invalid run config: secagg-reconstruction-threshold={thr_cfg!r} means "
            f"{threshold} shares, but with secagg-num-shares={shares_cfg!r} and {num_nodes} "
            f"nodes a node has only {neighbourhood} (itself included): Flower would abort "
            "every round ('Insufficient available nodes')"
        )
    q, mod = cfg.secagg_quantization_range, cfg.secagg_modulus_range
    if num_nodes * q >= mod:
        raise ConfigError(
            f"invalid run config: secagg-modulus-range={mod} must exceed {num_nodes} nodes x "
            f"secagg-quantization-range={q}, or the masked sum wraps around and the "
            "aggregate is silently wrong"
        )
    warnings = []
    tolerated = neighbourhood - threshold
    if tolerated == 0:
        warnings.append(f"threshold {threshold} = neighbourhood: any dropout aborts the round")
    if num_nodes == 2:
        warnings.append(
            "2 nodes: either node can recover the other's update from the aggregate "
            "(aggregate minus its own); SecAgg only hides the updates from the server"
        )
    if 2 * threshold <= neighbourhood:
        warnings.append(
            f"threshold {threshold} is not a majority of {neighbourhood}: a server that lies "
            "about dropouts could unmask an individual update"
        )
    return SecAggPlan(
        num_nodes=num_nodes,
        num_shares=shares_cfg,
        reconstruction_threshold=thr_cfg,
        neighbourhood=neighbourhood,
        threshold=threshold,
        dropouts_tolerated=tolerated,
        warnings=tuple(warnings),
    )


def check_secagg_weight(num_examples: float, cfg: PrivacyConfig) -> None:
    """Refuse a node weight above ``secagg-max-weight``: Flower only logs an overflow
    warning and the weighted aggregate overflows the quantized range silently."""
    if not num_examples <= cfg.secagg_max_weight:
        raise ConfigError(
            f"invalid run config: secagg-max-weight={cfg.secagg_max_weight!r} is below the "
            f"{num_examples!r} examples this node reports; raise it to at least the largest "
            "node's image count (too large a value costs quantization precision)"
        )


def check_secagg_values(arrays: Mapping[str, np.ndarray], cfg: PrivacyConfig) -> None:
    """Refuse values outside +-``secagg-clipping-range``: SecAgg+ clips them silently
    before quantizing, which changes the aggregate without any error."""
    worst = max((float(np.max(np.abs(a))) for a in arrays.values() if a.size), default=0.0)
    if not worst <= cfg.secagg_clipping_range:
        raise ConfigError(
            f"invalid run config: secagg-clipping-range={cfg.secagg_clipping_range!r} but a "
            f"sent value has magnitude {worst!r}; SecAgg+ would clip it silently"
        )


def secagg_error_bound(weights: Iterable[float], cfg: PrivacyConfig, max_abs: float) -> float:
    """Largest per-value difference between SecAgg+'s aggregate and the exact weighted mean
    of values bounded by ``max_abs`` (<= ``secagg-clipping-range``), from quantization.

    Each node sends ``round(w/W * T)/T * x`` (W = max weight, T = quantization range)
    stochastically rounded to a grid of step ``2C/T``; the server divides the sum by the sum
    of the rounded weight ratios ``S``. So each value is off by less than ``n * 2C/T / S``
    from rounding, plus ``n * max_abs / (T * S)`` from the rounded weights.
    """
    w = [float(x) for x in weights]
    t = cfg.secagg_quantization_range
    ratios = [round(x / cfg.secagg_max_weight * t) / t for x in w]
    total = sum(ratios)
    if total <= 0:
        raise ValueError("SecAgg+ weights sum to zero after quantization")
    n = len(w)
    return n * (2.0 * cfg.secagg_clipping_range + max_abs) / (t * total)
