"""One privacy statement per node and round, whatever the mechanism."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class PrivacyRecord:
    """One privacy statement for a node or round, whatever the mechanism.

    ``mechanism`` e.g. "dp-sgd", "output-gaussian", "output-laplace", "central-gaussian",
    "secagg"; the DP numbers are cumulative (epsilon spent so far at delta).
    """

    mechanism: str
    noise_multiplier: float | None
    clip: float | None
    sample_rate: float | None
    steps: int | None
    epsilon: float | None
    delta: float | None
    node_id: int | None = None
    round: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # The data owner's ledger (``fedsd.privacy.node``): whose shard, and what everything
    # that shard was ever trained on has spent with this mechanism (``steps``/``epsilon``
    # above are this run's share). ``prior_*``: the same before this message, which the
    # server compares with what the owner reported last (a wiped ledger goes backwards).
    owner: str | None = None
    lifetime_steps: int | None = None
    lifetime_epsilon: float | None = None
    prior_steps: int | None = None
    prior_epsilon: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON (infinite epsilon stays ``inf``: no guarantee)."""
        out = dataclasses.asdict(self)
        out["extra"] = dict(self.extra)
        for key in _LEDGER_FIELDS:  # only records of a data owner's ledger carry them
            if out[key] is None:
                del out[key]
        return out


_LEDGER_FIELDS = ("owner", "lifetime_steps", "lifetime_epsilon", "prior_steps", "prior_epsilon")
