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

from fedsd.common.coerce import coerce, require
from fedsd.common.errors import ConfigError
from fedsd.privacy.config import PrivacyConfig
from fedsd.quality.config import QualityConfig

__all__ = ["LORA_VARIANTS", "ConfigError", "RunConfig"]

LORA_VARIANTS = ("lora", "ffa")
# fields built from ``extra`` (each feature owns its keys), not run-config keys themselves
_SUB_CONFIGS = ("extra", "privacy", "quality")


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
    # Reply validation (fedsd.fl.validation) and the aggregation rule (fedsd.fl.aggregation)
    max_update_norm: float = 10_000.0
    max_node_weight: float = 1_000_000.0
    aggregation: str = "fedavg"
    trim_fraction: float = 0.2
    # What a node's update travels as (fedsd.fl.payload.UPDATE_DTYPES)
    update_dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    # built from the privacy keys of the same mapping
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig, compare=False)
    # built from the image-quality evaluation keys (eval-every, ...) of the same mapping
    quality: QualityConfig = field(default_factory=QualityConfig, compare=False)

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> RunConfig:
        """Build and validate from a Flower run config (kebab-case keys)."""
        known = {
            f.name.replace("_", "-"): f
            for f in dataclasses.fields(cls)
            if f.name not in _SUB_CONFIGS
        }
        values: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in raw.items():
            f = known.get(key)
            if f is None:
                extra[key] = value
                continue
            values[f.name] = coerce(key, value, str(f.type))
        cfg = cls(
            **values,
            extra=extra,
            privacy=PrivacyConfig.from_mapping(extra),
            quality=QualityConfig.from_mapping(extra),
        )
        cfg.validate()
        return cfg

    def to_mapping(self) -> dict[str, Any]:
        """The kebab-case mapping Flower uses (round-trips through ``from_mapping``)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in _SUB_CONFIGS:
                continue
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = ",".join(value)
            out[f.name.replace("_", "-")] = value
        out.update(self.extra)
        return out

    def validate(self) -> None:
        """Refuse values that would fail (or silently misbehave) later in the run."""
        require(self.model.strip() != "", "model", self.model, "a hub id or a local directory")
        require(self.num_server_rounds >= 1, "num-server-rounds", self.num_server_rounds, ">= 1")
        require(
            0.0 < self.fraction_train <= 1.0, "fraction-train", self.fraction_train, "in (0, 1]"
        )
        require(self.min_nodes >= 1, "min-nodes", self.min_nodes, ">= 1")
        require(self.local_epochs >= 1, "local-epochs", self.local_epochs, ">= 1")
        require(self.batch_size >= 1, "batch-size", self.batch_size, ">= 1")
        require(
            math.isfinite(self.learning_rate) and 0.0 < self.learning_rate < 1.0,
            "learning-rate",
            self.learning_rate,
            "a finite number in (0, 1)",
        )
        require(1 <= self.lora_rank <= 256, "lora-rank", self.lora_rank, "in [1, 256]")
        require(
            math.isfinite(self.lora_alpha) and self.lora_alpha > 0,
            "lora-alpha",
            self.lora_alpha,
            "> 0",
        )
        require(
            len(self.lora_targets) > 0 and all(t.strip() for t in self.lora_targets),
            "lora-targets",
            ",".join(self.lora_targets),
            "a comma-separated list of module names such as 'to_q,to_k,to_v,to_out.0'",
        )
        require(
            self.lora_variant in LORA_VARIANTS,
            "lora-variant",
            self.lora_variant,
            f"one of {', '.join(LORA_VARIANTS)}",
        )
        require(
            self.resolution >= 8 and self.resolution % 8 == 0,
            "resolution",
            self.resolution,
            "a multiple of 8 that is >= 8 (the VAE downsamples by 8)",
        )
        require(self.eval_timesteps >= 1, "eval-timesteps", self.eval_timesteps, ">= 1")
        require(self.max_train_images >= 0, "max-train-images", self.max_train_images, ">= 0")
        require(self.out_dir.strip() != "", "out-dir", self.out_dir, "a directory path")
        require(self.round_timeout > 0, "round-timeout", self.round_timeout, "> 0 seconds")
        require(
            math.isfinite(self.max_update_norm) and self.max_update_norm > 0,
            "max-update-norm",
            self.max_update_norm,
            "a finite L2 norm > 0 (a node's update above it is rejected)",
        )
        require(
            math.isfinite(self.max_node_weight) and self.max_node_weight > 0,
            "max-node-weight",
            self.max_node_weight,
            "a finite weight > 0 (a node's num-examples above it is rejected)",
        )
        from fedsd.fl.aggregation import AGGREGATIONS

        require(
            self.aggregation in AGGREGATIONS,
            "aggregation",
            self.aggregation,
            f"one of {', '.join(AGGREGATIONS)}",
        )
        require(
            0.0 <= self.trim_fraction < 0.5,
            "trim-fraction",
            self.trim_fraction,
            "in [0, 0.5) (the share of nodes cut from each end per value)",
        )
        from fedsd.fl.payload import UPDATE_DTYPES

        require(
            self.update_dtype in UPDATE_DTYPES,
            "update-dtype",
            self.update_dtype,
            f"one of {', '.join(UPDATE_DTYPES)} (what a node's update travels as)",
        )
        comps = self.privacy.components if self.privacy is not None else frozenset()
        if self.aggregation != "fedavg":
            require(
                "secagg" not in comps,
                "aggregation",
                self.aggregation,
                f"'fedavg' with privacy={self.privacy.privacy!r}: under SecAgg+ the server "
                "sees only the sum of the updates, so no robust rule can run; a node's "
                "influence there is bounded by secagg-clipping-range x secagg-max-weight",
            )
            require(
                "dp-central" not in comps,
                "aggregation",
                self.aggregation,
                f"'fedavg' with privacy={self.privacy.privacy!r}: the central noise is "
                "calibrated to the mean's sensitivity (dp-central-clip / nodes)",
            )
        if "secagg" in comps:
            require(
                self.update_dtype == "float32",
                "update-dtype",
                self.update_dtype,
                f"'float32' with privacy={self.privacy.privacy!r}: SecAgg+ sends its own "
                "quantized vector (secagg-quantization-range), never the update's dtype",
            )
            require(
                self.min_nodes >= 2,
                "min-nodes",
                self.min_nodes,
                f">= 2 with privacy={self.privacy.privacy!r} (SecAgg+ needs 2+ nodes per round)",
            )
