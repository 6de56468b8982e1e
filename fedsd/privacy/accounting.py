"""DP accounting: RDP (Opacus) and basic composition across rounds, central DP, DP-SGD
plans. Opacus (and with it torch) is imported inside the functions that need it."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from fedsd.privacy.mechanisms import require_positive


def _alphas() -> list[float]:
    from opacus.accountants import RDPAccountant

    return list(RDPAccountant.DEFAULT_ALPHAS)


def _rdp_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """epsilon of ``steps`` subsampled Gaussian steps via Opacus' RDP analysis."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if noise_multiplier < 0 or steps < 0:
        raise ValueError(
            f"need noise_multiplier >= 0 and steps >= 0, got {noise_multiplier}, {steps}"
        )
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    orders = _alphas()
    rdp = compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=steps, orders=orders)
    eps, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(eps)


def compose_basic(epsilon: float, delta: float, rounds: int) -> tuple[float, float]:
    """Basic composition over ``rounds`` releases: (k * epsilon, k * delta)."""
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    return rounds * epsilon, rounds * delta


def compose_rdp_gaussian(noise_multiplier: float, rounds: int, delta: float) -> float:
    """epsilon after ``rounds`` Gaussian releases with ``noise_multiplier`` = sigma /
    sensitivity, at total ``delta``, by RDP (Opacus ``compute_rdp`` with q = 1)."""
    return _rdp_epsilon(noise_multiplier, 1.0, rounds, delta)


@dataclass(frozen=True)
class ComposedBudget:
    """A node's output-DP budget over the rounds it took part in: the tighter bound, and both."""

    epsilon: float
    delta: float
    method: str  # "basic" or "rdp"
    rounds: int
    basic_epsilon: float
    rdp_epsilon: float | None  # None for Laplace


def compose_rounds(
    mechanism: str,
    epsilon: float,
    delta: float,
    rounds: int,
    noise_multiplier: float | None = None,
) -> ComposedBudget:
    """Compose ``rounds`` per-round (epsilon, delta) releases of one node.

    Both bounds are taken at the same total delta (``rounds * delta``) so they compare like
    with like: basic gives ``rounds * epsilon``; for Gaussian, RDP on ``noise_multiplier``
    (from the ``OutputNoiseReport``) usually gives much less after a few rounds. Laplace:
    basic only (pure epsilon, total delta 0).
    """
    basic_eps, basic_delta = compose_basic(epsilon, delta, rounds)
    if mechanism == "laplace":
        return ComposedBudget(basic_eps, basic_delta, "basic", rounds, basic_eps, None)
    if mechanism != "gaussian" or noise_multiplier is None:
        raise ValueError("Gaussian composition needs mechanism='gaussian' and noise_multiplier")
    if rounds == 0:
        return ComposedBudget(0.0, 0.0, "basic", 0, 0.0, 0.0)
    rdp_eps = (
        compose_rdp_gaussian(noise_multiplier, rounds, basic_delta) if basic_delta < 1 else math.inf
    )
    if rdp_eps < basic_eps:
        return ComposedBudget(rdp_eps, basic_delta, "rdp", rounds, basic_eps, rdp_eps)
    return ComposedBudget(basic_eps, basic_delta, "basic", rounds, basic_eps, rdp_eps)


def central_dp_epsilon(
    noise_multiplier: float, sample_rate: float, rounds: int, delta: float
) -> float:
    """User-level epsilon of central DP after ``rounds`` rounds.

    Each node's clipped update is one "sample" of the sum the server noises;
    ``sample_rate`` is the fraction of nodes sampled per round, ``noise_multiplier`` the
    server noise std over the clip. The amplification by sampling assumes Poisson
    sampling of nodes; Flower (and this ServerApp) sample a fixed number, for which this is
    an approximation: pass ``sample_rate=1.0`` for a bound that assumes no amplification.
    """
    return _rdp_epsilon(noise_multiplier, sample_rate, rounds, delta)


def sample_rate_for(num_images: int, batch_size: int) -> float:
    """Poisson sampling rate of DP-SGD as Opacus sets it: ``1 / ceil(num_images /
    batch_size)`` (``1 / len(DataLoader)``), which is ``batch_size / num_images`` when the
    batch size divides the data, and at most 1."""
    if num_images < 1 or batch_size < 1:
        raise ValueError(
            f"need num_images >= 1 and batch_size >= 1, got {num_images}, {batch_size}"
        )
    return 1.0 / math.ceil(num_images / batch_size)


def planned_steps(
    rounds: int, local_epochs: int, num_images: int, batch_size: int, participation: float = 1.0
) -> int:
    """Expected DP-SGD steps of one node over the whole run.

    Steps per epoch under Poisson sampling with rate q = batch_size / num_images: 1 / q,
    rounded up (never fewer than Opacus' sampler takes), times local epochs, times the
    rounds the node is expected to join (``rounds * participation``, rounded up). A node
    sampled more often than expected spends more: ``NodeAccountant.budget_spent`` is the
    hard stop; plan with ``participation=1.0`` to be safe.
    """
    if rounds < 0 or local_epochs < 1 or not 0 < participation <= 1:
        raise ValueError(
            f"need rounds >= 0, local_epochs >= 1, participation in (0, 1]; got {rounds}, "
            f"{local_epochs}, {participation}"
        )
    q = sample_rate_for(num_images, batch_size)
    per_epoch = 1 if q >= 1 else math.ceil(num_images / batch_size)
    joined = math.ceil(round(rounds * participation, 9))
    return joined * local_epochs * per_epoch


def noise_multiplier_for(
    target_epsilon: float, delta: float, sample_rate: float, total_steps: int
) -> float:
    """The smallest noise multiplier (to 0.5 % of epsilon) with which ``total_steps``
    DP-SGD steps at ``sample_rate`` stay within (target_epsilon, delta), by Opacus'
    ``get_noise_multiplier(accountant="rdp")``. Plan for the whole run, not per round."""
    require_positive("target_epsilon", target_epsilon)
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 < sample_rate <= 1 or not 0 < delta < 1:
        raise ValueError(f"need sample_rate in (0, 1] and delta in (0, 1): {sample_rate}, {delta}")
    import warnings

    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():  # the search visits sigmas where alpha=63 is optimal
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        sigma = get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=int(total_steps),
            accountant="rdp",
            epsilon_tolerance=0.005 * target_epsilon,
        )
    return float(sigma)


def history_entry(h: Any) -> tuple[float, float, int]:
    try:
        nm, q, steps = h
        nm, q = float(nm), float(q)
        if isinstance(steps, bool) or int(steps) != steps:
            raise ValueError
        steps = int(steps)
    except (TypeError, ValueError):
        raise ValueError(
            f"history entry must be (noise_multiplier, sample_rate, steps): {h!r}"
        ) from None
    if not (math.isfinite(nm) and nm >= 0 and 0 < q <= 1 and steps >= 0):
        raise ValueError(f"need noise_multiplier >= 0, sample_rate in (0, 1], steps >= 0: {h!r}")
    return nm, q, steps


def history_epsilon(history: Iterable[Any], delta: float) -> float:
    """epsilon at ``delta`` of an Opacus-style history ``[(noise_multiplier, sample_rate,
    steps), ...]``, by a fresh ``RDPAccountant`` (for what-if questions; inf if unnoised)."""
    history = [history_entry(h) for h in history]
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    live = [h for h in history if h[2] > 0]
    if not live:
        return 0.0
    if any(nm == 0 for nm, _, _ in live):
        return math.inf
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = list(live)
    return float(acc.get_epsilon(delta=delta))


def compose_releases(releases: list[dict[str, Any]]) -> ComposedBudget:
    """The budget of output-DP releases (``OutputLedger`` entries): RDP or basic composition
    when they share one setting, basic composition of each otherwise."""
    if not releases:
        return ComposedBudget(0.0, 0.0, "basic", 0, 0.0, 0.0)
    settings = {(r["mechanism"], r["epsilon"], r["delta"]) for r in releases}
    if len(settings) != 1:  # a changed setting (mid-run, or across runs of one shard)
        eps = sum(r["epsilon"] for r in releases)
        delta = sum(r["delta"] for r in releases)
        return ComposedBudget(eps, delta, "basic", len(releases), eps, None)
    first = releases[0]
    return compose_rounds(
        first["mechanism"],
        first["epsilon"],
        first["delta"],
        len(releases),
        first["noise_multiplier"],
    )
