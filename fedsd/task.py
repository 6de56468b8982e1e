"""What a node does with one message: set up the model and data, then train or evaluate.

Called from ``client_app.py`` inside the short-lived ClientApp process. The frozen
encoders are only loaded on a latent-cache miss; a cache hit loads the UNet alone.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedsd.config import RunConfig
from fedsd.ml.data.shards import load_split, resolve_shard_dir, split_fingerprint
from fedsd.ml.model import (
    add_lora,
    exchanged_keys,
    get_lora_state,
    load_unet,
    lora_a_digest,
    lora_arrays,
    model_fingerprint,
    resolve_model,
    set_lora_state,
)
from fedsd.ml.training import (
    DpSgd,
    EncodedSplit,
    LatentCache,
    TrainResult,
    encode_split,
    pick_device,
    train_lora,
    validation_loss,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeSettings:
    """Per-node settings from the SuperNode's ``--node-config``."""

    shard_dir: Path
    cache_dir: Path
    partition_id: int = 0
    model: str | None = None  # a node-local copy of the model, overriding the run's
    device: str | None = None

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> NodeSettings:
        """Read ``shard-dir`` (required), ``cache-dir``, ``partition-id``, ``model``, ``device``."""
        if "shard-dir" not in node_config:
            raise ValueError(
                "this SuperNode has no shard: start it with --node-config "
                "'shard-dir=\"/path/to/shard-0\"' (create shards with `fedsd shards`)"
            )
        shard = resolve_shard_dir(str(node_config["shard-dir"]))
        default_cache = Path(os.environ.get("FEDSD_CACHE_DIR", Path.home() / ".cache" / "fedsd"))
        return cls(
            shard_dir=shard,
            cache_dir=Path(str(node_config.get("cache-dir") or default_cache)),
            partition_id=int(node_config.get("partition-id", 0)),
            model=str(node_config["model"]) if node_config.get("model") else None,
            device=str(node_config["device"]) if node_config.get("device") else None,
        )


class NodeTask:
    """The model, scheduler and encoded shard for one ClientApp message."""

    def __init__(self, cfg: RunConfig, node: NodeSettings) -> None:
        self.cfg = cfg
        self.node = node
        self.device = pick_device(node.device)
        self.model_path = resolve_model(node.model or cfg.model)
        self.cache = LatentCache(node.cache_dir)
        self.encoder_fingerprint = model_fingerprint(
            self.model_path, "vae", "text_encoder", "tokenizer"
        )
        self.cache_hits = 0
        self.received_bytes = 0  # the global adapter's payload (set by the ClientApp)
        self._splits: dict[str, EncodedSplit] = {}
        self._encoders: tuple[Any, Any, Any] | None = None
        from diffusers import AutoencoderKL, DDPMScheduler

        self.scheduler = DDPMScheduler.from_pretrained(self.model_path, subfolder="scheduler")
        vae_cfg = AutoencoderKL.load_config(self.model_path, subfolder="vae")
        self.scaling_factor = float(vae_cfg.get("scaling_factor", 0.18215))
        self.unet = add_lora(load_unet(self.model_path, self.device), cfg)

    def encoded(self, split: str) -> EncodedSplit:
        """The shard split's latents and text embeddings, from the cache when possible
        (read once per message: the train handler and ``train`` share it)."""
        if split in self._splits:
            return self._splits[split]
        self._splits[split] = self._encode(split)
        return self._splits[split]

    def _encode(self, split: str) -> EncodedSplit:
        split_dir = self.node.shard_dir / split
        if not (split_dir / "metadata.jsonl").is_file():
            raise FileNotFoundError(f"shard split {split_dir} has no metadata.jsonl")
        key = self.cache.key(
            self.encoder_fingerprint, self.cfg.resolution, split_fingerprint(split_dir)
        )
        hit = self.cache.load(key)
        if hit is not None:
            self.cache_hits += 1
            return hit
        loaded = load_split(split_dir)
        vae, text_encoder, tokenizer = self.encoders()
        enc = encode_split(
            loaded.images,
            loaded.prompts,
            vae,
            text_encoder,
            tokenizer,
            self.cfg.resolution,
            self.device,
            skipped=loaded.skipped,
            desc=f"fedsd node: encoding the {split} split",
        )
        self.cache.store(key, enc)
        return enc

    def encoders(self) -> tuple[Any, Any, Any]:
        """(VAE, text encoder, tokenizer), loaded once per message (encoding, generation)."""
        if self._encoders is None:
            from diffusers import AutoencoderKL
            from transformers import CLIPTextModel, CLIPTokenizer

            self._encoders = (
                AutoencoderKL.from_pretrained(self.model_path, subfolder="vae"),
                CLIPTextModel.from_pretrained(self.model_path, subfolder="text_encoder"),
                CLIPTokenizer.from_pretrained(self.model_path, subfolder="tokenizer"),
            )
        return self._encoders

    def load_global(self, arrays: Mapping[str, np.ndarray], a_digest: str | None) -> int:
        """Start from the global adapter (all of it, or B only under FFA-LoRA)."""
        ffa = self.cfg.lora_variant == "ffa"
        if ffa and a_digest is not None:
            mine = lora_a_digest(lora_arrays(self.unet))
            if mine != a_digest:
                raise RuntimeError(
                    f"FFA-LoRA A matrices differ from the server's ({mine} != {a_digest}): "
                    "nodes and server must run the same fedsd version, seed and LoRA config"
                )
        expected = exchanged_keys(list(get_lora_state(self.unet)), self.cfg.lora_variant)
        if sorted(arrays) != expected:
            raise KeyError(
                f"global adapter has {len(arrays)} tensors, expected the {len(expected)} "
                f"{'B ' if ffa else ''}LoRA tensors of this model"
            )
        return set_lora_state(self.unet, arrays, partial=ffa)

    def load_global_flat(self, flat: np.ndarray, a_digest: str | None) -> int:
        """``load_global`` from the one-vector wire format (``fedsd.fl.payload``)."""
        from fedsd.fl.payload import shapes_of, unpack

        return self.load_global(unpack(flat, shapes_of(self.outgoing())), a_digest)

    def outgoing(self) -> dict[str, np.ndarray]:
        """The tensors this node sends back."""
        arrays = lora_arrays(self.unet)
        return {k: arrays[k] for k in exchanged_keys(list(arrays), self.cfg.lora_variant)}

    def train(self, server_round: int, dp: Any = None) -> TrainResult:
        """Local epochs on the shard's train split; DP-SGD when ``dp`` (a
        ``fedsd.privacy.node.DpSgdPlan``) is given."""
        data = self.encoded("train")
        if len(data) == 0:
            raise ValueError(f"shard {self.node.shard_dir} has no readable training image")
        seed = self.cfg.seed * 1_000_003 + server_round * 1009 + self.node.partition_id
        result = train_lora(
            self.unet,
            data,
            self.scheduler,
            self.cfg,
            self.device,
            scaling_factor=self.scaling_factor,
            seed=seed,
            dp=None
            if dp is None
            else DpSgd(dp.noise_multiplier, dp.max_grad_norm, self.cfg.privacy.dp_grad_sample_mode),
        )
        return result

    def evaluate(self) -> tuple[float, int]:
        """Validation loss of the current adapter and the number of validation images."""
        data = self.encoded("val")
        loss = validation_loss(
            self.unet,
            data,
            self.scheduler,
            self.cfg,
            self.device,
            scaling_factor=self.scaling_factor,
        )
        return loss, len(data)
