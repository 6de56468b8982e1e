"""Reading a node's shard (runs in every ClientApp process: stdlib and Pillow only), and
the layout, constants and errors both sides share."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from PIL import Image

from fedsd.ml.flowers import (
    GENERIC_PROMPT,
    prompt_for_label_name,
)

if TYPE_CHECKING:
    pass

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

SHARD_RE = re.compile(r"shard-\d+")
INDEX_COLUMN = "_fedsd_index"
UNLABELED = "unlabeled"
_SHARDS_HINT = (
    "create shards with `fedsd shards --source <hub id | DIR | synthetic> "
    "--num-shards N --out DIR` and point each node at DIR/shard-<i>"
)


class SourceUnavailableError(FileNotFoundError):
    """The source dataset cannot be reached or found; the message says how to provide it."""


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
        found = sorted(p.name for p in shard.iterdir() if SHARD_RE.fullmatch(p.name))
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
        path = member_path(root, file_name)
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
        path = member_path(root, name)
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


def member_path(root: Path, file_name: Any) -> Path | None:
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
    if isinstance(name, str) and name.strip() and name != UNLABELED:
        return prompt_for_label_name(name)
    return GENERIC_PROMPT


def _entry_label(entry: dict[str, Any]) -> int:
    try:
        return int(entry.get("label", -1))
    except (TypeError, ValueError):
        return -1
