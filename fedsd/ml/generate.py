"""Base vs adapted images from the same prompts and seeds, side by side in one grid.

Rows are (prompt, seed) pairs; the left column is the base model, the right column the
same pipeline after ``load_lora_weights(adapter)``. Both use a generator seeded with the
same seed, so any difference comes from the adapter alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def generate_grid(
    *,
    model: str,
    adapter: str | None,
    prompts: list[str],
    seeds: list[int] | None,
    out: str | Path,
    steps: int = 25,
    resolution: int | None = None,
    guidance_scale: float = 7.5,
    device: str | None = None,
) -> Path:
    """Write a PNG grid: one row per (prompt, seed), columns base | adapted."""
    import torch
    from diffusers import StableDiffusionPipeline
    from PIL import Image, ImageDraw

    from fedsd.common.progress_bar import track
    from fedsd.ml.model import resolve_model
    from fedsd.ml.training import pick_device

    dev = pick_device(device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(
        resolve_model(model), dtype=dtype, safety_checker=None, requires_safety_checker=False
    ).to(dev)
    pipe.set_progress_bar_config(disable=True)
    seeds = seeds or [0]
    rows = [(p, s) for p in prompts for s in seeds]

    def render(column: str) -> list[Any]:
        images = []
        for prompt, seed in track(rows, f"generating {column} images"):
            gen = torch.Generator(device="cpu").manual_seed(seed)
            images.append(
                pipe(
                    prompt,
                    num_inference_steps=steps,
                    guidance_scale=guidance_scale,
                    height=resolution,
                    width=resolution,
                    generator=gen,
                ).images[0]
            )
        return images

    columns = [("base", render("base"))]
    if adapter:
        adapter_dir = Path(adapter)
        if not (adapter_dir / "pytorch_lora_weights.safetensors").is_file():
            raise FileNotFoundError(
                f"{adapter_dir} has no pytorch_lora_weights.safetensors (use OUT/latest)"
            )
        pipe.load_lora_weights(str(adapter_dir))
        columns.append(("adapted", render("adapted")))
    w, h = columns[0][1][0].size
    label_h = 16
    grid = Image.new("RGB", (w * len(columns), (h + label_h) * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for c, (name, images) in enumerate(columns):
        for r, img in enumerate(images):
            x, y = c * w, r * (h + label_h)
            draw.text((x + 2, y + 2), f"{name} seed={rows[r][1]}", fill="black")
            grid.paste(img, (x, y + label_h))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return out
