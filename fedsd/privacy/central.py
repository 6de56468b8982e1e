"""Central DP on the server: Gaussian noise on the aggregate, and the round's record of it.

The ServerApp calls ``central_noise`` once per round under ``dp-central`` with the mean of
the clipped updates it aggregated (``fedsd.fl.validation`` re-clips each to the clip and
weighs it 1). numpy and stdlib only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from fedsd.privacy.accounting import central_dp_epsilon
from fedsd.privacy.config import PrivacyConfig
from fedsd.privacy.mechanisms import noise_rng
from fedsd.privacy.record import PrivacyRecord

MECHANISM = "central-gaussian"


def central_noise(
    mean: Mapping[str, np.ndarray],
    aggregated: int,
    server_round: int,
    privacy: PrivacyConfig,
    earlier_rounds: Iterable[Mapping[str, Any]],
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Gaussian noise on the mean of ``aggregated`` clipped updates, and its privacy record.

    Each update is clipped to C on its node and weighs 1, so one node moves the mean by
    at most C/m (m = updates actually aggregated, not the number sampled: a dropout
    raises the sensitivity, and Flower's wrapper, which divides by the number sampled,
    would then under-noise). std = z * C / m, from OS entropy. ``earlier_rounds`` (the
    run's history records) count the releases before this one: epsilon is cumulative.
    """
    z = float(privacy.dp_central_noise_multiplier)
    clip = float(privacy.dp_central_clip)
    std = z * clip / max(1, aggregated)
    rng = noise_rng()
    noised = {
        k: (v.astype(np.float64) + rng.normal(0.0, std, size=v.shape)).astype(np.float32)
        for k, v in mean.items()
    }
    releases = 1 + sum(
        1
        for r in earlier_rounds
        if int(r["round"]) < server_round
        and any(p.get("mechanism") == MECHANISM for p in r.get("privacy", []))
    )
    delta = privacy.dp_delta
    record = PrivacyRecord(
        mechanism=MECHANISM,
        noise_multiplier=z,
        clip=clip,
        sample_rate=1.0,
        steps=releases,
        epsilon=central_dp_epsilon(z, 1.0, releases, delta),
        delta=delta,
        round=server_round,
        extra={
            "std": std,
            "aggregated_nodes": aggregated,
            "level": "node (user-level): one node's whole update",
            "amplification": "none claimed (nodes are not Poisson-sampled)",
        },
    )
    return noised, record.to_dict()
