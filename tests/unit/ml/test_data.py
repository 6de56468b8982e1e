"""Data shards: partitioning, the on-disk contract, bad-image handling, label mapping.

Everything is built in code (the synthetic source or small image folders); nothing is
downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image, ImageStat

from fedsd.ml.data import (
    ShardSplit,
    SourceUnavailableError,
    load_split,
    make_synthetic_dataset,
    resolve_shard_dir,
    split_fingerprint,
    synthetic_image,
    write_shards,
)
from fedsd.ml.data import writer as data_writer
from fedsd.ml.flowers import (
    OXFORD_FLOWERS_CLASS_NAMES,
    class_table,
    flower_name,
    is_oxford_id_names,
    label_display_name,
    prompt_for_label,
    prompt_for_label_name,
)

# Lexicographic order of the hub copy's ClassLabel names: '1', '10', '100', '101', ...
HUB_NAMES = sorted(str(i) for i in range(1, 103))


def _shards(out: Path, **overrides) -> dict:
    kwargs = dict(
        source="synthetic",
        num_shards=2,
        partitioner="iid",
        alpha=0.5,
        val_fraction=0.25,
        seed=7,
        out=out,
        synthetic_images=64,
    )
    kwargs.update(overrides)
    return write_shards(**kwargs)


def _metadata(split_dir: Path) -> list[dict]:
    lines = (split_dir / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _write_png(path: Path, slot: int, seed: int = 0, size: tuple[int, int] = (48, 48)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = synthetic_image(slot, random.Random(seed), 48).resize(size)
    image.save(path, format="PNG")


@pytest.fixture(scope="module")
def iid_out(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("iid") / "shards"
    return out, _shards(out)


# ------------------------------------------------------------------------- flowers.py


def test_class_names_are_the_official_102_in_order():
    assert len(OXFORD_FLOWERS_CLASS_NAMES) == 102
    assert len(set(OXFORD_FLOWERS_CLASS_NAMES)) == 102
    # Digest of the TFDS ``oxford_flowers102`` ClassLabel names (its 0-based order is the
    # official one), joined with newlines: any reordering or typo changes it.
    digest = hashlib.sha256("\n".join(OXFORD_FLOWERS_CLASS_NAMES).encode()).hexdigest()
    assert digest == "f5a3bda044faf55b626a924fae178aed1ec0dd6fdfa793cc59df4ce4bd3714ac"
    assert OXFORD_FLOWERS_CLASS_NAMES[:4] == (
        "pink primrose",
        "hard-leaved pocket orchid",
        "canterbury bells",
        "sweet pea",
    )
    assert flower_name(10) == "globe thistle"
    assert flower_name(54) == "sunflower"
    assert flower_name(102) == "blackberry lily"
    with pytest.raises(ValueError):
        flower_name(0)


def test_hub_label_index_maps_through_the_name_to_the_official_id():
    assert HUB_NAMES[:6] == ["1", "10", "100", "101", "102", "11"]
    # Index 1 is the name '10', i.e. official id 10, not id 2 ("hard-leaved pocket orchid").
    assert label_display_name(HUB_NAMES, 1) == "globe thistle"
    assert label_display_name(HUB_NAMES, 0) == "pink primrose"
    assert label_display_name(HUB_NAMES, 2) == "blanket flower"  # '100'
    assert label_display_name(HUB_NAMES, HUB_NAMES.index("2")) == "hard-leaved pocket orchid"
    assert prompt_for_label(HUB_NAMES, 1) == "a photo of a globe thistle, a type of flower"
    table = class_table(HUB_NAMES)
    assert all(row["label_name"] == flower_name(int(row["name"])) for row in table)


def test_prompt_mapping_with_a_datasets_class_label_and_own_names():
    import datasets

    hub = datasets.ClassLabel(names=HUB_NAMES)
    assert prompt_for_label(hub, 1) == "a photo of a globe thistle, a type of flower"
    own = datasets.ClassLabel(names=["rose", "tulip"])
    assert prompt_for_label(own, 1) == "a photo of a tulip, a type of flower"
    assert prompt_for_label_name("pink primrose") == "a photo of a pink primrose, a type of flower"
    assert prompt_for_label_name("pink-yellow dahlia?") == (
        "a photo of a pink-yellow dahlia, a type of flower"
    )
    # Digit names outside 1..102 are not Oxford ids: used verbatim.
    assert not is_oxford_id_names(["0", "1"])
    assert label_display_name(["0", "1"], 1) == "1"


# ------------------------------------------------------------------------- write_shards


def test_iid_shards_are_disjoint_complete_and_match_the_manifest(iid_out):
    out, manifest = iid_out
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-0", "shard-1"]
    assert manifest["num_shards"] == 2 and manifest["partitioner"] == "iid"
    assert manifest["source_rows"] == 64 and manifest["totals"]["skipped"] == 0

    seen: list[str] = []
    sizes = []
    for shard in manifest["shards"]:
        shard_dir = out / shard["name"]
        n = 0
        for split in ("train", "val"):
            entries = _metadata(shard_dir / split)
            names = [e["file_name"] for e in entries]
            seen += names
            n += len(entries)
            # The manifest's counts are the metadata's counts.
            assert shard[split]["images"] == len(entries)
            assert shard[split]["per_class"] == dict(Counter(e["label_name"] for e in entries))
            # Each listed image exists and is a 64x64 RGB PNG; nothing else is in the split.
            files = sorted(p.name for p in (shard_dir / split).glob("*.png"))
            assert files == sorted(names)
            for entry in entries:
                row = manifest["classes"][entry["label"]]
                assert entry["label_name"] == row["label_name"]
                assert entry["text"] == row["prompt"]
            with Image.open(shard_dir / split / names[0]) as im:
                assert (im.format, im.mode, im.size) == ("PNG", "RGB", (64, 64))
        # val_fraction=0.25 is respected per shard.
        assert shard["val"]["images"] == round(n * 0.25)
        sizes.append(n)

    assert len(seen) == len(set(seen)), "an image landed in two shards/splits"
    assert sum(sizes) == 64 == manifest["totals"]["images"]
    assert abs(sizes[0] - sizes[1]) <= 1
    assert sum(manifest["totals"]["per_class"].values()) == 64


def test_load_split_reads_what_write_shards_wrote(iid_out):
    out, manifest = iid_out
    split = load_split(resolve_shard_dir(out / "shard-1") / "train")
    entries = _metadata(out / "shard-1" / "train")
    assert isinstance(split, ShardSplit)
    assert len(split) == len(split.prompts) == len(split.labels) == len(entries)
    assert split.skipped == 0 and split.skipped_files == []
    assert split.prompts == [e["text"] for e in entries]
    assert split.labels == [e["label"] for e in entries]
    assert all(im.mode == "RGB" and im.size == (64, 64) for im in split.images)
    # Synthetic labels are indices into the hub-style ClassLabel, so the prompts are real
    # flower names (e.g. index 1 -> '10' -> globe thistle).
    assert set(split.prompts) <= {row["prompt"] for row in manifest["classes"]}


def test_same_seed_is_deterministic_and_another_seed_is_not(tmp_path):
    a = _shards(tmp_path / "a", partitioner="dirichlet", alpha=0.3)
    b = _shards(tmp_path / "b", partitioner="dirichlet", alpha=0.3)
    c = _shards(tmp_path / "c", partitioner="dirichlet", alpha=0.3, seed=8)
    assert a["shards"] == b["shards"]
    for split in ("shard-0/train", "shard-1/val"):
        assert (tmp_path / "a" / split / "metadata.jsonl").read_bytes() == (
            tmp_path / "b" / split / "metadata.jsonl"
        ).read_bytes()
        for png in (tmp_path / "a" / split).glob("*.png"):
            assert png.read_bytes() == (tmp_path / "b" / split / png.name).read_bytes()
    assert a["shards"] != c["shards"]


def _label_skew(manifest: dict) -> float:
    """Mean total-variation distance between each shard's class mix and the global one."""
    overall = Counter(manifest["totals"]["per_class"])
    total = sum(overall.values())
    distances = []
    for shard in manifest["shards"]:
        counts = Counter(shard["train"]["per_class"]) + Counter(shard["val"]["per_class"])
        n = sum(counts.values())
        distances.append(0.5 * sum(abs(counts[k] / n - overall[k] / total) for k in overall))
    return sum(distances) / len(distances)


def test_dirichlet_with_small_alpha_skews_labels_more_than_iid(tmp_path):
    common = dict(num_shards=2, alpha=0.1, seed=0, val_fraction=0.2, synthetic_images=96)
    iid = _shards(tmp_path / "iid", partitioner="iid", **common)
    skewed = _shards(tmp_path / "dir", partitioner="dirichlet", **common)
    assert skewed["alpha"] == 0.1 and skewed["partitioner"] == "dirichlet"
    assert skewed["totals"]["images"] == 96  # partitions still cover the source
    assert _label_skew(skewed) > _label_skew(iid) + 0.15
    assert _label_skew(iid) < 0.2


@pytest.mark.parametrize(
    ("kwarg", "value", "key"),
    [
        ("partitioner", "pathological", "partitioner"),
        ("num_shards", 0, "num_shards"),
        ("val_fraction", 1.0, "val_fraction"),
        ("val_fraction", -0.1, "val_fraction"),
        ("alpha", 0.0, "alpha"),
        ("alpha", -1.0, "alpha"),
        ("image_size", 0, "image_size"),
        ("synthetic_images", 0, "synthetic_images"),
    ],
)
def test_invalid_arguments_raise_before_writing(tmp_path, kwarg, value, key):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=key):
        _shards(out, **{kwarg: value})
    assert not out.exists()


def test_more_shards_than_examples_is_refused(tmp_path):
    with pytest.raises(ValueError, match="num_shards"):
        _shards(tmp_path / "out", num_shards=5, synthetic_images=4)
    assert not (tmp_path / "out").exists()


def test_refuses_to_write_into_a_foreign_directory(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.tex").write_text("precious")
    with pytest.raises(ValueError, match="not fedsd shards"):
        _shards(tmp_path / "out")
    assert (tmp_path / "out" / "thesis.tex").read_text() == "precious"


def test_rewriting_replaces_the_previous_shard_set(tmp_path):
    out = tmp_path / "out"
    _shards(out, num_shards=3)
    manifest = _shards(out, num_shards=2, seed=1)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-0", "shard-1"]
    assert json.loads((out / "manifest.json").read_text())["seed"] == 1
    assert manifest["totals"]["images"] == 64


def test_a_failed_write_leaves_no_half_written_shard(tmp_path, monkeypatch):
    out = tmp_path / "out"
    real = data_writer._write_split
    calls = {"n": 0}

    def crash_on_third_split(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(data_writer, "_write_split", crash_on_third_split)
    with pytest.raises(OSError, match="disk full"):
        _shards(out)
    assert list(out.iterdir()) == []  # staging removed, nothing published


def test_zero_val_fraction_gives_an_empty_but_valid_val_split(tmp_path):
    manifest = _shards(tmp_path / "out", val_fraction=0.0)
    val_dir = tmp_path / "out" / "shard-0" / "val"
    assert (val_dir / "metadata.jsonl").read_text() == ""
    val = load_split(val_dir)
    assert (val.images, val.prompts, val.labels, val.skipped) == ([], [], [], 0)
    assert manifest["totals"]["val"] == 0 and manifest["totals"]["train"] == 64


def test_hub_unreachable_names_the_dataset_and_how_to_provide_it(tmp_path, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nkirschi/oxford-flowers' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(FileNotFoundError) as info:
        _shards(tmp_path / "out", source="nkirschi/oxford-flowers")
    assert isinstance(info.value, SourceUnavailableError)
    message = str(info.value)
    assert "nkirschi/oxford-flowers" in message
    assert "save_to_disk" in message and "--source" in message
    assert not (tmp_path / "out").exists()


def test_hub_path_with_a_cache_backed_dataset_and_a_corrupt_row(tmp_path, monkeypatch):
    """The hub code path, fed a parquet-backed dataset shaped like nkirschi/oxford-flowers."""
    import datasets

    ds = make_synthetic_dataset(24, seed=2, size=32)
    raw = ds.cast_column("image", datasets.Image(decode=False))
    rows = raw.to_dict()
    rows["image"][5] = {"bytes": b"\xff\xd8\xff not really a jpeg", "path": "image_00006.jpg"}
    datasets.Dataset.from_dict(rows, features=raw.features).to_parquet(tmp_path / "train.parquet")
    cache = tmp_path / "hf-cache"
    calls = []
    real_load_dataset = datasets.load_dataset

    def fake_load_dataset(path, split=None, **kwargs):
        calls.append((path, split))
        return real_load_dataset(
            "parquet",
            data_files=str(tmp_path / "train.parquet"),
            split="train",
            cache_dir=str(cache),
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    manifest = _shards(tmp_path / "out", source="nkirschi/oxford-flowers", num_shards=2)
    assert calls == [("nkirschi/oxford-flowers", "train")]
    assert manifest["source"] == "nkirschi/oxford-flowers"
    assert manifest["totals"]["skipped"] == 1 and manifest["totals"]["images"] == 23
    skipped = [
        s for sh in manifest["shards"] for sp in ("train", "val") for s in sh[sp]["skipped_sources"]
    ]
    assert skipped == ["image_00006.jpg"]
    assert "globe thistle" in manifest["totals"]["per_class"]


def test_missing_local_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _shards(tmp_path / "out", source=str(tmp_path / "nope"))


# ------------------------------------------------------------------------- local sources


def test_local_image_folder_with_a_corrupt_image(tmp_path):
    src = tmp_path / "owner-photos"
    for k in range(6):
        _write_png(src / "tulip" / f"t{k}.png", slot=0, seed=k, size=(60, 40))
        _write_png(src / "rose" / f"r{k}.jpg", slot=3, seed=k, size=(60, 40))
    (src / "rose" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (src / "rose" / "notes.txt").write_text("ignored: not an image")

    manifest = _shards(tmp_path / "out", source=str(src), num_shards=1, image_size=32)
    assert manifest["source"] == str(src.resolve())
    assert manifest["source_rows"] == 13
    assert manifest["totals"]["skipped"] == 1
    assert manifest["totals"]["images"] == 12
    assert manifest["totals"]["per_class"] == {"rose": 6, "tulip": 6}
    shard = manifest["shards"][0]
    skipped = shard["train"]["skipped_sources"] + shard["val"]["skipped_sources"]
    assert [Path(p).name for p in skipped] == ["broken.png"]

    train = load_split(tmp_path / "out" / "shard-0" / "train")
    assert train.skipped == 0
    assert {im.size for im in train.images} == {(32, 32)}  # center-cropped and resized
    assert set(train.prompts) <= {
        "a photo of a tulip, a type of flower",
        "a photo of a rose, a type of flower",
    }


def test_local_folder_with_official_id_names_gets_flower_names(tmp_path):
    src = tmp_path / "ids"
    for k in range(2):
        _write_png(src / "10" / f"{k}.png", slot=1, seed=k)
        _write_png(src / "2" / f"{k}.png", slot=2, seed=k)
    manifest = _shards(tmp_path / "out", source=str(src), num_shards=1, val_fraction=0.0)
    assert manifest["totals"]["per_class"] == {"globe thistle": 2, "hard-leaved pocket orchid": 2}


def test_local_metadata_jsonl_keeps_captions(tmp_path):
    src = tmp_path / "captioned"
    lines = []
    for k in range(4):
        _write_png(src / "img" / f"{k}.png", slot=k % 2, seed=k)
        entry = {"file_name": f"img/{k}.png", "text": f"caption {k}"}
        if k % 2:
            entry["label"] = "iris"
        else:
            entry["label"] = "daisy"
        lines.append(json.dumps(entry))
    (src / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    _shards(tmp_path / "out", source=str(src), num_shards=1, val_fraction=0.0)
    split = load_split(tmp_path / "out" / "shard-0" / "train")
    assert sorted(split.prompts) == [f"caption {k}" for k in range(4)]
    entries = _metadata(tmp_path / "out" / "shard-0" / "train")
    assert {e["label_name"] for e in entries} == {"iris", "daisy"}


def test_save_to_disk_directory_is_a_source(tmp_path):
    saved = tmp_path / "saved"
    make_synthetic_dataset(12, seed=3, size=32).save_to_disk(str(saved))
    before = sorted(p.name for p in saved.iterdir())
    manifest = _shards(tmp_path / "out", source=str(saved), num_shards=3)
    assert manifest["totals"]["images"] == 12
    assert sorted(p.name for p in saved.iterdir()) == before  # no cache files left in it
    assert all(s["train"]["images"] >= 1 for s in manifest["shards"])


# ------------------------------------------------------------------------- loader side


def test_load_split_skips_and_counts_corrupt_truncated_and_missing_images(tmp_path):
    _shards(tmp_path / "out", num_shards=1, val_fraction=0.0)
    split_dir = tmp_path / "out" / "shard-0" / "train"
    names = [e["file_name"] for e in _metadata(split_dir)]
    (split_dir / names[0]).write_bytes(os.urandom(512))  # garbage
    truncated = (split_dir / names[1]).read_bytes()
    (split_dir / names[1]).write_bytes(truncated[: len(truncated) // 2])  # cut short
    (split_dir / names[2]).unlink()  # missing

    split = load_split(split_dir)
    assert split.skipped == 3
    assert sorted(split.skipped_files) == sorted(names[:3])
    assert len(split.images) == len(split.prompts) == len(split.labels) == len(names) - 3
    assert all(im.mode == "RGB" for im in split.images)


def test_load_split_falls_back_to_the_label_prompt_and_survives_bad_lines(tmp_path):
    split_dir = tmp_path / "split"
    _write_png(split_dir / "a.png", slot=0)
    _write_png(split_dir / "b.png", slot=1)
    (split_dir / "metadata.jsonl").write_text(
        json.dumps({"file_name": "a.png", "label": 1, "label_name": "globe thistle"})
        + "\n{not json\n"
        + json.dumps({"file_name": "../escape.png", "text": "x"})
        + "\n"
        + json.dumps({"file_name": "b.png", "text": "my caption", "label": 3})
        + "\n"
    )
    split = load_split(split_dir)
    assert split.prompts == ["a photo of a globe thistle, a type of flower", "my caption"]
    assert split.labels == [1, 3]
    assert split.skipped == 2


def test_split_fingerprint_tracks_file_changes(tmp_path):
    _shards(tmp_path / "out", num_shards=1)
    split_dir = tmp_path / "out" / "shard-0" / "val"
    names = [e["file_name"] for e in _metadata(split_dir)]
    first = split_fingerprint(split_dir)
    assert len(first) == 64 and split_fingerprint(split_dir) == first

    image = split_dir / names[0]
    image.write_bytes(image.read_bytes() + b"\0")  # content (and size) change
    second = split_fingerprint(split_dir)
    assert second != first

    st = image.stat()
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touched only
    third = split_fingerprint(split_dir)
    assert third != second

    meta = split_dir / "metadata.jsonl"
    meta.write_text(meta.read_text().replace("a photo of", "a picture of"))
    assert split_fingerprint(split_dir) != third


def test_resolve_shard_dir_explains_what_is_wrong(tmp_path, iid_out):
    out, _ = iid_out
    assert resolve_shard_dir(out / "shard-0") == (out / "shard-0").resolve()
    with pytest.raises(FileNotFoundError, match="fedsd shards") as info:
        resolve_shard_dir(out)
    assert "shard-0" in str(info.value)
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="fedsd shards") as info:
        resolve_shard_dir(missing)
    assert str(missing) in str(info.value)
    with pytest.raises(FileNotFoundError, match="parent"):
        resolve_shard_dir(out / "shard-0" / "train")
    with pytest.raises(FileNotFoundError, match="fedsd shards"):
        load_split(tmp_path)


def test_loader_module_is_cheap_to_import():
    code = (
        "import sys, fedsd.ml.data; "
        "heavy = {'torch', 'datasets', 'flwr_datasets', 'numpy'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_synthetic_source_has_the_hub_schema_and_distinct_classes():
    import datasets

    ds = make_synthetic_dataset(16, seed=5, size=48)
    assert ds.features["label"] == datasets.ClassLabel(names=HUB_NAMES)
    assert isinstance(ds.features["image"], datasets.Image)
    row = ds[0]
    assert row["image"].mode == "RGB" and row["image"].size == (48, 48)
    # Class-conditional structure: same-class images are closer to each other than to
    # other classes (mean colour), so a diffusion model has something to learn.
    means: dict[int, list[tuple[float, ...]]] = {}
    for example in ds:
        mean = tuple(ImageStat.Stat(example["image"]).mean)
        means.setdefault(example["label"], []).append(mean)
    assert len(means) == 8

    def dist(a, b):
        return sum((x - y) ** 2 for x, y in zip(a, b, strict=True)) ** 0.5

    within = max(dist(*group) for group in means.values())
    between = min(dist(means[a][0], means[b][0]) for a in means for b in means if a < b)
    assert within < between
