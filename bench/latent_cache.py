"""Local training throughput with and without fedsd's latent cache (same data, same steps).

What it measures
----------------
One node's LoRA training on one synthetic shard, two ways, side by side in one process,
from the same initial adapter, with the same batch size, epochs and seed (``--repeats``
times, alternating which arm goes first):

* ``without_cache`` -- what the reference examples (diffusers'
  ``train_text_to_image_lora.py`` and the Flower diffusion examples) do: at *every step*
  the frozen VAE encodes the pixel batch (random horizontal flip per image) and
  ``latent_dist.sample()`` draws the latents, the frozen text encoder embeds the
  tokenized prompts, then the UNet LoRA step (noise, uniform timestep, ``add_noise``,
  MSE, AdamW). The baseline gets its resize/crop and tokenization done once up front,
  for free, so its cost is, if anything, understated and the speedup a lower bound.
* ``with_cache`` -- fedsd's path: ``fedsd.ml.training.encode_split`` once (VAE posterior of
  each image and its mirror, one text embedding per distinct prompt), then
  ``fedsd.ml.training.train_lora`` on the cached latents. Same UNet step.

Both arms use the UNet that ``fedsd.task.NodeTask`` builds (``load_unet`` + ``add_lora``
from the run config) and are reset to the same seeded initial LoRA before they run; an
untimed warm-up step of each kind runs first.

How to read the JSON
--------------------
* ``with_cache.images_per_second`` / ``without_cache.images_per_second``: training
  image-steps per second (images x epochs / seconds of the training loop), the best
  of the repeats (as ``timeit`` does: other load only ever slows a run down);
  ``images_per_second_median`` and ``images_per_second_each`` show the spread.
* ``speedup``: the ratio of the bests (with / without), measured in this run;
  ``speedup_median`` the ratio of the medians, ``speedup_each`` the ratio within each
  repeat. If these disagree a lot the machine was busy (``load_average_before_after``
  is the 1-minute load average; above the core count means other processes competed
  for the CPU): rerun on a quiet machine or raise ``--repeats``.
* ``one_time``: what the cache costs once per (model, resolution, shard):
  ``encode_seconds`` (``encode_split``), ``cache_store_seconds`` and
  ``cache_load_seconds`` (``LatentCache``), each the fastest repeat, ``cache_bytes``; plus
  ``encoder_load_seconds``: loading the VAE and text encoder from disk, which a node
  without the cache pays in *every* round (a ClientApp is a fresh process per
  message) and a node with a warm cache never pays again.
* ``break_even_epochs``: encode cost / per-epoch time saved. The cache has paid for
  itself once a node has trained this many epochs on the shard, counted over *all*
  rounds (the cache lives on the node's disk across rounds and runs).
  ``break_even_epochs_with_store`` adds the cache write.
* the text encoder runs once per *distinct* prompt when encoding, but once per image
  per step without the cache: the synthetic shard has 8 prompts (one per class), so
  with few images per prompt the break-even is at its worst; the one-time encode also
  runs the VAE twice per image (image and mirror), so it costs roughly one to two
  epochs of the saving.
* ``loss_each``: mean training loss of each arm per repeat (they differ only by
  sampling noise: both arms train the same adapter from the same start).

Timings depend on ``--model``: ``tiny`` is a toy whose VAE, text encoder and UNet
are all negligible (its ratio means little); ``sd-shape`` has Tiny-SD's real shapes
(random weights) so its FLOPs, and hence the ratio on a given device, are representative
of segmind/tiny-sd at the chosen ``--resolution``. The balance shifts with resolution:
the text encoder always runs on 77 positions while VAE and UNet costs grow with the
pixel count, so measure at the resolution you train at (``--device cuda --resolution
512`` on a GPU node). A real checkpoint directory gives the same timings as
``sd-shape`` but meaningful losses.

Usage::

    python bench/latent_cache.py                      # sd-shape, 64 px, 1 CPU thread: ~3 min
    python bench/latent_cache.py --model tiny         # toy model: ~30 s smoke run
    python bench/latent_cache.py --device cuda --resolution 512 --images 64
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from common import (
    bench_parser,
    build_model,
    component_parameters,
    emit,
    environment,
    round_floats,
    say,
    set_threads,
    synthetic_shards,
    timed,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = bench_parser(__doc__, model="sd-shape")
    p.add_argument("--images", type=int, default=16, help="images in the shard")
    p.add_argument("--epochs", type=int, default=1, help="epochs each arm trains")
    p.add_argument("--batch-size", type=int, default=4, help="images per step")
    p.add_argument("--learning-rate", type=float, default=1e-4, help="AdamW learning rate")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (0: torch default, all cores). 1 by default: on a CPU that other "
        "processes share, more threads make timings swing by 3x or more (OpenMP threads "
        "wait on each other); use 0 on a dedicated machine for absolute throughput",
    )
    p.add_argument("--seed", type=int, default=0, help="model, data and training seed")
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="measure both arms this many times, alternating which goes first; the best "
        "and the median are reported (the machine may be shared: single timings are noisy)",
    )
    p.add_argument(
        "--order",
        choices=("cached-first", "reference-first"),
        default="reference-first",
        help="which arm runs first in the first repeat",
    )
    return p.parse_args(argv)


def reference_train(
    unet: Any,
    vae: Any,
    text_encoder: Any,
    pixels: Any,
    input_ids: Any,
    scheduler: Any,
    cfg: Any,
    device: Any,
    *,
    scaling_factor: float,
    seed: int,
    max_steps: int | None = None,
) -> dict[str, float]:
    """The reference examples' loop: frozen encoders run at every step, then the UNet step.

    The UNet step is the same as ``fedsd.ml.training.train_lora``'s (AdamW with the same
    settings, epsilon/v target, bf16 autocast on CUDA only).
    """
    import time

    import torch

    from fedsd.ml.training import autocast_for, denoising_loss

    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(seed)
    n = pixels.shape[0]
    num_t = scheduler.config.num_train_timesteps
    vae.to(device).eval()
    text_encoder.to(device).eval()
    unet.train()
    total, seen, steps = 0.0, 0, 0
    start = time.perf_counter()
    for _epoch in range(cfg.local_epochs):
        order = torch.randperm(n, generator=gen)
        for b in range(0, n, cfg.batch_size):
            idx = order[b : b + cfg.batch_size]
            batch = pixels[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5  # RandomHorizontalFlip
            batch = torch.where(flip[:, None, None, None], batch.flip(3), batch).to(device)
            with torch.no_grad(), autocast_for(device):
                dist = vae.encode(batch).latent_dist
                latents = dist.sample(generator=gen if device.type == "cpu" else None)
                cond = text_encoder(input_ids[idx].to(device), return_dict=False)[0]
            latents = latents.float() * scaling_factor
            cond = cond.float()
            noise = torch.randn(latents.shape, generator=gen).to(device)
            t = torch.randint(0, num_t, (latents.shape[0],), generator=gen).to(device)
            loss = denoising_loss(unet, scheduler, latents, noise, t, cond, device)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
            steps += 1
            if max_steps is not None and steps >= max_steps:
                break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return {"loss": total / max(seen, 1), "steps": steps, "images": seen, "seconds": seconds}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    set_threads(args.threads)

    import dataclasses

    import torch

    from fedsd.config import RunConfig
    from fedsd.ml.data import load_split
    from fedsd.ml.model import get_lora_state, init_lora_arrays, set_lora_state
    from fedsd.ml.training import LatentCache, encode_split, image_tensor, train_lora
    from fedsd.task import NodeSettings, NodeTask

    with tempfile.TemporaryDirectory(prefix="fedsd-bench-cache-") as tmp:
        work = Path(tmp)
        with timed() as t_build:
            model_path, kind = build_model(args.model, work, seed=args.seed)
        shards, _ = synthetic_shards(
            work / "shards",
            num_shards=1,
            images=args.images,
            resolution=args.resolution,
            seed=args.seed,
        )
        split = load_split(shards[0] / "train")
        say(f"model {kind} at {model_path}; shard of {len(split)} images at {args.resolution}px")

        cfg = RunConfig.from_mapping(
            {
                "model": str(model_path),
                "resolution": args.resolution,
                "batch-size": args.batch_size,
                "local-epochs": args.epochs,
                "learning-rate": args.learning_rate,
                "seed": args.seed,
                "out-dir": str(work / "out"),
            }
        )
        node = NodeSettings(shard_dir=shards[0], cache_dir=work / "cache", device=args.device)
        with timed() as t_unet:
            task = NodeTask(cfg, node)  # the node's UNet + LoRA, scheduler, scaling factor
        device, unet, scheduler = task.device, task.unet, task.scheduler
        initial = init_lora_arrays(
            {k: tuple(v.shape) for k, v in get_lora_state(unet).items()}, cfg.seed
        )

        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel, CLIPTokenizer

        with timed() as t_enc_load:  # what NodeTask does on a cache miss
            vae = AutoencoderKL.from_pretrained(str(model_path), subfolder="vae")
            text_encoder = CLIPTextModel.from_pretrained(str(model_path), subfolder="text_encoder")
            tokenizer = CLIPTokenizer.from_pretrained(str(model_path), subfolder="tokenizer")
        vae.requires_grad_(False).to(device).eval()
        text_encoder.requires_grad_(False).to(device).eval()

        # The baseline's preprocessing, done once and not timed (generous to it).
        pixels = image_tensor(split.images, args.resolution)
        input_ids = tokenizer(
            split.prompts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

        say("warm-up (untimed): one reference step, one cached step")
        warm_cfg = dataclasses.replace(cfg, local_epochs=1, max_train_images=args.batch_size)
        reference_train(
            unet,
            vae,
            text_encoder,
            pixels,
            input_ids,
            scheduler,
            warm_cfg,
            device,
            scaling_factor=task.scaling_factor,
            seed=args.seed + 1,
            max_steps=1,
        )
        warm = encode_split(
            split.images[: args.batch_size],
            split.prompts[: args.batch_size],
            vae,
            text_encoder,
            tokenizer,
            args.resolution,
            device,
        )
        train_lora(
            unet,
            warm,
            scheduler,
            warm_cfg,
            device,
            scaling_factor=task.scaling_factor,
            seed=args.seed + 1,
        )

        def run_cached() -> dict[str, Any]:
            set_lora_state(unet, initial)
            say("with cache: encode_split once")
            with timed() as t_encode:
                enc = encode_split(
                    split.images,
                    split.prompts,
                    vae,
                    text_encoder,
                    tokenizer,
                    args.resolution,
                    device,
                    skipped=split.skipped,
                )
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            cache = LatentCache(work / "cache")
            with timed() as t_store:
                cache.store("bench", enc)
            with timed() as t_load:
                loaded = cache.load("bench")
            assert loaded is not None and len(loaded) == len(split)
            say(f"with cache: train_lora, {args.epochs} epochs")
            res = train_lora(
                unet,
                loaded,
                scheduler,
                cfg,
                device,
                scaling_factor=task.scaling_factor,
                seed=args.seed,
            )
            return {
                "images_per_second": res.images_per_second,
                "train_seconds": res.seconds,
                "steps": res.steps,
                "images": res.images,
                "loss": res.loss,
                "encode_seconds": t_encode["s"],
                "cache_store_seconds": t_store["s"],
                "cache_load_seconds": t_load["s"],
                "cache_bytes": cache.path("bench").stat().st_size,
            }

        def run_reference() -> dict[str, Any]:
            set_lora_state(unet, initial)
            say(f"without cache: VAE + text encoder every step, {args.epochs} epochs")
            res = reference_train(
                unet,
                vae,
                text_encoder,
                pixels,
                input_ids,
                scheduler,
                cfg,
                device,
                scaling_factor=task.scaling_factor,
                seed=args.seed,
            )
            return {
                "images_per_second": res["images"] / res["seconds"],
                "train_seconds": res["seconds"],
                "steps": res["steps"],
                "images": res["images"],
                "loss": res["loss"],
            }

        load_before = os.getloadavg()
        cached_runs, reference_runs = [], []
        for rep in range(args.repeats):
            cached_first = (args.order == "cached-first") == (rep % 2 == 0)
            first = "cached" if cached_first else "reference"
            say(f"repeat {rep + 1}/{args.repeats} ({first} first)")
            if cached_first:
                cached_runs.append(run_cached())
                reference_runs.append(run_reference())
            else:
                reference_runs.append(run_reference())
                cached_runs.append(run_cached())
        load_after = os.getloadavg()

        def best(runs: list[dict[str, Any]], key: str, pick: Any = max) -> float:
            return pick(r[key] for r in runs)

        def med(runs: list[dict[str, Any]], key: str) -> float:
            return statistics.median(r[key] for r in runs)

        n = len(split)
        ips_with = best(cached_runs, "images_per_second")
        ips_without = best(reference_runs, "images_per_second")
        epoch_with, epoch_without = n / ips_with, n / ips_without
        saved = epoch_without - epoch_with
        one_time = {
            "encode_seconds": best(cached_runs, "encode_seconds", min),
            "cache_store_seconds": best(cached_runs, "cache_store_seconds", min),
            "cache_load_seconds": best(cached_runs, "cache_load_seconds", min),
            "cache_bytes": cached_runs[0]["cache_bytes"],
            "encoder_load_seconds": t_enc_load["s"],
        }

        def arm(runs: list[dict[str, Any]]) -> dict[str, Any]:
            return {
                "images_per_second": best(runs, "images_per_second"),
                "images_per_second_median": med(runs, "images_per_second"),
                "images_per_second_each": [r["images_per_second"] for r in runs],
                "train_seconds_each": [r["train_seconds"] for r in runs],
                "steps": runs[0]["steps"],
                "images": runs[0]["images"],
                "loss_each": [r["loss"] for r in runs],
            }

        result = {
            "benchmark": "latent_cache",
            "model": kind if kind != "directory" else str(model_path),
            "parameters": component_parameters(model_path),
            **environment(str(device)),
            "load_average_before_after": [load_before[0], load_after[0]],
            "resolution": args.resolution,
            "images": n,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "repeats": args.repeats,
            "with_cache": arm(cached_runs),
            "without_cache": arm(reference_runs),
            "speedup": ips_with / ips_without,
            "speedup_median": med(cached_runs, "images_per_second")
            / med(reference_runs, "images_per_second"),
            "speedup_each": [
                c["images_per_second"] / r["images_per_second"]
                for c, r in zip(cached_runs, reference_runs, strict=True)
            ],
            "one_time": one_time,
            "epoch_seconds": {"with_cache": epoch_with, "without_cache": epoch_without},
            "break_even_epochs": one_time["encode_seconds"] / saved if saved > 0 else None,
            "break_even_epochs_with_store": (
                (one_time["encode_seconds"] + one_time["cache_store_seconds"]) / saved
                if saved > 0
                else None
            ),
            "setup_seconds": {"build_model": t_build["s"], "load_unet_with_lora": t_unet["s"]},
        }
        if device.type == "cuda":  # the peak of both arms (bench/gpu.py reports it)
            result["peak_cuda_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device))
        return round_floats(result, 4)


if __name__ == "__main__":
    out = main()
    emit(out)
