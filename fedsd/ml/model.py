"""The model: a diffusers Stable Diffusion checkpoint with peft LoRA on the UNet.

What travels between server and nodes is the LoRA state as named numpy arrays in one
fixed (sorted) order. Keys are peft's adapter-free names (``...to_q.lora_A.weight``);
loading refuses any missing or unexpected key, which is exactly the bug that kept the
reference examples from ever federating (0 of 108 keys matched).

Initial LoRA values come from ``init_lora_arrays``: A is drawn per tensor from a
generator seeded by (seed, tensor name), B is zero. Server and nodes compute it
independently and get identical bits, which is what lets FFA-LoRA freeze A and send
only B.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # heavy imports stay out of module import time
    import torch
    from diffusers import UNet2DConditionModel

    from fedsd.config import RunConfig

ADAPTER_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
ADAPTER_INFO_NAME = "fedsd_adapter.json"


class ModelNotFoundError(FileNotFoundError):
    """The base model is neither a local diffusers directory nor reachable on the hub."""


def resolve_model(model: str) -> str:
    """Return a loadable model reference, or explain how to provide it.

    A local directory must be a diffusers pipeline (``model_index.json`` and ``unet/``).
    A hub id is used as is; when the hub is unreachable or ``HF_HUB_OFFLINE=1`` and the
    model is not in the local hub cache, ``ModelNotFoundError`` says what to do.
    """
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "unet" / "config.json").is_file():
            raise ModelNotFoundError(
                f"model directory {path} is not a diffusers pipeline (no unet/config.json); "
                "save one with StableDiffusionPipeline.save_pretrained(DIR) or "
                "`fedsd tiny-model --out DIR` for a smoke test"
            )
        return str(path.resolve())
    if model.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"model directory {model} does not exist")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        return snapshot_download(
            model,
            local_files_only=offline,
            allow_patterns=["*.json", "*.txt", "unet/*", "vae/*", "text_encoder/*", "tokenizer/*"],
            ignore_patterns=["*.bin", "*.ckpt", "*.onnx", "*fp16*", "*.msgpack"],
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise ModelNotFoundError(
            f"model {model!r} is not in the local Hugging Face cache and the hub "
            f"{'is disabled (HF_HUB_OFFLINE=1)' if offline else 'could not be reached'}. "
            f"On a machine with access run `huggingface-cli download {model}` (or "
            f"StableDiffusionPipeline.from_pretrained({model!r}).save_pretrained(DIR)) and "
            "pass the directory as --model / model=DIR, or mount the hub cache (HF_HOME)."
        ) from exc


def model_fingerprint(model_path: str, *components: str) -> str:
    """A short stable id of the given components' configs and weight files (for caches)."""
    h = hashlib.sha256()
    root = Path(model_path)
    for comp in components:
        for f in sorted((root / comp).glob("*")):
            if f.is_file():
                st = f.stat()
                h.update(f"{comp}/{f.name}:{st.st_size}".encode())
                if f.suffix in (".json", ".txt"):
                    h.update(f.read_bytes())
                else:
                    h.update(str(st.st_mtime_ns).encode())
    return h.hexdigest()[:16]


def lora_config(cfg: RunConfig) -> Any:
    """The peft LoraConfig for the UNet attention projections."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        target_modules=list(cfg.lora_targets),
        init_lora_weights=True,
    )


def load_unet(model_path: str, device: Any = "cpu", dtype: Any = None) -> UNet2DConditionModel:
    """Load the UNet with every base weight frozen."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model_path, subfolder="unet", dtype=dtype)
    unet.requires_grad_(False)
    return unet.to(device)


def add_lora(unet: UNet2DConditionModel, cfg: RunConfig) -> UNet2DConditionModel:
    """Attach LoRA, set its deterministic initial values, and mark what trains.

    Only LoRA parameters require grad (asserted); with FFA-LoRA only the B matrices do.
    """
    unet.requires_grad_(False)
    unet.add_adapter(lora_config(cfg))
    shapes = {k: tuple(v.shape) for k, v in get_lora_state(unet).items()}
    set_lora_state(unet, init_lora_arrays(shapes, cfg.seed))
    for name, param in unet.named_parameters():
        is_lora = ".lora_A." in name or ".lora_B." in name
        param.requires_grad_(is_lora and not (cfg.lora_variant == "ffa" and ".lora_A." in name))
    assert_only_lora_trains(unet)
    return unet


def assert_only_lora_trains(unet: Any) -> None:
    """Fail loudly if any non-LoRA parameter would be trained (reference defect 3)."""
    bad = [n for n, p in unet.named_parameters() if p.requires_grad and ".lora_" not in n]
    if bad:
        raise RuntimeError(f"{len(bad)} non-LoRA parameters require grad, e.g. {bad[:3]}")
    if not any(p.requires_grad for p in unet.parameters()):
        raise RuntimeError("no LoRA parameter requires grad: nothing would train")


def _peft_key(name: str) -> str:
    """``...to_q.lora_A.default.weight`` -> ``...to_q.lora_A.weight``."""
    return name.replace(".default.", ".")


def get_lora_state(unet: Any) -> dict[str, torch.Tensor]:
    """The LoRA tensors by adapter-free peft name, sorted (the wire order)."""
    out = {}
    for name, param in unet.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            out[_peft_key(name)] = param
    return dict(sorted(out.items()))


def lora_arrays(unet: Any) -> dict[str, np.ndarray]:
    """LoRA state as float32 numpy arrays in wire order (a copy)."""
    return {k: v.detach().to("cpu").float().numpy().copy() for k, v in get_lora_state(unet).items()}


def set_lora_state(unet: Any, arrays: Mapping[str, np.ndarray], *, partial: bool = False) -> int:
    """Copy named arrays into the UNet's LoRA parameters; return how many were set.

    Every key must exist with the same shape. Unless ``partial`` (FFA-LoRA: only B is
    sent), every LoRA tensor must be covered too. Any mismatch raises, naming the keys.
    """
    import torch

    params = get_lora_state(unet)
    unexpected = sorted(set(arrays) - set(params))
    missing = [] if partial else sorted(set(params) - set(arrays))
    if unexpected or missing:
        raise KeyError(
            f"LoRA state mismatch: {len(unexpected)} unexpected keys (e.g. {unexpected[:2]}), "
            f"{len(missing)} missing keys (e.g. {missing[:2]}); was the adapter made with the "
            "same lora-rank and lora-targets?"
        )
    with torch.no_grad():
        for key, value in arrays.items():
            param = params[key]
            if tuple(param.shape) != tuple(value.shape):
                raise ValueError(f"LoRA tensor {key}: shape {value.shape} != {tuple(param.shape)}")
            param.copy_(torch.from_numpy(np.asarray(value)).to(param.dtype))
    return len(arrays)


def init_lora_arrays(shapes: Mapping[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    """Deterministic initial LoRA: A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (peft's
    kaiming-uniform default), B = 0. Each tensor has its own stream seeded by
    (seed, crc32(name)), so the values do not depend on the order of tensors or device.
    """
    out: dict[str, np.ndarray] = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if ".lora_A." in name:
            fan_in = int(np.prod(shape[1:]))
            bound = 1.0 / np.sqrt(fan_in)
            rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
            out[name] = rng.uniform(-bound, bound, size=shape).astype(np.float32)
        else:
            out[name] = np.zeros(shape, dtype=np.float32)
    return out


def lora_shapes(model_path: str, cfg: RunConfig) -> dict[str, tuple[int, ...]]:
    """LoRA tensor shapes for a model, without loading (or even allocating) its weights."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionModel.load_config(model_path, subfolder="unet")
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config)
        unet.add_adapter(lora_config(cfg))
    return {k: tuple(v.shape) for k, v in get_lora_state(unet).items()}


def exchanged_keys(keys: list[str] | Any, variant: str) -> list[str]:
    """The LoRA keys that travel: all of them, or only B for FFA-LoRA."""
    return [k for k in sorted(keys) if variant != "ffa" or ".lora_B." in k]


def adapter_files(
    arrays: Mapping[str, np.ndarray], cfg: RunConfig, info: dict[str, Any]
) -> dict[str, bytes]:
    """The files of an adapter that ``StableDiffusionPipeline.load_lora_weights`` reads.

    Serialised in memory, so that writing them (``fedsd.common.atomic``) raises a plain OSError on
    a full disk rather than a safetensors error.
    """
    from safetensors.numpy import save

    # diffusers' LoRA format for the UNet: peft names under the "unet." prefix, and the
    # LoraConfig as "unet."-prefixed metadata so a non-default lora_alpha is honoured.
    tensors = {f"unet.{k}": np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()}
    lora_meta = {
        k: sorted(v) if isinstance(v, set) else v for k, v in lora_config(cfg).to_dict().items()
    }
    packed = {f"unet.{k}": v for k, v in lora_meta.items()}
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(packed, sort_keys=True)}
    meta = {
        **info,
        "lora_rank": cfg.lora_rank,
        "lora_alpha": cfg.lora_alpha,
        "lora_targets": list(cfg.lora_targets),
        "variant": cfg.lora_variant,
    }
    return {
        ADAPTER_WEIGHT_NAME: save(tensors, metadata=metadata),
        ADAPTER_INFO_NAME: (json.dumps(meta, indent=2) + "\n").encode("utf-8"),
    }


def save_adapter(
    arrays: Mapping[str, np.ndarray], out_dir: str | Path, cfg: RunConfig, info: dict[str, Any]
) -> Path:
    """Write an adapter that ``StableDiffusionPipeline.load_lora_weights(out_dir)`` reads.

    Atomic and durable (``fedsd.common.atomic.write_dir``): after a crash ``out_dir`` is the old
    adapter or the new one, never a half-written one.
    """
    from fedsd.common.atomic import write_dir

    return write_dir(out_dir, adapter_files(arrays, cfg, info))


def load_adapter_arrays(adapter_dir: str | Path) -> dict[str, np.ndarray]:
    """Read an adapter written by ``save_adapter`` back into wire-format arrays."""
    from safetensors.numpy import load_file

    raw = load_file(str(Path(adapter_dir) / ADAPTER_WEIGHT_NAME))
    return dict(sorted((k.removeprefix("unet."), v) for k, v in raw.items()))


def lora_a_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """Digest of the A matrices: server and nodes must agree on them under FFA-LoRA."""
    h = hashlib.sha256()
    for k in sorted(arrays):
        if ".lora_A." in k:
            h.update(k.encode())
            h.update(np.ascontiguousarray(arrays[k], dtype=np.float32).tobytes())
    return h.hexdigest()[:16]


def write_tiny_pipeline(out: str | Path, seed: int = 0) -> Path:
    """Write a tiny, randomly initialised SD-1.x-shaped pipeline in diffusers format.

    NOT a real model: it generates noise. It exists so the whole stack (tokenizer, text
    encoder, VAE with 8x downsampling, cross-attention UNet, scheduler, LoRA) can be run
    and tested offline in seconds on a CPU.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
    )
    text = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "projection_dim": 32,
    }
    readme = (
        "# fedsd tiny random pipeline\n\nNOT A REAL MODEL: random weights, for smoke runs "
        "and tests only. Made by `fedsd tiny-model`.\n"
    )
    return write_random_pipeline(out, unet=unet, vae=vae, text_config=text, readme=readme)


def write_random_pipeline(
    out: str | Path, *, unet: Any, vae: Any, text_config: dict[str, Any], readme: str
) -> Path:
    """Save a StableDiffusionPipeline around the given (random) UNet and VAE.

    Adds a CLIP text encoder built from ``text_config`` (with the byte-level tokenizer's
    vocabulary), an SD-1.x PNDM scheduler, no safety checker, and a README saying what
    the model is. Shared by ``fedsd tiny-model`` and the benchmarks' Tiny-SD-shaped model.
    """
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    out = Path(out)
    tokenizer = byte_clip_tokenizer()
    vocab = tokenizer.get_vocab()
    config = {"vocab_size": len(vocab), "max_position_embeddings": 77, **text_config}
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            **config,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        )
    )
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(out))
    (out / "README.md").write_text(readme)
    return out


def byte_clip_tokenizer() -> Any:
    """An offline byte-level CLIP tokenizer (no merges: one token per byte).

    transformers 5 ignores ``vocab_file=``/``merges_file=``, so the vocabulary is passed
    in directly.
    """
    from transformers import CLIPTokenizer

    vocab, merges = _byte_bpe_vocab()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _byte_bpe_vocab() -> tuple[dict[str, int], list[str]]:
    """A byte-level CLIP BPE vocabulary with no merges: every byte is a token."""
    # GPT-2/CLIP byte-to-unicode table: printable bytes map to themselves, the rest
    # to code points from 256 upwards, so every byte has a visible character.
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(extra)}
    chars = [table[b] for b in range(256)]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, []
