"""The run configuration: one typed place, validated once, before round 1.

Flower hands a run config to both the ServerApp and every ClientApp as a flat
``{"kebab-key": value}`` mapping (defaults from ``[tool.flwr.app.config]`` in
pyproject.toml, overridden by ``flwr run --run-config``). ``RunConfig.from_mapping``
turns it into a frozen dataclass and refuses bad values with a message that names
the key, the value and what is allowed, so a typo never costs a training round.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

LORA_VARIANTS = ("lora", "ffa")


class ConfigError(ValueError):
    """An invalid run-config value; the message names the key and what is allowed."""


@dataclass(frozen=True)
class RunConfig:
    """Everything a federated fine-tuning run needs, shared by server and clients."""

    model: str = "segmind/tiny-sd"
    num_server_rounds: int = 3
    fraction_train: float = 1.0
    min_nodes: int = 2
    local_epochs: int = 1
    batch_size: int = 4
    learning_rate: float = 1e-4
    lora_rank: int = 8
    lora_alpha: float = 8.0
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    lora_variant: str = "lora"
    resolution: int = 512
    seed: int = 0
    eval_timesteps: int = 8
    max_train_images: int = 0
    out_dir: str = "fedsd-out"
    round_timeout: float = 3600.0
    # Reply validation (fedsd.validation) and the aggregation rule (fedsd.aggregation)
    max_update_norm: float = 10_000.0
    max_node_weight: float = 1_000_000.0
    aggregation: str = "fedavg"
    trim_fraction: float = 0.2
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    # fedsd.privacy.PrivacyConfig, built from the privacy keys of the same mapping
    privacy: Any = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.privacy is None:
            from fedsd.privacy import PrivacyConfig

            object.__setattr__(self, "privacy", PrivacyConfig())

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> RunConfig:
        """Build and validate from a Flower run config (kebab-case keys)."""
        known = {
            f.name.replace("_", "-"): f
            for f in dataclasses.fields(cls)
            if f.name not in ("extra", "privacy")
        }
        values: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in raw.items():
            f = known.get(key)
            if f is None:
                extra[key] = value
                continue
            values[f.name] = _coerce(key, value, f.type)
        from fedsd.privacy import PrivacyConfig

        cfg = cls(**values, extra=extra, privacy=PrivacyConfig.from_mapping(extra))
        cfg.validate()
        return cfg

    def to_mapping(self) -> dict[str, Any]:
        """The kebab-case mapping Flower uses (round-trips through ``from_mapping``)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in ("extra", "privacy"):
                continue
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = ",".join(value)
            out[f.name.replace("_", "-")] = value
        out.update(self.extra)
        return out

    def validate(self) -> None:
        """Refuse values that would fail (or silently misbehave) later in the run."""
        _require(self.model.strip() != "", "model", self.model, "a hub id or a local directory")
        _require(self.num_server_rounds >= 1, "num-server-rounds", self.num_server_rounds, ">= 1")
        _require(
            0.0 < self.fraction_train <= 1.0, "fraction-train", self.fraction_train, "in (0, 1]"
        )
        _require(self.min_nodes >= 1, "min-nodes", self.min_nodes, ">= 1")
        _require(self.local_epochs >= 1, "local-epochs", self.local_epochs, ">= 1")
        _require(self.batch_size >= 1, "batch-size", self.batch_size, ">= 1")
        _require(
            math.isfinite(self.learning_rate) and 0.0 < self.learning_rate < 1.0,
            "learning-rate",
            self.learning_rate,
            "a finite number in (0, 1)",
        )
        _require(1 <= self.lora_rank <= 256, "lora-rank", self.lora_rank, "in [1, 256]")
        _require(
            math.isfinite(self.lora_alpha) and self.lora_alpha > 0,
            "lora-alpha",
            self.lora_alpha,
            "> 0",
        )
        _require(
            len(self.lora_targets) > 0 and all(t.strip() for t in self.lora_targets),
            "lora-targets",
            ",".join(self.lora_targets),
            "a comma-separated list of module names such as 'to_q,to_k,to_v,to_out.0'",
        )
        _require(
            self.lora_variant in LORA_VARIANTS,
            "lora-variant",
            self.lora_variant,
            f"one of {', '.join(LORA_VARIANTS)}",
        )
        _require(
            self.resolution >= 8 and self.resolution % 8 == 0,
            "resolution",
            self.resolution,
            "a multiple of 8 that is >= 8 (the VAE downsamples by 8)",
        )
        _require(self.eval_timesteps >= 1, "eval-timesteps", self.eval_timesteps, ">= 1")
        _require(self.max_train_images >= 0, "max-train-images", self.max_train_images, ">= 0")
        _require(self.out_dir.strip() != "", "out-dir", self.out_dir, "a directory path")
        _require(self.round_timeout > 0, "round-timeout", self.round_timeout, "> 0 seconds")
        _require(
            math.isfinite(self.max_update_norm) and self.max_update_norm > 0,
            "max-update-norm",
            self.max_update_norm,
            "a finite L2 norm > 0 (a node's update above it is rejected)",
        )
        _require(
            math.isfinite(self.max_node_weight) and self.max_node_weight > 0,
            "max-node-weight",
            self.max_node_weight,
            "a finite weight > 0 (a node's num-examples above it is rejected)",
        )
        from fedsd.aggregation import AGGREGATIONS

        _require(
            self.aggregation in AGGREGATIONS,
            "aggregation",
            self.aggregation,
            f"one of {', '.join(AGGREGATIONS)}",
        )
        _require(
            0.0 <= self.trim_fraction < 0.5,
            "trim-fraction",
            self.trim_fraction,
            "in [0, 0.5) (the share of nodes cut from each end per value)",
        )
        comps = self.privacy.components if self.privacy is not None else frozenset()
        if self.aggregation != "fedavg":
            _require(
                "secagg" not in comps,
                "aggregation",
                self.aggregation,
                f"'fedavg' with privacy={self.privacy.privacy!r}: under SecAgg+ the server "
                "sees only the sum of the updates, so no robust rule can run; a node's "
                "influence there is bounded by secagg-clipping-range x secagg-max-weight",
            )
            _require(
                "dp-central" not in comps,
                "aggregation",
                self.aggregation,
                f"'fedavg' with privacy={self.privacy.privacy!r}: the central noise is "
                "calibrated to the mean's sensitivity (dp-central-clip / nodes)",
            )
        if self.privacy is not None and "secagg" in self.privacy.components:
            _require(
                self.min_nodes >= 2,
                "min-nodes",
                self.min_nodes,
                f">= 2 with privacy={self.privacy.privacy!r} (SecAgg+ needs 2+ nodes per round)",
            )


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"invalid run config: {key}={value!r}; expected {allowed}")


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Convert a TOML/CLI value to the field's type, refusing lossy conversions."""
    typ = str(typ)
    try:
        if typ == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if typ == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if typ == "str":
            if not isinstance(value, str):
                raise ValueError
            return value
        if typ.startswith("tuple"):
            if isinstance(value, str):
                return tuple(part.strip() for part in value.split(",") if part.strip())
            return tuple(str(v) for v in value)
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise ConfigError(f"invalid run config: {key}={value!r}; expected a value of type {typ}")
