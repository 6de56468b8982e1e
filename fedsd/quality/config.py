"""The quality-evaluation keys of the run config, validated (``RunConfig.quality``)."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedsd.common.coerce import as_float, as_int, require
from fedsd.common.errors import ConfigError

# kebab key -> (field name, coercion)
_KEYS = {
    "eval-every": ("eval_every", as_int),
    "eval-images-per-class": ("eval_images_per_class", as_int),
    "eval-steps": ("eval_steps", as_int),
    "eval-guidance-scale": ("eval_guidance_scale", as_float),
}
#: ``eval-*`` keys that belong to RunConfig itself (the validation loss), not to this config.
_OTHER_EVAL_KEYS = ("eval-timesteps",)


@dataclass(frozen=True)
class QualityConfig:
    """How often and how the nodes score the global adapter's images (FID, KID, CLIP).

    ``eval_every`` = 0 turns it off (the default: it generates images on every node, see
    docs/quality.md for its cost). Otherwise the base model (round 0), every
    ``eval_every``-th round's aggregate and the last round's are scored.
    """

    eval_every: int = 0
    eval_images_per_class: int = 2  # generated per class of a node's validation split
    eval_steps: int = 25  # scheduler steps per generated image
    eval_guidance_scale: float = 7.5

    def __post_init__(self) -> None:
        require(self.eval_every >= 0, "eval-every", self.eval_every, ">= 0 (0 = off)")
        require(
            1 <= self.eval_images_per_class <= 1000,
            "eval-images-per-class",
            self.eval_images_per_class,
            "in [1, 1000]",
        )
        require(1 <= self.eval_steps <= 1000, "eval-steps", self.eval_steps, "in [1, 1000]")
        require(
            0.0 <= self.eval_guidance_scale <= 100.0,
            "eval-guidance-scale",
            self.eval_guidance_scale,
            "in [0, 100] (classifier-free guidance; <= 1 turns it off)",
        )

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> QualityConfig:
        """Build from a run-config mapping; an unknown ``eval-*`` key is refused (a typo
        would silently turn the evaluation off)."""
        values: dict[str, Any] = {}
        for key, value in raw.items():
            spec = _KEYS.get(key)
            if spec is None:
                if key.startswith("eval-") and key not in _OTHER_EVAL_KEYS:
                    known = [*_KEYS, *_OTHER_EVAL_KEYS]
                    close = difflib.get_close_matches(key, known, n=1)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    raise ConfigError(
                        f"invalid run config: unknown evaluation key {key}={value!r}{hint}; "
                        f"known: {', '.join(known)}"
                    )
                continue
            name, coerce = spec
            values[name] = coerce(key, value)
        return cls(**values)

    @property
    def enabled(self) -> bool:
        """Whether any round is scored."""
        return self.eval_every > 0

    def due(self, evaluated_round: int, total_rounds: int) -> bool:
        """Whether round ``evaluated_round``'s aggregate is scored (0 = the base model)."""
        if not self.enabled:
            return False
        return (
            evaluated_round == 0
            or evaluated_round % self.eval_every == 0
            or evaluated_round == total_rounds
        )
