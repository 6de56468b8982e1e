"""The sources shards are written from: a hub dataset, a local image folder or
``save_to_disk`` directory, normalised to one schema."""

from __future__ import annotations

import json
import logging
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from fedsd.common.errors import ConfigError
from fedsd.ml.data.shards import (
    INDEX_COLUMN,
    METADATA,
    SYNTHETIC,
    SourceUnavailableError,
    member_path,
)
from fedsd.ml.data.synthetic import make_synthetic_dataset

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


def load_source(
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
        if not isinstance(entry, dict) or member_path(root, entry.get("file_name")) is None:
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
    return dataset.add_column(INDEX_COLUMN, list(range(len(dataset))))
