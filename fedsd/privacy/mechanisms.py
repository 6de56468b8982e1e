"""Output-level DP on an update: clip it with the norm of the mechanism, calibrate and add
Gaussian or Laplace noise (see the package docstring for the neighbouring relation)."""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np


def _flat_norm(arrays: Iterable[np.ndarray], norm: str) -> float:
    if norm == "l2":
        total = sum(float(np.sum(np.square(np.asarray(a, dtype=np.float64)))) for a in arrays)
        out = math.sqrt(total)
    elif norm == "l1":
        out = sum(float(np.sum(np.abs(np.asarray(a, dtype=np.float64)))) for a in arrays)
    else:
        raise ValueError(f"norm must be 'l2' or 'l1', got {norm!r}")
    if not math.isfinite(out):
        raise ValueError("the update has non-finite values; refusing to clip or release it")
    return out


def require_positive(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def clip_update(
    update: Mapping[str, np.ndarray], bound: float, norm: str = "l2"
) -> tuple[dict[str, np.ndarray], float]:
    """Clip the update, all tensors taken as one flat vector, to ``norm`` <= ``bound``.

    Returns the clipped update (same dtypes) and the norm before clipping. At or under
    the bound the values are returned unchanged (copies); over it the vector is scaled by
    ``bound / norm`` (in float64), so its norm is the bound up to the dtype's rounding.
    """
    require_positive("bound", bound)
    before = _flat_norm(update.values(), norm)
    if before <= bound:
        return {k: np.array(v, copy=True) for k, v in update.items()}, before
    factor = bound / before
    out = {
        k: (np.asarray(v, dtype=np.float64) * factor).astype(np.asarray(v).dtype)
        for k, v in update.items()
    }
    return out, before


def _phi(x: float) -> float:
    """Standard normal CDF."""
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def gaussian_delta(sigma: float, sensitivity: float, epsilon: float) -> float:
    """The exact delta of the Gaussian mechanism at ``epsilon`` (Balle & Wang 2018, Thm 8):
    ``Phi(D/2s - e*s/D) - exp(e) * Phi(-D/2s - e*s/D)``."""
    a = sensitivity / (2.0 * sigma)
    b = epsilon * sigma / sensitivity
    tail = _phi(-a - b)
    second = math.exp(epsilon + math.log(tail)) if tail > 0 else 0.0
    return max(0.0, _phi(a - b) - second)


def gaussian_sigma(clip: float, epsilon: float, delta: float, *, method: str = "analytic") -> float:
    """Noise std for (epsilon, delta)-DP of a release with L2 sensitivity ``clip``.

    ``method="classical"``: ``clip * sqrt(2 ln(1.25/delta)) / epsilon`` (Dwork & Roth 2014,
    Theorem A.1), whose proof holds only for epsilon < 1, so epsilon >= 1 is refused.

    ``method="analytic"`` (default): the analytic Gaussian mechanism (Balle & Wang 2018,
    "Improving the Gaussian Mechanism for Differential Privacy", Algorithm 1 solved by
    bisection): the smallest sigma whose exact privacy profile meets delta at epsilon. It
    is valid for every epsilon (per-round budgets of 1 or more are the usual case in FL)
    and never needs more noise than the classical formula, so it gives the same guarantee
    with less noise. Returned sigma is on the safe side (delta(sigma) <= delta).
    """
    require_positive("clip", clip)
    require_positive("epsilon", epsilon)
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if method == "classical":
        if epsilon >= 1:
            raise ValueError(
                f"the classical Gaussian mechanism is only proven for epsilon < 1, got "
                f"{epsilon!r}; use method='analytic'"
            )
        return clip * math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon
    if method != "analytic":
        raise ValueError(f"method must be 'analytic' or 'classical', got {method!r}")
    lo = hi = clip
    while gaussian_delta(hi, clip, epsilon) > delta:
        hi *= 2.0
    while gaussian_delta(lo, clip, epsilon) <= delta and lo > 1e-12 * clip:
        lo /= 2.0
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        if gaussian_delta(mid, clip, epsilon) > delta:
            lo = mid
        else:
            hi = mid
        if hi / lo - 1.0 < 1e-12:
            break
    return hi


def laplace_scale(clip_l1: float, epsilon: float) -> float:
    """Laplace scale b = L1 sensitivity / epsilon (pure epsilon-DP, Dwork & Roth Thm 3.6)."""
    require_positive("clip_l1", clip_l1)
    require_positive("epsilon", epsilon)
    return clip_l1 / epsilon


def noise_rng() -> np.random.Generator:
    """A generator seeded from OS entropy for DP noise.

    Never seed DP noise from the run's seed: the server knows it, could regenerate the
    noise and subtract it.
    """
    return np.random.default_rng(secrets.randbits(128))


@dataclass(frozen=True)
class OutputNoiseReport:
    """What one output-DP release did (for the privacy record)."""

    mechanism: str
    norm: str  # "l2" (Gaussian) or "l1" (Laplace)
    norm_before: float
    clipped: bool
    clip: float
    adjacency: str
    sensitivity: float
    epsilon: float
    delta: float
    sigma: float | None = None  # Gaussian std
    scale: float | None = None  # Laplace scale b
    noise_multiplier: float | None = None  # sigma / sensitivity (Gaussian)
    num_params: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON records."""
        return dataclasses.asdict(self)


def privatize_update(
    update: Mapping[str, np.ndarray],
    mechanism: str,
    clip: float,
    epsilon: float,
    delta: float | None,
    rng: np.random.Generator,
    *,
    adjacency: str = "add-remove",
    calibration: str = "analytic",
) -> tuple[dict[str, np.ndarray], OutputNoiseReport]:
    """Clip the update and add noise calibrated to (epsilon, delta) for one round.

    Gaussian: L2 clip, sigma from ``gaussian_sigma``. Laplace: L1 clip (the L1 norm is the
    Laplace sensitivity, not the L2 bound), scale ``clip / epsilon``, ``delta`` must be
    None or 0. Sensitivity is ``clip`` for add/remove adjacency and ``2 * clip`` for
    ``adjacency="replace"``. float64 internally, float32 out. Use ``noise_rng()``.
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError("rng must be a numpy Generator (use noise_rng())")
    if adjacency not in ("add-remove", "replace"):
        raise ValueError(f"adjacency must be 'add-remove' or 'replace', got {adjacency!r}")
    require_positive("clip", clip)
    sensitivity = clip * (2.0 if adjacency == "replace" else 1.0)
    sigma = scale = noise_multiplier = None
    if mechanism == "gaussian":
        if delta is None:
            raise ValueError("the Gaussian mechanism needs delta in (0, 1)")
        norm = "l2"
        sigma = gaussian_sigma(sensitivity, epsilon, delta, method=calibration)
        noise_multiplier = sigma / sensitivity
    elif mechanism == "laplace":
        if delta:
            raise ValueError(f"the Laplace mechanism is pure epsilon-DP; got delta={delta!r}")
        delta, norm = 0.0, "l1"
        scale = laplace_scale(sensitivity, epsilon)
    else:
        raise ValueError(f"mechanism must be 'gaussian' or 'laplace', got {mechanism!r}")
    before = _flat_norm(update.values(), norm)
    factor = min(1.0, clip / before) if before > 0 else 1.0
    out: dict[str, np.ndarray] = {}
    for k, v in update.items():
        x = np.asarray(v, dtype=np.float64) * factor
        if sigma is not None:
            x = x + rng.normal(0.0, sigma, size=x.shape)
        else:
            x = x + rng.laplace(0.0, scale, size=x.shape)
        out[k] = x.astype(np.float32)
    report = OutputNoiseReport(
        mechanism=mechanism,
        norm=norm,
        norm_before=before,
        clipped=before > clip,
        clip=clip,
        adjacency=adjacency,
        sensitivity=sensitivity,
        epsilon=float(epsilon),
        delta=float(delta),
        sigma=sigma,
        scale=scale,
        noise_multiplier=noise_multiplier,
        num_params=int(sum(np.asarray(v).size for v in update.values())),
    )
    return out, report
