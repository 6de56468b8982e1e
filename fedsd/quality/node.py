"""What a node computes for the quality figures of one adapter.

The node generates images with the adapter it received from prompts of its own validation
split (``eval-images-per-class`` per class, fixed seeds derived from the shard and the run
seed, ``eval-steps`` scheduler steps), extracts features of those and of its held-out
images, and replies with sufficient statistics only: for FID the count, sum and sum of
outer products of each set (torchmetrics' own FID state, so the server's sum over nodes is
an exact pooled FID), its own KID, and the sum of its CLIP scores. No image leaves the node.

Runs inside the ClientApp process; torch, diffusers and torchmetrics are imported here.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedsd.quality.config import QualityConfig

#: reply arrays <-> torchmetrics' FrechetInceptionDistance state
FID_ARRAYS = {
    "real-sum": "real_features_sum",
    "real-cov-sum": "real_features_cov_sum",
    "fake-sum": "fake_features_sum",
    "fake-cov-sum": "fake_features_cov_sum",
}
BATCH = 8


@dataclass
class NodeQuality:
    """One node's statistics for one adapter: ``arrays`` (float64 FID moments) and
    ``metrics`` (counts, KID, CLIP score sum, seconds); ``extractors`` names the extractors."""

    arrays: dict[str, np.ndarray]
    metrics: dict[str, int | float]
    extractors: str


def image_seed(owner: str, run_seed: int, label: int, index: int) -> int:
    """The generator seed of one evaluation image: fixed across rounds (so rounds differ by
    their adapter only) and different across data owners (no duplicate images in the pool)."""
    digest = hashlib.sha256(f"fedsd-quality/1:{owner}:{run_seed}:{label}:{index}".encode())
    return int.from_bytes(digest.digest()[:4], "big")


def evaluate_quality(task: Any, quality: QualityConfig, extractor_dir: Any) -> NodeQuality:
    """Score ``task``'s current adapter (a ``fedsd.task.NodeTask``) on its validation split."""
    import torch

    from fedsd.ml.data.shards import load_split
    from fedsd.privacy.node import data_owner_id
    from fedsd.quality.extractors import load_clip, load_inception, read_info

    t0 = time.perf_counter()
    split = load_split(task.node.shard_dir / "val")
    if len(split) == 0:
        raise ValueError(
            f"shard {task.node.shard_dir} has no readable validation image to score against "
            "(make shards with --val-fraction > 0)"
        )
    info = read_info(extractor_dir)
    res = task.cfg.resolution
    real = torch.cat(
        [_to_uint8(split.images[i : i + BATCH], res) for i in range(0, len(split), BATCH)]
    )
    classes = sorted(
        {label: prompt for label, prompt in zip(split.labels, split.prompts, strict=True)}.items()
    )
    owner = data_owner_id(task.node.shard_dir)
    jobs = [
        (prompt, image_seed(owner, task.cfg.seed, label, i))
        for label, prompt in classes
        for i in range(quality.eval_images_per_class)
    ]
    t_gen = time.perf_counter()
    fake = _generate(task, quality, jobs)
    generation_seconds = time.perf_counter() - t_gen

    inception = load_inception(extractor_dir, task.device)
    real_f, fake_f = (
        features(inception, real, task.device),
        features(inception, fake, task.device),
    )
    arrays = fid_state(real_f, fake_f)
    metrics: dict[str, int | float] = {
        "real-images": len(real_f),
        "generated-images": len(fake_f),
        "kid": _kid(real_f, fake_f, task.cfg.seed),
        "clip-score-sum": 0.0,
        "clip-images": 0,
        "generation-seconds": generation_seconds,
    }
    clip = load_clip(extractor_dir, task.device)
    if clip is not None:
        from torchmetrics.multimodal.clip_score import CLIPScore

        scorer = CLIPScore(model_name_or_path=lambda: clip)
        for i in range(0, len(fake), BATCH):
            scorer.update(fake[i : i + BATCH].to(task.device), [p for p, _ in jobs[i : i + BATCH]])
        metrics["clip-score-sum"] = float(scorer.score)
        metrics["clip-images"] = int(scorer.n_samples)
    metrics["quality-seconds"] = time.perf_counter() - t0
    return NodeQuality(arrays, metrics, str(info["name"]))


def fid_state(real: Any, fake: Any) -> dict[str, np.ndarray]:
    """torchmetrics' FID state of two (N, d) feature sets, as the reply's arrays."""
    from fedsd.quality.pooled import fid_metric

    fid = fid_metric(real.shape[1])
    fid.update(real, real=True)
    fid.update(fake, real=False)
    return {wire: getattr(fid, state).numpy() for wire, state in FID_ARRAYS.items()}


def features(inception: Any, images: Any, device: Any = "cpu") -> Any:
    """(N, d) float64 features of uint8 NCHW images, in batches."""
    import torch

    with torch.no_grad():
        parts = [
            inception(images[i : i + BATCH].to(device), return_features=True).double().cpu()
            for i in range(0, len(images), BATCH)
        ]
    return torch.cat(parts)


def _to_uint8(images: list[Any], res: int) -> Any:
    """PIL images, centre-cropped square and resized to ``res``, as uint8 NCHW."""
    import torch
    from PIL import Image

    out = []
    for im in images:
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        square = im.crop((left, top, left + side, top + side)).resize((res, res), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(square, dtype=np.uint8).copy()).permute(2, 0, 1))
    return torch.stack(out)


def _generate(task: Any, quality: QualityConfig, jobs: list[tuple[str, int]]) -> Any:
    """The adapter's images for (prompt, seed) jobs, as uint8 NCHW (on the CPU)."""
    import torch
    from diffusers import StableDiffusionPipeline

    vae, text_encoder, tokenizer = task.encoders()
    pipe = StableDiffusionPipeline.from_pretrained(
        task.model_path,
        unet=task.unet.eval(),
        vae=vae.to(task.device),
        text_encoder=text_encoder.to(task.device),
        tokenizer=tokenizer,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).to(task.device)
    pipe.set_progress_bar_config(disable=True)
    out = []
    res = task.cfg.resolution
    for i in range(0, len(jobs), BATCH):
        batch = jobs[i : i + BATCH]
        images = pipe(
            [p for p, _ in batch],
            num_inference_steps=quality.eval_steps,
            guidance_scale=quality.eval_guidance_scale,
            height=res,
            width=res,
            generator=[torch.Generator(device="cpu").manual_seed(s) for _, s in batch],
            output_type="pt",
        ).images
        out.append((images.clamp(0, 1) * 255).round().to(torch.uint8).cpu())
    return torch.cat(out)


def _kid(real: Any, fake: Any, seed: int) -> float:
    """This node's KID (torchmetrics, subsets drawn with a fixed seed); NaN under 2 images.

    KID needs the features themselves, which stay here: the server averages nodes' KIDs.
    """
    import torch
    from torchmetrics.image.kid import KernelInceptionDistance

    from fedsd.quality.pooled import Precomputed

    size = min(len(real), len(fake), 1000)
    if size < 2:
        return float("nan")
    with warnings.catch_warnings():  # "saves all features": a node's few, by design
        warnings.filterwarnings("ignore", message=".*will save all extracted features")
        kid = KernelInceptionDistance(feature=Precomputed(real.shape[1]), subset_size=size)
    kid.update(real, real=True)
    kid.update(fake, real=False)
    torch.manual_seed(seed)
    mean, _ = kid.compute()
    return float(mean)
