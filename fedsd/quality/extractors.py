"""The feature extractors behind the quality figures, and where a node finds them.

One directory layout for the real extractors and for the tiny stand-ins:

``extractors.json``
    ``{"name": ..., "real": true|false, "feature_dim": d}``; ``real`` false marks random
    stand-ins whose figures are NOT image-quality metrics (they exist for offline smoke runs).
``inception.pt``
    a TorchScript module called as ``m(images, return_features=True)`` on uint8 NCHW images
    of any size, returning ``(N, d)`` features. The real one is NVIDIA's
    ``inception-2015-12-05.pt`` (the TensorFlow FID Inception's pool features, d = 2048, as
    StyleGAN2-ADA and clean-fid use it); torch alone loads it (no torchvision).
``clip/``
    a transformers ``CLIPModel`` and ``CLIPProcessor`` (optional: without it no CLIP score).

A node looks, in order, in its node config's ``quality-extractors``, in
``<model>/fedsd-quality`` (where ``fedsd tiny-model`` writes the stand-ins), and in
``<cache-dir>/quality-extractors`` (where ``fedsd fetch-extractors`` writes the real ones).
The run config cannot choose the directory: loading a TorchScript file runs its program,
so which one runs next to the images is the data owner's choice.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

INFO = "extractors.json"
INCEPTION = "inception.pt"
CLIP = "clip"
#: Inside a model directory: the stand-ins ``fedsd tiny-model`` writes.
MODEL_SUBDIR = "fedsd-quality"
#: Inside a node's cache directory: where ``fedsd fetch-extractors`` writes by default.
CACHE_SUBDIR = "quality-extractors"
INCEPTION_URL = (
    "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/"
    "inception-2015-12-05.pt"
)
CLIP_MODEL = "openai/clip-vit-base-patch16"


class ExtractorsMissing(FileNotFoundError):
    """No feature extractor where a node looks; the message names the command to run."""


def default_dir(cache_dir: str | Path | None = None) -> Path:
    """Where ``fedsd fetch-extractors`` writes unless told otherwise."""
    base = cache_dir or os.environ.get("FEDSD_CACHE_DIR") or Path.home() / ".cache" / "fedsd"
    return Path(base) / CACHE_SUBDIR


def find_dir(model_path: str | Path, cache_dir: str | Path, configured: str | None) -> Path:
    """The extractor directory this node uses (see the module docstring for the order)."""
    candidates = [Path(configured)] if configured else []
    candidates += [Path(model_path) / MODEL_SUBDIR, default_dir(cache_dir)]
    for directory in candidates:
        if (directory / INCEPTION).is_file() and (directory / INFO).is_file():
            return directory
    looked = ", ".join(str(c) for c in candidates)
    raise ExtractorsMissing(
        f"no quality feature extractors on this node (looked in {looked}); on a machine with "
        f"internet run `fedsd fetch-extractors --out {default_dir(cache_dir)}` and copy the "
        "directory here (or set the node config quality-extractors=DIR), or turn the "
        "evaluation off with eval-every=0"
    )


def read_info(directory: str | Path) -> dict[str, Any]:
    """``extractors.json`` of a directory."""
    info = json.loads((Path(directory) / INFO).read_text())
    if not isinstance(info, dict) or not isinstance(info.get("feature_dim"), int):
        raise ValueError(f"{Path(directory) / INFO}: expected name, real and feature_dim")
    return info


def load_inception(directory: str | Path, device: Any) -> Any:
    """The TorchScript feature extractor, in eval mode on ``device``."""
    import warnings

    import torch

    with warnings.catch_warnings():  # the FID Inception exists only as TorchScript
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(Path(directory) / INCEPTION), map_location=device).eval()


def load_clip(directory: str | Path, device: Any) -> tuple[Any, Any] | None:
    """(CLIPModel, CLIPProcessor) from ``clip/``, or None when the directory has none."""
    path = Path(directory) / CLIP
    if not (path / "config.json").is_file():
        return None
    import torch
    from transformers import CLIPModel, CLIPProcessor

    class _Embeddings(torch.nn.Module):
        """CLIPModel whose ``get_*_features`` return the projected embedding tensor, which
        torchmetrics 1.9 expects (transformers 5 returns an output object around it)."""

        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model, self.config = model, model.config

        def get_image_features(self, *args: Any, **kwargs: Any) -> Any:
            out = self.model.get_image_features(*args, **kwargs)
            return getattr(out, "pooler_output", out)

        def get_text_features(self, *args: Any, **kwargs: Any) -> Any:
            out = self.model.get_text_features(*args, **kwargs)
            return getattr(out, "pooler_output", out)

    model = CLIPModel.from_pretrained(str(path)).to(device).eval()
    return _Embeddings(model), CLIPProcessor.from_pretrained(str(path))


def fetch_extractors(out: str | Path, clip_model: str = CLIP_MODEL) -> Path:
    """Download the real extractors into ``out`` (Inception from NVIDIA's CDN, CLIP from
    the Hugging Face hub); refused under ``HF_HUB_OFFLINE``."""
    import urllib.request

    from fedsd.common.atomic import write_file

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise RuntimeError(
            "HF_HUB_OFFLINE is set: fetch-extractors downloads; run it where the internet is "
            "reachable and copy the directory to the nodes"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with urllib.request.urlopen(INCEPTION_URL, timeout=300) as response:  # noqa: S310
        write_file(out / INCEPTION, response.read())
    from transformers import CLIPModel, CLIPProcessor

    CLIPModel.from_pretrained(clip_model).save_pretrained(str(out / CLIP))
    CLIPProcessor.from_pretrained(clip_model).save_pretrained(str(out / CLIP))
    info = {"name": f"inception-2015-12-05 + {clip_model}", "real": True, "feature_dim": 2048}
    write_file(out / INFO, json.dumps(info, indent=2) + "\n")
    return out


def write_tiny_extractors(out: str | Path, seed: int = 0) -> Path:
    """Random stand-ins of both extractors, in the same layout: NOT real metrics.

    A smoke run with ``eval-every=1`` then works offline end to end; its FID and CLIP
    score measure nothing about image quality.
    """
    import warnings

    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    from fedsd.common.atomic import write_file
    from fedsd.ml.model import byte_clip_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    with warnings.catch_warnings():  # the same format as the real one: TorchScript
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(tiny_features()).save(str(out / INCEPTION))
    tokenizer = byte_clip_tokenizer()
    vocab = tokenizer.get_vocab()
    layer = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
    text = {
        **layer,
        "num_attention_heads": 4,
        "vocab_size": len(vocab),
        "max_position_embeddings": 77,
        "bos_token_id": vocab["<|startoftext|>"],
        "eos_token_id": vocab["<|endoftext|>"],
        "pad_token_id": vocab["<|endoftext|>"],
    }
    vision = {**layer, "num_attention_heads": 4, "image_size": 32, "patch_size": 8}
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)
    CLIPModel(config).save_pretrained(str(out / CLIP))
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ),
        tokenizer=tokenizer,
    )
    processor.save_pretrained(str(out / CLIP))
    info = {"name": "tiny random stand-ins (NOT real metrics)", "real": False, "feature_dim": 64}
    write_file(out / INFO, json.dumps(info, indent=2) + "\n")
    (out / "README.md").write_text(
        "# fedsd tiny feature extractors\n\nNOT REAL METRICS: random weights in the layout "
        "of the real Inception and CLIP extractors, for smoke runs and tests only. Made by "
        "`fedsd tiny-model`; `fedsd fetch-extractors` downloads the real ones.\n"
    )
    return out


def tiny_features() -> Any:
    """A new random tiny feature extractor (the stand-in for Inception), not yet scripted."""
    import torch

    class _Tiny(torch.nn.Module):
        """Two random convolutions and a mean: (N, 64) features of any uint8 image."""

        def __init__(self) -> None:
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 16, 3, stride=2, padding=1)
            self.conv2 = torch.nn.Conv2d(16, 64, 3, stride=2, padding=1)

        def forward(self, x: torch.Tensor, return_features: bool = True) -> torch.Tensor:
            x = torch.nn.functional.interpolate(
                x.float() / 255.0, size=(32, 32), mode="bilinear", align_corners=False
            )
            x = torch.relu(self.conv1(x))
            return torch.relu(self.conv2(x)).mean(dim=(2, 3))

    return _Tiny()
