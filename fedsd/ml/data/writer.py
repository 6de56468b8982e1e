"""Writing shards: partition a source with flwr-datasets, split train/val, publish all
shards atomically (``datasets`` is imported inside the functions)."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import shutil
import uuid
import warnings
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageOps

from fedsd.common.atomic import write_file
from fedsd.common.errors import ConfigError
from fedsd.common.progress_bar import track
from fedsd.ml.data.shards import (
    BAD_IMAGE_ERRORS,
    INDEX_COLUMN,
    MANIFEST,
    MANIFEST_FORMAT,
    METADATA,
    PARTITIONERS,
    SHARD_RE,
    SPLITS,
    SYNTHETIC,
    UNLABELED,
)
from fedsd.ml.data.sources import load_source
from fedsd.ml.flowers import (
    DEFAULT_DATASET,
    GENERIC_PROMPT,
    class_table,
)

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

_STAGING_PREFIX = ".fedsd-staging-"
_TRASH_PREFIX = ".fedsd-trash-"
_PNG_COMPRESS_LEVEL = 3  # re-encoding ~7k flower photos: level 3 is ~3x faster than 6


def write_shards(
    *,
    source: str,
    num_shards: int,
    partitioner: str,
    alpha: float,
    val_fraction: float,
    seed: int,
    out: str | Path,
    image_size: int | None = None,
    synthetic_images: int = 64,
) -> dict[str, Any]:
    """Partition ``source`` into ``num_shards`` node shards under ``out``; return the manifest.

    Everything is validated before anything is written, the shards are built in a
    staging directory inside ``out`` and moved into place only when complete, and
    ``manifest.json`` is written last, so a crash never leaves a half-written shard
    that looks valid.
    """
    _validate_args(
        source=source,
        num_shards=num_shards,
        partitioner=partitioner,
        alpha=alpha,
        val_fraction=val_fraction,
        seed=seed,
        image_size=image_size,
        synthetic_images=synthetic_images,
    )
    out_dir = Path(out).expanduser()
    _check_out_dir(out_dir)

    dataset, source_desc = load_source(
        source, seed=seed, image_size=image_size, synthetic_images=synthetic_images
    )
    rows = len(dataset)
    if rows < num_shards:
        raise ConfigError(
            f"num_shards (--num-shards) is {num_shards} but the source {source_desc} has only "
            f"{rows} example(s); use at most {rows} shards or a larger source"
        )
    class_label = dataset.features["label"]
    classes = class_table(class_label)
    parts = _partition(
        dataset, partitioner=partitioner, num_shards=num_shards, alpha=alpha, seed=seed
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(out_dir)
    staging = out_dir / f"{_STAGING_PREFIX}{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        shards = []
        for index, part in enumerate(parts):
            name = f"shard-{index}"
            train, val = _train_val_split(part, val_fraction=val_fraction, seed=seed + index)
            entry: dict[str, Any] = {"name": name}
            for split_name, split_rows in (("train", train), ("val", val)):
                entry[split_name] = _write_split(
                    split_rows,
                    staging / name / split_name,
                    classes=classes,
                    image_size=image_size,
                )
            shards.append(entry)
            logger.info(
                "%s: %d train, %d val images (%d skipped)",
                name,
                entry["train"]["images"],
                entry["val"]["images"],
                entry["train"]["skipped"] + entry["val"]["skipped"],
            )
        manifest = _manifest(
            source=source_desc,
            partitioner=partitioner,
            alpha=alpha,
            seed=seed,
            val_fraction=val_fraction,
            num_shards=num_shards,
            image_size=image_size,
            source_rows=rows,
            classes=classes,
            shards=shards,
        )
        _write_text_atomic(staging / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        _publish(staging, out_dir, [s["name"] for s in shards])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    skipped = manifest["totals"]["skipped"]
    if skipped:
        logger.warning("skipped %d unreadable source image(s); see %s", skipped, MANIFEST)
    return manifest


def _validate_args(
    *,
    source: Any,
    num_shards: Any,
    partitioner: Any,
    alpha: Any,
    val_fraction: Any,
    seed: Any,
    image_size: Any,
    synthetic_images: Any,
) -> None:
    """Refuse bad arguments with a message naming the argument and what is allowed."""

    def is_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def is_number(value: Any) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool)

    if not isinstance(source, str) or not source.strip():
        raise ConfigError(
            f"source (--source) must be a hub dataset id (e.g. {DEFAULT_DATASET}), a local "
            f"directory or '{SYNTHETIC}', got {source!r}"
        )
    if not is_int(num_shards) or num_shards < 1:
        raise ConfigError(
            f"num_shards (--num-shards) must be an integer >= 1 (one per node), got {num_shards!r}"
        )
    if partitioner not in PARTITIONERS:
        raise ConfigError(
            f"partitioner (--partitioner) must be one of {', '.join(PARTITIONERS)}, "
            f"got {partitioner!r}"
        )
    if not is_number(alpha) or not math.isfinite(alpha) or alpha <= 0:
        raise ConfigError(
            f"alpha (--alpha) must be a finite number > 0 (smaller = more label skew across "
            f"shards, e.g. 0.1 to 1.0), got {alpha!r}"
        )
    if not is_number(val_fraction) or not 0 <= val_fraction < 1:
        raise ConfigError(
            f"val_fraction (--val-fraction) must be in [0, 1) (e.g. 0.2; 0 for no validation "
            f"split), got {val_fraction!r}"
        )
    if not is_int(seed):
        raise ConfigError(f"seed (--seed) must be an integer, got {seed!r}")
    if image_size is not None and (not is_int(image_size) or image_size < 1):
        raise ConfigError(
            f"image_size (--image-size) must be a positive integer or unset, got {image_size!r}"
        )
    if source == SYNTHETIC and (not is_int(synthetic_images) or synthetic_images < 1):
        raise ConfigError(
            f"synthetic_images (--synthetic-images) must be an integer >= 1, "
            f"got {synthetic_images!r}"
        )


def _is_ours(name: str) -> bool:
    return (
        name == MANIFEST
        or bool(SHARD_RE.fullmatch(name))
        or name.startswith((_STAGING_PREFIX, _TRASH_PREFIX))
    )


def _check_out_dir(out_dir: Path) -> None:
    """Refuse an output path that would clobber something that is not a shard set."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"out (--out) {out_dir} exists and is not a directory")
    if out_dir.is_dir():
        foreign = sorted(p.name for p in out_dir.iterdir() if not _is_ours(p.name))
        if foreign:
            shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
            raise ConfigError(
                f"out (--out) {out_dir} already holds files that are not fedsd shards "
                f"({shown}); choose a new or empty directory"
            )


def _remove_leftovers(out_dir: Path) -> None:
    """Delete staging/trash directories a crashed earlier run left behind."""
    for path in out_dir.iterdir():
        if path.name.startswith((_STAGING_PREFIX, _TRASH_PREFIX)):
            shutil.rmtree(path, ignore_errors=True)


def _publish(staging: Path, out_dir: Path, shard_names: list[str]) -> None:
    """Swap the complete new shard set in for the old one, manifest last.

    Renames within one directory are atomic, so every ``shard-<i>`` present at any
    moment is complete; the manifest exists only once the whole set is in place.
    """
    trash = out_dir / f"{_TRASH_PREFIX}{uuid.uuid4().hex}"
    trash.mkdir()
    if (out_dir / MANIFEST).exists():
        os.replace(out_dir / MANIFEST, trash / MANIFEST)
    for path in sorted(out_dir.iterdir()):
        if SHARD_RE.fullmatch(path.name):
            os.replace(path, trash / path.name)
    for name in shard_names:
        os.replace(staging / name, out_dir / name)
    os.replace(staging / MANIFEST, out_dir / MANIFEST)
    shutil.rmtree(trash, ignore_errors=True)


def _write_text_atomic(path: Path, text: str) -> None:
    write_file(path, text)


def _manifest(
    *,
    source: str,
    partitioner: str,
    alpha: float,
    seed: int,
    val_fraction: float,
    num_shards: int,
    image_size: int | None,
    source_rows: int,
    classes: list[dict[str, Any]],
    shards: list[dict[str, Any]],
) -> dict[str, Any]:
    per_class: Counter[str] = Counter()
    totals = {"train": 0, "val": 0, "skipped": 0}
    for shard in shards:
        for split_name in SPLITS:
            split = shard[split_name]
            totals[split_name] += split["images"]
            totals["skipped"] += split["skipped"]
            per_class.update(split["per_class"])
    return {
        "format": MANIFEST_FORMAT,
        "source": source,
        "partitioner": partitioner,
        "alpha": alpha,
        "seed": seed,
        "val_fraction": val_fraction,
        "num_shards": num_shards,
        "image_size": image_size,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "source_rows": source_rows,
        "shards": shards,
        "totals": {
            "images": totals["train"] + totals["val"],
            "train": totals["train"],
            "val": totals["val"],
            "skipped": totals["skipped"],
            "per_class": dict(sorted(per_class.items())),
        },
        "classes": classes,
    }


# ----------------------------------------------------------------- partitioning and writing


def _partition(
    dataset: datasets.Dataset, *, partitioner: str, num_shards: int, alpha: float, seed: int
) -> list[datasets.Dataset]:
    """Split the source into per-node partitions with flwr-datasets."""
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    # IidPartitioner hands out contiguous blocks; hub datasets are often sorted by
    # label, so shuffle first or "iid" shards would be label-skewed.
    dataset = dataset.shuffle(seed=seed, keep_in_memory=True)
    if partitioner == "iid":
        part: Any = IidPartitioner(num_partitions=num_shards)
    else:
        # Every node needs a few images to train on, but a hard floor of 10 would make
        # small sources (and the synthetic set) unpartitionable at low alpha.
        min_size = max(1, min(10, len(dataset) // (2 * num_shards)))
        part = DirichletPartitioner(
            num_partitions=num_shards,
            partition_by="label",
            alpha=alpha,
            min_partition_size=min_size,
            seed=seed,
        )
    part.dataset = dataset
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            parts = [part.load_partition(i) for i in range(num_shards)]
        except ValueError as exc:
            raise ConfigError(
                f"could not partition {len(dataset)} examples into {num_shards} shards with "
                f"partitioner={partitioner!r}, alpha={alpha} ({exc}); raise alpha (--alpha), "
                f"use fewer shards (--num-shards) or a larger source"
            ) from exc
    retries = sum("min_partition_size" in str(w.message) for w in caught)
    if retries:
        logger.info("Dirichlet sampling was repeated %d time(s) to meet the minimum", retries)
    return parts


def _train_val_split(
    part: datasets.Dataset, *, val_fraction: float, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Seeded train/val split; keeps at least one training image per shard."""
    n = len(part)
    n_val = 0 if val_fraction == 0 or n < 2 else min(n - 1, max(1, round(n * val_fraction)))
    if n_val == 0:
        return part, part.select([])
    import datasets

    # Split row positions, then select: train_test_split on a dataset backed by cache
    # files (the hub cache, a save_to_disk directory) either writes index files next to
    # them or, with keep_in_memory=True, raises in datasets 4.x.
    positions = datasets.Dataset.from_dict({"i": list(range(n))})
    split = positions.train_test_split(test_size=n_val, seed=seed, shuffle=True)
    return part.select(split["train"]["i"]), part.select(split["test"]["i"])


def _write_split(
    rows: datasets.Dataset,
    dest: Path,
    *,
    classes: list[dict[str, Any]],
    image_size: int | None,
) -> dict[str, Any]:
    """Decode, optionally resize and save each image as PNG; metadata.jsonl goes last."""
    dest.mkdir(parents=True)
    lines: list[str] = []
    per_class: Counter[str] = Counter()
    skipped: list[str] = []
    for row in track(rows, f"decoding {dest.parent.name}/{dest.name}", total=len(rows)):
        index = int(row[INDEX_COLUMN])
        ref = row["image"] or {}
        try:
            image = _decode_source_image(ref)
        except BAD_IMAGE_ERRORS as exc:
            where = ref.get("path") or f"row {index}"
            logger.debug("skipping source image %s: %s", where, exc)
            skipped.append(str(where))
            continue
        if image_size is not None and image.size != (image_size, image_size):
            image = ImageOps.fit(image, (image_size, image_size), Image.Resampling.LANCZOS)
        file_name = f"{index:05d}.png"
        image.save(dest / file_name, format="PNG", compress_level=_PNG_COMPRESS_LEVEL)
        label = row["label"]
        if label is None or label < 0:
            label, label_name, prompt = -1, UNLABELED, GENERIC_PROMPT
        else:
            label_name, prompt = classes[label]["label_name"], classes[label]["prompt"]
        text = row.get("text")
        lines.append(
            json.dumps(
                {
                    "file_name": file_name,
                    "text": text if isinstance(text, str) and text.strip() else prompt,
                    "label": label,
                    "label_name": label_name,
                },
                ensure_ascii=False,
            )
        )
        per_class[label_name] += 1
    _write_text_atomic(dest / METADATA, "".join(line + "\n" for line in lines))
    return {
        "images": len(lines),
        "skipped": len(skipped),
        "per_class": dict(sorted(per_class.items())),
        "skipped_sources": skipped,
    }


def _decode_source_image(ref: dict[str, Any]) -> Image.Image:
    """Decode an undecoded ``datasets.Image`` value ({"bytes", "path"}) to RGB."""
    data, path = ref.get("bytes"), ref.get("path")
    if data is not None:
        source: Any = io.BytesIO(data)
    elif path:
        source = path
    else:
        raise ValueError("example has neither image bytes nor a path")
    with Image.open(source) as im:
        upright = ImageOps.exif_transpose(im)
        return upright.convert("RGB")
