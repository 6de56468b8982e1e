"""Local training on a node: encode once, then train the UNet's LoRA on cached latents.

The VAE and the text encoder are frozen, so their outputs for a shard never change.
``encode_split`` computes them once (VAE posterior mean and std for each image *and*
its mirror image, one text embedding per distinct prompt) and ``LatentCache`` keeps
them on the node's disk keyed by model, resolution and shard fingerprint. Every later
round loads only the UNet: a fresh ClientApp process per message then costs a file read
instead of a pass of the VAE over the shard. Random flips stay random per epoch (a
coin per sample per epoch picks the mirrored latents) and the latent is sampled from
the cached posterior at every step, as ``latent_dist.sample()`` would.

The loop follows diffusers' ``train_text_to_image_lora.py``: noise, uniform timestep,
``add_noise``, MSE to the epsilon (or v) target. bf16 autocast on CUDA, fp32 on CPU.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fedsd.common.atomic import write_file_with
from fedsd.config import RunConfig

log = logging.getLogger(__name__)
CACHE_FORMAT = 1


def pick_device(requested: str | None = None) -> torch.device:
    """The training device: ``requested`` if given, else CUDA when available, else CPU."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_for(device: torch.device) -> Any:
    """bf16 autocast on CUDA; a no-op context on CPU (fp32 there)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@dataclass
class EncodedSplit:
    """A split's frozen-encoder outputs: what the UNet trains on."""

    latent_mean: torch.Tensor  # [N, 2, C, h, w] fp16; index 1 is the mirrored image
    latent_std: torch.Tensor  # same shape
    text_embeds: torch.Tensor  # [P, L, D] one per distinct prompt
    prompt_index: torch.Tensor  # [N] long: row of text_embeds for each image
    skipped: int = 0

    def __len__(self) -> int:
        return int(self.latent_mean.shape[0])

    def state(self) -> dict[str, Any]:
        """A dict for torch.save."""
        return {
            "format": CACHE_FORMAT,
            "latent_mean": self.latent_mean,
            "latent_std": self.latent_std,
            "text_embeds": self.text_embeds,
            "prompt_index": self.prompt_index,
            "skipped": self.skipped,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> EncodedSplit:
        """Inverse of ``state``."""
        return cls(
            latent_mean=state["latent_mean"],
            latent_std=state["latent_std"],
            text_embeds=state["text_embeds"],
            prompt_index=state["prompt_index"],
            skipped=int(state["skipped"]),
        )


class LatentCache:
    """Encoded splits on the node's disk, keyed by what determines their content."""

    def __init__(self, cache_dir: str | Path) -> None:
        self.dir = Path(cache_dir)

    def key(self, model_fp: str, resolution: int, split_fp: str) -> str:
        """Cache key: model components' fingerprint, resolution, shard fingerprint."""
        raw = f"v{CACHE_FORMAT}:{model_fp}:{resolution}:{split_fp}"
        return hashlib.sha256(raw.encode()).hexdigest()[:32]

    def path(self, key: str) -> Path:
        """Where an entry lives."""
        return self.dir / f"latents-{key}.pt"

    def load(self, key: str) -> EncodedSplit | None:
        """The cached split, or None if absent or unreadable (then it is rebuilt)."""
        p = self.path(key)
        if not p.is_file():
            return None
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
            if state.get("format") != CACHE_FORMAT:
                return None
            return EncodedSplit.from_state(state)
        except Exception as exc:  # a torn or foreign file is rebuilt, never fatal
            log.warning("ignoring unreadable latent cache %s: %s", p, exc)
            return None

    def store(self, key: str, split: EncodedSplit) -> None:
        """Write atomically (temp file + rename)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        p = self.path(key)
        write_file_with(p, lambda fh: torch.save(split.state(), fh))


def image_tensor(images: list[Any], resolution: int) -> torch.Tensor:
    """PIL images -> [-1, 1] tensors, resized (shorter side) and centre-cropped."""
    import numpy as np
    from PIL import Image

    out = []
    for img in images:
        img = img.convert("RGB")
        w, h = img.size
        scale = resolution / min(w, h)
        img = img.resize(
            (max(resolution, round(w * scale)), max(resolution, round(h * scale))),
            Image.Resampling.BILINEAR,
        )
        w, h = img.size
        left, top = (w - resolution) // 2, (h - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
        arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
        out.append(torch.from_numpy(arr).permute(2, 0, 1))
    return torch.stack(out)


@torch.no_grad()
def encode_split(
    images: list[Any],
    prompts: list[str],
    vae: Any,
    text_encoder: Any,
    tokenizer: Any,
    resolution: int,
    device: torch.device,
    batch_size: int = 8,
    skipped: int = 0,
    desc: str = "encoding images",
) -> EncodedSplit:
    """Run the frozen VAE (image and mirror) and text encoder once over a split, showing
    progress (``desc``): the first round on a node pays this, later rounds hit the cache."""
    from fedsd.common.progress_bar import progress

    vae.to(device).eval()
    text_encoder.to(device).eval()
    means, stds = [], []
    with progress(desc, total=len(images)) as bar:
        for start in range(0, len(images), batch_size):
            pixels = image_tensor(images[start : start + batch_size], resolution).to(device)
            pair = torch.stack([pixels, torch.flip(pixels, dims=[3])], dim=1)  # [B, 2, 3, H, W]
            with autocast_for(device):
                dist = vae.encode(pair.flatten(0, 1)).latent_dist
            mean = dist.mean.float().unflatten(0, (pixels.shape[0], 2))
            std = dist.std.float().unflatten(0, (pixels.shape[0], 2))
            means.append(mean.to("cpu", torch.float16))
            stds.append(std.to("cpu", torch.float16))
            bar.update(pixels.shape[0])
    unique = sorted(set(prompts))
    embeds = []
    for start in range(0, len(unique), 32):
        ids = tokenizer(
            unique[start : start + 32],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        embeds.append(text_encoder(ids)[0].to("cpu", torch.float16))
    row = {p: i for i, p in enumerate(unique)}
    if not images:
        empty = torch.zeros((0, 2, 4, resolution // 8, resolution // 8), dtype=torch.float16)
        return EncodedSplit(
            empty, empty.clone(), torch.zeros(0), torch.zeros(0, dtype=torch.long), skipped
        )
    return EncodedSplit(
        latent_mean=torch.cat(means),
        latent_std=torch.cat(stds),
        text_embeds=torch.cat(embeds),
        prompt_index=torch.tensor([row[p] for p in prompts], dtype=torch.long),
        skipped=skipped,
    )


@dataclass
class TrainResult:
    """What one local training pass reports back to the server."""

    loss: float
    steps: int
    images: int
    seconds: float
    # DP-SGD only: the Opacus accountant history of this pass and its sampling rate
    dp_history: list[tuple[float, float, int]] = field(default_factory=list)
    sample_rate: float | None = None

    @property
    def images_per_second(self) -> float:
        """Training throughput (image-steps per second)."""
        return self.images / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class DpSgd:
    """Sample-level DP-SGD settings for one local training pass (Opacus)."""

    noise_multiplier: float
    max_grad_norm: float
    grad_sample_mode: str = "hooks"


def noise_target(scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, t: Any) -> Any:
    """What the UNet learns to predict: the noise, or v for v-prediction schedulers."""
    pred_type = scheduler.config.prediction_type
    if pred_type == "epsilon":
        return noise
    if pred_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, t)
    raise ValueError(f"unsupported scheduler prediction_type {pred_type!r}")


def train_images(data: EncodedSplit, cfg: RunConfig) -> int:
    """How many of the split's images a local pass uses (``max-train-images`` caps it)."""
    n = len(data)
    return min(n, cfg.max_train_images) if cfg.max_train_images else n


def make_private(
    unet: Any, optimizer: torch.optim.Optimizer, num_images: int, batch_size: int, dp: DpSgd
) -> tuple[Any, Any, Any, Any]:
    """Opacus' one call over model, optimizer and a Poisson loader of image indices.

    Returns ``(private_model, dp_optimizer, loader, privacy_engine)``. The noise generator
    is seeded from OS entropy, never from the run seed (which the server knows).
    """
    import secrets

    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    unet.train()  # Opacus refuses a module in eval mode
    engine = PrivacyEngine(accountant="rdp")
    loader = DataLoader(TensorDataset(torch.arange(num_images)), batch_size=batch_size)
    device = next(p.device for p in unet.parameters())
    noise_gen = torch.Generator(device=device).manual_seed(secrets.randbits(63))
    model, dp_optimizer, dp_loader = engine.make_private(
        module=unet,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        poisson_sampling=True,
        grad_sample_mode=dp.grad_sample_mode,
        noise_generator=noise_gen,
    )
    return model, dp_optimizer, dp_loader, engine


def train_lora(
    unet: Any,
    data: EncodedSplit,
    scheduler: Any,
    cfg: RunConfig,
    device: torch.device,
    *,
    scaling_factor: float,
    seed: int,
    dp: DpSgd | None = None,
) -> TrainResult:
    """Train the UNet's trainable (LoRA) parameters for ``cfg.local_epochs`` epochs.

    Without ``dp``: shuffled batches of ``batch-size``. With ``dp``: Opacus DP-SGD, i.e.
    Poisson-sampled batches (expected size ``batch-size``), per-sample gradients clipped
    to ``max_grad_norm`` and Gaussian noise; the pass's accountant history is returned.
    """
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(seed)
    n = train_images(data, cfg)
    model, engine = unet, None
    if dp is not None:
        model, optimizer, loader, engine = make_private(unet, optimizer, n, cfg.batch_size, dp)
    unet.train()
    total, steps, seen = 0.0, 0, 0
    start = time.perf_counter()
    num_t = scheduler.config.num_train_timesteps
    try:
        for _epoch in range(cfg.local_epochs):
            flips = torch.randint(0, 2, (len(data),), generator=gen)
            if engine is None:
                order = torch.randperm(len(data), generator=gen)[:n]
                batches = [order[b : b + cfg.batch_size] for b in range(0, n, cfg.batch_size)]
            else:
                batches = (idx for (idx,) in loader)
            for idx in batches:
                loss = _step(
                    model,
                    optimizer,
                    data,
                    idx,
                    flips,
                    scheduler,
                    scaling_factor,
                    num_t,
                    gen,
                    device,
                )
                if loss is not None:
                    total += loss * len(idx)
                    seen += len(idx)
                steps += 1
    finally:
        if engine is not None and hasattr(model, "_close"):
            model._close()  # remove Opacus' hooks from the node's UNet
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    result = TrainResult(
        loss=total / max(seen, 1), steps=steps, images=seen, seconds=time.perf_counter() - start
    )
    if engine is not None:
        result.dp_history = [tuple(h) for h in engine.accountant.history]
        result.sample_rate = 1.0 / max(1, math.ceil(n / cfg.batch_size))
    return result


def _step(
    model: Any,
    optimizer: Any,
    data: EncodedSplit,
    idx: torch.Tensor,
    flips: torch.Tensor,
    scheduler: Any,
    scaling_factor: float,
    num_t: int,
    gen: torch.Generator,
    device: torch.device,
) -> float | None:
    """One optimizer step on the cached latents of images ``idx``; None for an empty
    Poisson batch (DP-SGD still takes the step: noise only, and the accountant counts it)."""
    optimizer.zero_grad(set_to_none=True)
    if len(idx) == 0:
        for p in optimizer.params:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        optimizer.step()
        return None
    side = flips[idx]
    mean = data.latent_mean[idx, side].float()
    std = data.latent_std[idx, side].float()
    eps_latent = torch.randn(mean.shape, generator=gen)
    latents = ((mean + std * eps_latent) * scaling_factor).to(device)
    noise = torch.randn(latents.shape, generator=gen).to(device)
    t = torch.randint(0, num_t, (latents.shape[0],), generator=gen).to(device)
    cond = data.text_embeds[data.prompt_index[idx]].float().to(device)
    loss = denoising_loss(model, scheduler, latents, noise, t, cond, device)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite training loss: {float(loss)}")
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def denoising_loss(
    unet: Any,
    scheduler: Any,
    latents: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor,
    device: torch.device,
    *,
    per_sample: bool = False,
) -> torch.Tensor:
    """The diffusion training objective: noise the latents at ``t``, predict, MSE to the
    epsilon (or v) target. Mean over the batch, or one value per sample."""
    noisy = scheduler.add_noise(latents, noise, t)
    with autocast_for(device):
        pred = unet(noisy, t, encoder_hidden_states=cond, return_dict=False)[0]
    target = noise_target(scheduler, latents, noise, t)
    err = F.mse_loss(pred.float(), target.float(), reduction="none")
    return err.mean(dim=(1, 2, 3)) if per_sample else err.mean()


@torch.no_grad()
def validation_loss(
    unet: Any,
    data: EncodedSplit,
    scheduler: Any,
    cfg: RunConfig,
    device: torch.device,
    *,
    scaling_factor: float,
) -> float:
    """Denoising loss at fixed timesteps with fixed noise: comparable across rounds.

    Every image is scored at ``cfg.eval_timesteps`` evenly spaced timesteps with noise
    from a generator seeded by ``cfg.seed``, using the posterior mean latent of the
    un-mirrored image, so only the adapter changes between two evaluations.
    """
    if len(data) == 0:
        return math.nan
    unet.eval()
    num_t = scheduler.config.num_train_timesteps
    k = cfg.eval_timesteps
    timesteps = torch.tensor([int((i + 0.5) * num_t / k) for i in range(k)], dtype=torch.long)
    gen = torch.Generator().manual_seed(cfg.seed + 7919)
    total, count = 0.0, 0
    bs = max(cfg.batch_size, 8)
    for b in range(0, len(data), bs):
        mean = data.latent_mean[b : b + bs, 0].float() * scaling_factor
        cond = data.text_embeds[data.prompt_index[b : b + bs]].float()
        for t_val in timesteps:
            noise = torch.randn(mean.shape, generator=gen)
            t = t_val.repeat(mean.shape[0])
            per = denoising_loss(
                unet,
                scheduler,
                mean.to(device),
                noise.to(device),
                t.to(device),
                cond.to(device),
                device,
                per_sample=True,
            )
            total += float(per.sum())
            count += int(per.numel())
    unet.train()
    return total / count
