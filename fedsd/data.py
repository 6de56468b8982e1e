"""Per-node data shards: written once by ``fedsd shards``, read by the ClientApp each round.

Writer side (:func:`write_shards`) turns a source (a hub dataset, a local image folder,
a ``save_to_disk`` directory, or a generated ``synthetic`` set) into ``num_shards``
directories, one per SuperNode, partitioned with flwr-datasets so that the IID and
Dirichlet (label-skewed) settings match what the Flower ecosystem reports. Layout::

    OUT/manifest.json
    OUT/shard-<i>/train/metadata.jsonl   # {"file_name", "text", "label", "label_name"}
    OUT/shard-<i>/train/<source index>.png
    OUT/shard-<i>/val/metadata.jsonl + images

Reader side (:func:`load_split`, :func:`split_fingerprint`, :func:`resolve_shard_dir`)
runs in a fresh ClientApp process for every message, so this module imports only the
standard library and Pillow at import time; ``datasets`` and ``flwr_datasets`` are
imported inside :func:`write_shards`.

A bad image never stops either side: it is skipped, counted (in the manifest on the
writer side, in :class:`ShardSplit` on the reader side) and logged.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import random
import re
import shutil
import uuid
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageDraw, ImageOps

from fedsd.atomic import write_file
from fedsd.config import ConfigError
from fedsd.flowers import (
    DEFAULT_DATASET,
    GENERIC_PROMPT,
    OXFORD_FLOWERS_CLASS_NAMES,
    class_table,
    prompt_for_label_name,
)

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

METADATA = "metadata.jsonl"
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
PARTITIONERS = ("iid", "dirichlet")
SYNTHETIC = "synthetic"
MANIFEST_FORMAT = "fedsd-shards/1"

# Everything Pillow raises for a missing, truncated, corrupt or oversized image.
# (UnidentifiedImageError and FileNotFoundError are OSErrors; some decoders raise
# SyntaxError or EOFError on malformed headers.)
BAD_IMAGE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    Image.DecompressionBombError,
)

_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
_SHARD_RE = re.compile(r"shard-\d+")
_STAGING_PREFIX = ".fedsd-staging-"
_TRASH_PREFIX = ".fedsd-trash-"
_INDEX_COLUMN = "_fedsd_index"
_UNLABELED = "unlabeled"
_PNG_COMPRESS_LEVEL = 3  # re-encoding ~7k flower photos: level 3 is ~3x faster than 6
_SHARDS_HINT = (
    "create shards with `fedsd shards --source <hub id | DIR | synthetic> "
    "--num-shards N --out DIR` and point each node at DIR/shard-<i>"
)


class SourceUnavailableError(FileNotFoundError):
    """The source dataset cannot be reached or found; the message says how to provide it."""


# --------------------------------------------------------------------------- reader side


@dataclass
class ShardSplit:
    """One split of one shard, decoded and ready for a training or evaluation loop."""

    root: Path
    images: list[Image.Image] = field(default_factory=list)  # RGB, fully loaded
    prompts: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    skipped: int = 0  # unreadable/corrupt files skipped
    skipped_files: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)


def resolve_shard_dir(path: str | Path) -> Path:
    """Check that ``path`` is a shard (it has ``train/metadata.jsonl``) and return it.

    Fails early with a message naming the path and how to create shards, instead of a
    confusing error deep inside the first training round.
    """
    shard = Path(path).expanduser()
    if (shard / "train" / METADATA).is_file():
        return shard.resolve()
    if (shard / MANIFEST).is_file():
        found = sorted(p.name for p in shard.iterdir() if _SHARD_RE.fullmatch(p.name))
        detail = f"it is a shard set, not a shard: use one of {', '.join(found) or 'its shards'}"
    elif shard.name in SPLITS and (shard / METADATA).is_file():
        detail = f"it is a split; use its parent {shard.parent}"
    elif not shard.exists():
        detail = "it does not exist"
    else:
        detail = f"{shard / 'train' / METADATA} is missing"
    raise FileNotFoundError(f"{shard} is not a fedsd data shard ({detail}); {_SHARDS_HINT}")


def load_split(split_dir: str | Path) -> ShardSplit:
    """Load every readable image of a split with its prompt and label.

    Missing or corrupt images (and unparsable metadata lines) are skipped and counted,
    so one bad file on a node costs one example, not the round.
    """
    root = Path(split_dir)
    split = ShardSplit(root=root)
    total = 0
    for lineno, entry in _iter_metadata(_metadata_path(root)):
        total += 1
        if entry is None:
            split.skipped += 1
            split.skipped_files.append(f"{METADATA}:{lineno}")
            continue
        file_name = entry.get("file_name")
        path = _member(root, file_name)
        if path is None:
            split.skipped += 1
            split.skipped_files.append(f"{METADATA}:{lineno}")
            continue
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except BAD_IMAGE_ERRORS as exc:
            logger.debug("skipping %s: %s", path, exc)
            split.skipped += 1
            split.skipped_files.append(str(file_name))
            continue
        split.images.append(image)
        split.prompts.append(_entry_prompt(entry))
        split.labels.append(_entry_label(entry))
    if split.skipped:
        shown = ", ".join(split.skipped_files[:5])
        more = f" and {split.skipped - 5} more" if split.skipped > 5 else ""
        logger.warning(
            "%s: skipped %d of %d images that could not be read (%s%s)",
            root,
            split.skipped,
            total,
            shown,
            more,
        )
    return split


def split_fingerprint(split_dir: str | Path) -> str:
    """SHA-256 over ``metadata.jsonl`` and each listed file's (name, size, mtime_ns).

    Cheap (no image is decoded) and changes when the metadata or any listed file is
    rewritten, so a node can tell whether a cached, preprocessed split is still valid.
    """
    root = Path(split_dir)
    raw = _metadata_path(root).read_bytes()
    digest = hashlib.sha256()
    digest.update(b"fedsd-split-fingerprint/1\0")
    digest.update(len(raw).to_bytes(8, "big"))
    digest.update(raw)
    for _, entry in _iter_metadata_bytes(raw):
        name = entry.get("file_name") if entry else None
        path = _member(root, name)
        if path is None:
            record = f"{name!r}\0invalid"
        else:
            try:
                st = path.stat()
                record = f"{name}\0{st.st_size}\0{st.st_mtime_ns}"
            except OSError:
                record = f"{name}\0missing"
        digest.update(record.encode("utf-8", "surrogatepass") + b"\n")
    return digest.hexdigest()


def _metadata_path(root: Path) -> Path:
    meta = root / METADATA
    if not meta.is_file():
        raise FileNotFoundError(
            f"{meta} not found: {root} is not a fedsd shard split; {_SHARDS_HINT}"
        )
    return meta


def _iter_metadata(meta: Path) -> Iterator[tuple[int, dict[str, Any] | None]]:
    yield from _iter_metadata_bytes(meta.read_bytes())


def _iter_metadata_bytes(raw: bytes) -> Iterator[tuple[int, dict[str, Any] | None]]:
    """(line number, entry) per non-blank line; None for a line that is not a JSON object."""
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            entry = None
        yield lineno, entry if isinstance(entry, dict) else None


def _member(root: Path, file_name: Any) -> Path | None:
    """``root / file_name`` if it is a plain relative name that stays inside ``root``."""
    if not isinstance(file_name, str) or not file_name:
        return None
    rel = PurePosixPath(file_name)
    if rel.is_absolute() or ".." in rel.parts or "\\" in file_name:
        return None
    return root / rel


def _entry_prompt(entry: dict[str, Any]) -> str:
    text = entry.get("text")
    if isinstance(text, str) and text.strip():
        return text
    name = entry.get("label_name")
    if isinstance(name, str) and name.strip() and name != _UNLABELED:
        return prompt_for_label_name(name)
    return GENERIC_PROMPT


def _entry_label(entry: dict[str, Any]) -> int:
    try:
        return int(entry.get("label", -1))
    except (TypeError, ValueError):
        return -1


# --------------------------------------------------------------------------- writer side


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

    dataset, source_desc = _load_source(
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
        or bool(_SHARD_RE.fullmatch(name))
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
        if _SHARD_RE.fullmatch(path.name):
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
    for row in rows:
        index = int(row[_INDEX_COLUMN])
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
            label, label_name, prompt = -1, _UNLABELED, GENERIC_PROMPT
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


# --------------------------------------------------------------------------- sources


def _load_source(
    source: str, *, seed: int, image_size: int | None, synthetic_images: int
) -> tuple[datasets.Dataset, str]:
    """The source as a normalized dataset, plus how to name it in the manifest."""
    if source == SYNTHETIC:
        size = image_size or 64
        return _normalize(make_synthetic_dataset(synthetic_images, seed=seed, size=size)), source
    local = Path(source).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ConfigError(
                f"source (--source) {local} is a file; pass a directory of images, a "
                f"directory written by Dataset.save_to_disk, a hub dataset id or '{SYNTHETIC}'"
            )
        return _load_local(local), str(local.resolve())
    if source.startswith(("/", ".", "~")) or source.count("/") > 1 or "\\" in source:
        raise SourceUnavailableError(
            f"source directory {source} does not exist; pass an existing image folder "
            f"(DIR/<class_name>/*.jpg or DIR/metadata.jsonl), a hub dataset id or '{SYNTHETIC}'"
        )
    return _load_hub(source), source


def _load_hub(source: str) -> datasets.Dataset:
    import datasets

    try:
        dataset = datasets.load_dataset(source, split="train")
    except OSError as exc:  # ConnectionError, DatasetNotFoundError, HTTP errors
        offline = " (HF_HUB_OFFLINE is set and it is not in the local cache)"
        raise SourceUnavailableError(
            f"cannot load the dataset {source!r} from the Hugging Face Hub"
            f"{offline if datasets.config.HF_HUB_OFFLINE else ''}: {exc}. "
            f'Download it on a machine with access, e.g. `python -c "import datasets; '
            f"datasets.load_dataset('{source}', split='train').save_to_disk('flowers')\"`, "
            f"copy that directory here and pass --source flowers (an image folder "
            f"DIR/<class_name>/*.jpg works too), or use --source {SYNTHETIC} for a smoke run"
        ) from exc
    except ValueError as exc:
        raise ConfigError(
            f"source (--source) {source!r}: cannot load its train split: {exc}"
        ) from exc
    return _normalize(dataset, where=source)


def _load_local(root: Path) -> datasets.Dataset:
    import datasets

    if (root / "dataset_dict.json").is_file() or (root / "state.json").is_file():
        loaded = datasets.load_from_disk(str(root))
        if isinstance(loaded, datasets.DatasetDict):
            if "train" in loaded:
                loaded = loaded["train"]
            elif len(loaded) == 1:
                loaded = next(iter(loaded.values()))
            else:
                raise ConfigError(
                    f"source (--source) {root} holds the splits {sorted(loaded)} and none is "
                    f"named 'train'; save the split to use with Dataset.save_to_disk"
                )
        return _normalize(loaded, where=str(root))
    paths, labels, texts, names = _scan_image_folder(root)
    features = datasets.Features(
        {
            "image": datasets.Image(decode=False),
            "label": datasets.ClassLabel(names=names),
            "text": datasets.Value("string"),
        }
    )
    images = [{"bytes": None, "path": str(p)} for p in paths]
    table = {"image": images, "label": labels, "text": texts}
    return _normalize(datasets.Dataset.from_dict(table, features=features), where=str(root))


def _scan_image_folder(root: Path) -> tuple[list[Path], list[int], list[str | None], list[str]]:
    """Index an image folder without decoding anything (bad files are skipped later).

    Either ``root/metadata.jsonl`` lists ``file_name`` with ``text`` and/or ``label``
    (int index, optionally named by ``label_name``, or a class-name string), or images
    sit in ``root/<class_name>/``, the ``datasets`` "imagefolder" layout.
    """
    meta = root / METADATA
    if meta.is_file():
        return _scan_metadata(root, meta)
    visible = [p for p in sorted(root.iterdir()) if not p.name.startswith(".")]
    loose = [p for p in visible if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES]
    class_dirs = [p for p in visible if p.is_dir()]
    if loose and class_dirs:
        raise ConfigError(
            f"source (--source) {root} mixes images at the top level with sub-directories; "
            f"put every image in {root}/<class_name>/ or list them in {root}/{METADATA}"
        )
    paths: list[Path] = []
    labels: list[int] = []
    if loose:
        names = ["flower"]
        paths, labels = loose, [0] * len(loose)
    else:
        names = []
        for class_dir in class_dirs:
            files = [
                p
                for p in sorted(class_dir.rglob("*"))
                if p.is_file()
                and p.suffix.lower() in _IMAGE_SUFFIXES
                and not any(part.startswith(".") for part in p.relative_to(class_dir).parts)
            ]
            if files:
                labels += [len(names)] * len(files)
                names.append(class_dir.name)
                paths += files
    if not paths:
        raise ConfigError(
            f"source (--source) {root} has no images ({', '.join(sorted(_IMAGE_SUFFIXES))}); "
            f"expected {root}/<class_name>/*.jpg or {root}/{METADATA}"
        )
    return paths, labels, [None] * len(paths), names


def _scan_metadata(
    root: Path, meta: Path
) -> tuple[list[Path], list[int], list[str | None], list[str]]:
    entries: list[dict[str, Any]] = []
    for lineno, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{meta}:{lineno} is not valid JSON ({exc.msg})") from exc
        if not isinstance(entry, dict) or _member(root, entry.get("file_name")) is None:
            raise ConfigError(
                f'{meta}:{lineno} needs a relative "file_name" inside {root} '
                f'(and "text" and/or "label")'
            )
        entries.append(entry)
    if not entries:
        raise ConfigError(f"{meta} lists no images")

    raw = [e.get("label") for e in entries]
    named = [e.get("label_name") for e in entries]
    if all(v is None for v in raw) and all(isinstance(n, str) for n in named):
        raw, named = list(named), [None] * len(named)
    if all(v is None for v in raw):
        names, labels = ["flower"], [0] * len(entries)
    elif all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in raw):
        # Integer indices (e.g. a shard written by this module): keep them, name them
        # from label_name where given.
        given = {v: n for v, n in zip(raw, named, strict=True) if isinstance(n, str)}
        names = [given.get(i, str(i)) for i in range(max(raw) + 1)]
        labels = list(raw)
    elif all(isinstance(v, str) and v for v in raw):
        names = sorted(set(raw))
        labels = [names.index(v) for v in raw]
    else:
        raise ConfigError(
            f'{meta}: "label" must be on every line and either all non-negative integers '
            f"or all class-name strings"
        )
    if len(set(names)) != len(names):
        raise ConfigError(f"{meta}: two label indices share one label_name: {names}")
    paths = [root / PurePosixPath(e["file_name"]) for e in entries]
    texts = [e["text"] if isinstance(e.get("text"), str) else None for e in entries]
    return paths, labels, texts, names


def _normalize(dataset: datasets.Dataset, where: str = SYNTHETIC) -> datasets.Dataset:
    """Columns ``image`` (undecoded), ``label`` (ClassLabel), optional ``text``, and an index.

    Images stay undecoded so that each one is decoded by us, inside a try/except: a
    single corrupt file must be skipped, not abort the whole job.
    """
    import datasets

    features = dataset.features
    image_col = "image" if isinstance(features.get("image"), datasets.Image) else None
    image_col = image_col or next(
        (k for k, v in features.items() if isinstance(v, datasets.Image)), None
    )
    if image_col is None:
        raise ConfigError(
            f"source (--source) {where} has no image column (columns: {list(features)})"
        )
    label_col = "label" if "label" in features else None
    label_col = label_col or next(
        (k for k, v in features.items() if isinstance(v, datasets.ClassLabel)), None
    )
    text = features.get("text")
    keep = [image_col] + ([label_col] if label_col else [])
    if isinstance(text, datasets.Value) and text.dtype in ("string", "large_string"):
        keep.append("text")
    dataset = dataset.select_columns(keep)
    renames = {c: n for c, n in ((image_col, "image"), (label_col, "label")) if c and c != n}
    if renames:
        dataset = dataset.rename_columns(renames)
    dataset = dataset.cast_column("image", datasets.Image(decode=False))

    label = dataset.features.get("label")
    if label is None:
        dataset = dataset.add_column(
            "label", [0] * len(dataset), feature=datasets.ClassLabel(names=["flower"])
        )
    elif isinstance(label, datasets.Value) and label.dtype in ("string", "large_string"):
        dataset = dataset.class_encode_column("label")
    elif isinstance(label, datasets.Value) and label.dtype.startswith(("int", "uint")):
        values = dataset["label"]
        if min(values, default=0) < 0:
            raise ConfigError(f"source (--source) {where} has negative integer labels")
        names = [str(i) for i in range(max(values, default=0) + 1)]
        dataset = dataset.cast_column("label", datasets.ClassLabel(names=names))
    elif not isinstance(label, datasets.ClassLabel):
        raise ConfigError(
            f"source (--source) {where}: column 'label' must be a class label, an integer or "
            f"a string, got {label}"
        )
    return dataset.add_column(_INDEX_COLUMN, list(range(len(dataset))))


# --------------------------------------------------------------------------- synthetic

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
