"""FedAvg over named LoRA tensors, weighted by the number of images each node trained on,
and two robust rules (coordinate-wise trimmed mean and median) for runs without SecAgg+.

Plain numpy on purpose: the ServerApp never needs torch to aggregate, and the functions
are small enough to test exactly against hand-computed values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


def weighted_mean(
    updates: Sequence[tuple[Mapping[str, np.ndarray], float]],
) -> dict[str, np.ndarray]:
    """Image-weighted mean of named arrays: sum_i w_i x_i / sum_i w_i, per tensor.

    Every update must carry the same names and shapes; weights must be >= 0 with a
    positive sum. Accumulates in float64 so the order of nodes does not change the
    result beyond float32 rounding.
    """
    if not updates:
        raise ValueError("no updates to aggregate")
    names = sorted(updates[0][0])
    total = float(sum(w for _, w in updates))
    if any(w < 0 for _, w in updates) or not total > 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {[w for _, w in updates]}")
    out: dict[str, np.ndarray] = {}
    for name in names:
        acc = None
        for arrays, w in updates:
            if sorted(arrays) != names:
                raise KeyError("updates carry different tensor names")
            x = np.asarray(arrays[name], dtype=np.float64)
            if acc is not None and x.shape != acc.shape:
                raise ValueError(f"tensor {name}: shape {x.shape} != {acc.shape}")
            acc = x * w if acc is None else acc + x * w
        assert acc is not None
        out[name] = (acc / total).astype(np.float32)
    return out


def weighted_metric(values: Sequence[tuple[float, float]]) -> float:
    """Weighted mean of a scalar metric over nodes (NaN when there is no weight)."""
    pairs = [(v, w) for v, w in values if w > 0 and np.isfinite(v)]
    total = sum(w for _, w in pairs)
    return float(sum(v * w for v, w in pairs) / total) if total > 0 else float("nan")


#: Values of the ``aggregation`` run-config key.
AGGREGATIONS = ("fedavg", "trimmed-mean", "median")


def _stack(updates: Sequence[tuple[Mapping[str, np.ndarray], float]]) -> dict[str, np.ndarray]:
    """Name -> (nodes, *shape) float64 stack of the updates with weight > 0."""
    kept = [u for u, w in updates if w > 0]
    if not kept:
        raise ValueError("no update with a positive weight to aggregate")
    names = sorted(kept[0])
    if any(sorted(u) != names for u in kept):
        raise KeyError("updates carry different tensor names")
    return {n: np.stack([np.asarray(u[n], dtype=np.float64) for u in kept]) for n in names}


def trim_count(nodes: int, trim_fraction: float) -> int:
    """Values cut from each end per coordinate: floor(fraction x nodes), at least one with
    3+ nodes (else a poisoner among few nodes is never cut), always leaving one value."""
    if nodes < 3:
        return 0
    return min(max(1, math.floor(trim_fraction * nodes)), (nodes - 1) // 2)


def trimmed_mean(
    updates: Sequence[tuple[Mapping[str, np.ndarray], float]], trim_fraction: float
) -> dict[str, np.ndarray]:
    """Coordinate-wise trimmed mean: per value, drop the ``trim_count`` smallest and largest
    across nodes, average the rest.

    Weights only select (weight 0 = no update); each kept node counts once, because a
    weight is the node's own claim and a robust rule must not let a claim buy influence.
    """
    out = {}
    for name, x in _stack(updates).items():
        k = trim_count(x.shape[0], trim_fraction)
        s = np.sort(x, axis=0)
        out[name] = s[k : x.shape[0] - k].mean(axis=0).astype(np.float32)
    return out


def coordinate_median(
    updates: Sequence[tuple[Mapping[str, np.ndarray], float]],
) -> dict[str, np.ndarray]:
    """Coordinate-wise median across nodes (mean of the two middle values for an even
    count). Weights only select, as in ``trimmed_mean``."""
    return {n: np.median(x, axis=0).astype(np.float32) for n, x in _stack(updates).items()}


def aggregate(
    rule: str,
    updates: Sequence[tuple[Mapping[str, np.ndarray], float]],
    trim_fraction: float = 0.2,
) -> dict[str, np.ndarray]:
    """The ``aggregation`` run-config rule applied to (update, weight) pairs."""
    if rule == "fedavg":
        return weighted_mean([(u, w) for u, w in updates if w > 0])
    if rule == "trimmed-mean":
        return trimmed_mean(updates, trim_fraction)
    if rule == "median":
        return coordinate_median(updates)
    raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {rule!r}")
