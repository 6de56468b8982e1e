"""A generated, class-conditional stand-in for Oxford Flowers (tests, demos, benches)."""

from __future__ import annotations

import io
import logging
import math
import random
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw

from fedsd.ml.flowers import (
    OXFORD_FLOWERS_CLASS_NAMES,
)

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)


# (official class id, background, foreground, shape): one distinct, learnable pattern
# per class, loosely coloured like the real flower.
_SYNTHETIC_CLASSES: tuple[tuple[int, tuple[int, int, int], tuple[int, int, int], str], ...] = (
    (1, (34, 85, 34), (255, 150, 200), "petals5"),  # pink primrose
    (10, (230, 230, 200), (70, 90, 200), "disc"),  # globe thistle
    (54, (90, 150, 230), (250, 210, 30), "ring"),  # sunflower
    (74, (20, 60, 20), (200, 20, 40), "square"),  # rose
    (6, (40, 40, 60), (250, 120, 20), "star6"),  # tiger lily
    (42, (120, 180, 90), (250, 240, 120), "triangle"),  # daffodil
    (73, (20, 70, 90), (250, 250, 250), "petals8"),  # water lily
    (100, (200, 170, 120), (180, 40, 30), "cross"),  # blanket flower
)


def synthetic_image(class_slot: int, rng: random.Random, size: int = 64) -> Image.Image:
    """One image of synthetic class ``class_slot``: its shape and colours, jittered.

    Position, scale, rotation and colours vary a little and there is mild pixel noise,
    so a diffusion model must learn the class pattern rather than memorize one image.
    """
    _, background, foreground, shape = _SYNTHETIC_CLASSES[class_slot % len(_SYNTHETIC_CLASSES)]

    def jitter(colour: tuple[int, int, int]) -> tuple[int, int, int]:
        r, g, b = (min(255, max(0, c + rng.randint(-12, 12))) for c in colour)
        return (r, g, b)

    image = Image.new("RGB", (size, size), jitter(background))
    draw = ImageDraw.Draw(image)
    cx = size / 2 + rng.uniform(-0.08, 0.08) * size
    cy = size / 2 + rng.uniform(-0.08, 0.08) * size
    radius = size * 0.3 * rng.uniform(0.9, 1.1)
    angle = rng.uniform(0, 360)
    fg = jitter(foreground)

    def circle(x: float, y: float, r: float, colour: tuple[int, int, int]) -> None:
        draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)

    def polygon(points: list[tuple[float, float]]) -> None:
        draw.polygon(points, fill=fg)

    def around(n: int, dist: float, phase: float = 0.0) -> list[tuple[float, float]]:
        step = 2 * math.pi / n
        start = math.radians(angle) + phase
        return [
            (cx + dist * math.cos(start + k * step), cy + dist * math.sin(start + k * step))
            for k in range(n)
        ]

    if shape == "disc":
        circle(cx, cy, radius, fg)
    elif shape == "ring":
        circle(cx, cy, radius, fg)
        circle(cx, cy, radius * 0.45, (110, 60, 20))
    elif shape.startswith("petals"):
        for x, y in around(int(shape[len("petals") :]), radius * 0.55):
            circle(x, y, radius * 0.42, fg)
        circle(cx, cy, radius * 0.25, (250, 220, 60))
    elif shape.startswith("star"):
        n = int(shape[len("star") :])
        outer, inner = around(n, radius), around(n, radius * 0.45, math.pi / n)
        polygon([p for pair in zip(outer, inner, strict=True) for p in pair])
    elif shape in ("square", "triangle"):
        polygon(around(4 if shape == "square" else 3, radius))
    elif shape == "cross":
        for phase in (0.0, math.pi / 2):
            a, b = around(2, radius, phase)
            draw.line((a, b), fill=fg, width=max(1, round(radius * 0.45)))
    noise = Image.frombytes("RGB", (size, size), rng.randbytes(size * size * 3))
    return Image.blend(image, noise, 0.06)


def make_synthetic_dataset(
    num_images: int = 64, *, seed: int = 0, size: int = 64
) -> datasets.Dataset:
    """A small, learnable stand-in for Oxford Flowers, built offline from ``seed``.

    Same schema as ``nkirschi/oxford-flowers``: an ``image`` column and a ``label``
    ClassLabel over the 102 official ids as strings in lexicographic order (so label
    index 1 is '10', "globe thistle", exactly as in the real data). Up to 8 classes are
    used, each a distinct coloured shape, assigned round-robin.
    """
    import datasets

    rng = random.Random(seed)
    names = sorted(str(i) for i in range(1, len(OXFORD_FLOWERS_CLASS_NAMES) + 1))
    num_classes = min(len(_SYNTHETIC_CLASSES), num_images)
    images, labels = [], []
    for k in range(num_images):
        slot = k % num_classes
        buf = io.BytesIO()
        synthetic_image(slot, rng, size).save(buf, format="PNG")
        images.append({"bytes": buf.getvalue(), "path": None})
        labels.append(names.index(str(_SYNTHETIC_CLASSES[slot][0])))
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=names)}
    )
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
