"""FedAvg over named LoRA tensors, weighted by the number of images each node trained on.

Plain numpy on purpose: the ServerApp never needs torch to aggregate, and the function
is small enough to test exactly against a hand-computed weighted mean.
"""

from __future__ import annotations

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
