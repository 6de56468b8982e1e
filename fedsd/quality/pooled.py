"""What the server does with the nodes' quality statistics: check each like input, pool.

FID is pooled exactly: each node sends torchmetrics' FID state (count, feature sum, sum
of outer products, for its held-out and its generated images); these states add up
(torchmetrics' own ``merge_state``, the reduction it uses across processes), so the FID of
the sum equals the FID computed centrally on the union of every node's features. KID needs
the features themselves, which never leave a node: the figure is the mean of the nodes'
KIDs, weighted by generated images. The CLIP score pools exactly (sum over count).

A node's statistics are input like its update: wrong shapes, non-finite values, counts out
of range, moments that no set of real features could produce, or an extractor the other
nodes do not use, drop that node's statistics (counted as rejected), never the figure.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedsd.quality.node import FID_ARRAYS

MAX_IMAGES = 10_000_000  # per node and set: far above any held-out split
MAX_DIM = 4096  # feature dimension: the FID Inception's is 2048


@dataclass
class NodeStats:
    """One node's checked statistics."""

    node: int
    arrays: dict[str, np.ndarray]
    real: int
    generated: int
    kid: float | None
    clip_sum: float
    clip_images: int
    extractors: str

    @property
    def dim(self) -> int:
        return int(self.arrays["real-sum"].shape[0])


def _count(metrics: Mapping[str, Any], key: str, low: int) -> int | None:
    value = metrics.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    if value != int(value) or not low <= value <= MAX_IMAGES:
        return None
    return int(value)


def check_stats(
    node: int, arrays: Mapping[str, Any], metrics: Mapping[str, Any], extractors: str
) -> NodeStats | str:
    """The node's statistics, or the reason they are dropped."""
    if set(arrays) != set(FID_ARRAYS):
        return "missing-statistics"
    vals = {k: np.asarray(v, dtype=np.float64) for k, v in arrays.items()}
    dim = vals["real-sum"].shape[0] if vals["real-sum"].ndim == 1 else 0
    if not 1 <= dim <= MAX_DIM or any(
        vals[k].shape != ((dim,) if k.endswith("-sum") and "cov" not in k else (dim, dim))
        for k in vals
    ):
        return "shape"
    if not all(np.isfinite(v).all() for v in vals.values()):
        return "non-finite"
    real, generated = _count(metrics, "real-images", 1), _count(metrics, "generated-images", 1)
    clip_images = _count(metrics, "clip-images", 0)
    if real is None or generated is None or clip_images is None or clip_images > generated:
        return "counts"
    for side, n in (("real", real), ("fake", generated)):
        total, second = vals[f"{side}-sum"], vals[f"{side}-cov-sum"]
        scale = max(1.0, float(np.abs(second).max()))
        # a true sum of outer products is symmetric, and sum(x^2) >= (sum x)^2 / n
        if (
            np.abs(second - second.T).max() > 1e-6 * scale
            or (np.diag(second) - total**2 / n).min() < -1e-6 * scale
        ):
            return "moments"
    clip_sum = metrics.get("clip-score-sum", 0.0)
    if not isinstance(clip_sum, int | float) or not math.isfinite(clip_sum):
        return "clip-score"
    if abs(clip_sum) > 100.0 * clip_images:  # a CLIP score is 100 x a cosine
        return "clip-score"
    kid = metrics.get("kid")
    kid_ok = isinstance(kid, int | float) and math.isfinite(kid) and abs(kid) < 1e6
    # a node's own words: printable, bounded (it is logged and stored in history.json)
    extractors = re.sub(r"[^\x20-\x7e]", "?", str(extractors))[:120]
    return NodeStats(
        node,
        vals,
        real,
        generated,
        float(kid) if kid_ok else None,
        float(clip_sum),
        clip_images,
        str(extractors),
    )


def stats_from_reply(node: int, content: Any) -> NodeStats | str:
    """``check_stats`` on a quality reply's records (a Flower ``RecordDict``)."""
    record = content.array_records.get("quality")
    metrics = content.metric_records.get("metrics")
    if record is None or metrics is None:
        return "missing-statistics"
    if any(math.prod(v.shape) > MAX_DIM * MAX_DIM for v in record.values()):
        return "shape"  # before deserialising what no extractor produces
    try:
        arrays = {k: v.numpy() for k, v in record.items()}
    except (TypeError, ValueError):
        return "shape"
    info = content.config_records.get("quality-info") or {}
    return check_stats(node, arrays, dict(metrics), str(info.get("extractors", "")))


def Precomputed(dim: int) -> Any:  # noqa: N802 (an nn.Module made where torch is imported)
    """A torchmetrics feature extractor that takes features as its input (identity)."""
    import torch

    class _Precomputed(torch.nn.Module):
        num_features = dim

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    return _Precomputed()


def fid_metric(dim: int) -> Any:
    """torchmetrics' FID over ``dim``-dimensional features given directly to ``update``."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=Precomputed(dim), reset_real_features=False)


def pooled_fid(stats: list[NodeStats]) -> float | None:
    """FID of the sum of the nodes' FID states (None under 2 images on either side)."""
    import torch

    if sum(s.real for s in stats) < 2 or sum(s.generated for s in stats) < 2:
        return None
    fid = fid_metric(stats[0].dim)
    for s in stats:
        state: dict[str, Any] = {FID_ARRAYS[k]: torch.from_numpy(v) for k, v in s.arrays.items()}
        state["real_features_num_samples"] = torch.tensor(s.real)
        state["fake_features_num_samples"] = torch.tensor(s.generated)
        fid.merge_state(state)
    fid.orig_dtype = torch.float64  # set by update(), which only the nodes ran
    with warnings.catch_warnings():  # "compute before update": the state came merged
        warnings.filterwarnings("ignore", message=".*before the ``update`` method")
        value = float(fid.compute())
    return value if math.isfinite(value) else None


def pool(stats: list[NodeStats]) -> tuple[dict[str, Any], list[NodeStats]]:
    """The round's figures from the nodes that use the extractor most nodes use; also
    returns the nodes left out for using another one."""
    if not stats:
        return _figures([], None), []
    common = Counter((s.extractors, s.dim) for s in stats).most_common()
    best = max(common, key=lambda kv: (kv[1], kv[0][0]))[0]
    used = [s for s in stats if (s.extractors, s.dim) == best]
    return _figures(used, best[0]), [s for s in stats if (s.extractors, s.dim) != best]


def _figures(used: list[NodeStats], extractors: str | None) -> dict[str, Any]:
    kid_nodes = [s for s in used if s.kid is not None]
    kid_weight = sum(s.generated for s in kid_nodes)
    clip_images = sum(s.clip_images for s in used)
    return {
        "fid": pooled_fid(used) if used else None,
        "kid": sum(s.kid * s.generated for s in kid_nodes) / kid_weight if kid_weight else None,
        # torchmetrics' CLIPScore.compute over the pooled state: max(sum / n, 0)
        "clip_score": max(sum(s.clip_sum for s in used) / clip_images, 0.0)
        if clip_images
        else None,
        "real_images": sum(s.real for s in used),
        "generated_images": sum(s.generated for s in used),
        "clip_images": clip_images,
        "nodes": len(used),
        "extractors": extractors or "",
    }
