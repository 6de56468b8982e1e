"""Where a node finds its feature extractors, and what it says when it has none."""

from __future__ import annotations

import pytest
import torch

from fedsd.quality.extractors import (
    ExtractorsMissing,
    fetch_extractors,
    find_dir,
    load_clip,
    load_inception,
    read_info,
    write_tiny_extractors,
)


def test_tiny_stand_ins_load_like_the_real_ones_and_say_what_they_are(tmp_path):
    d = write_tiny_extractors(tmp_path / "x")
    info = read_info(d)
    assert info["real"] is False and "NOT real" in info["name"]
    out = load_inception(d, "cpu")(torch.zeros(2, 3, 48, 48, dtype=torch.uint8), True)
    assert tuple(out.shape) == (2, info["feature_dim"])
    model, processor = load_clip(d, "cpu")
    pixels = processor(images=[torch.zeros(3, 48, 48, dtype=torch.uint8)], return_tensors="pt")
    assert model.get_image_features(pixels["pixel_values"]).shape[-1] == 32
    assert "NOT REAL" in (d / "README.md").read_text()


def test_lookup_order_node_config_then_model_then_cache(tmp_path):
    model, cache = tmp_path / "model", tmp_path / "cache"
    write_tiny_extractors(model / "fedsd-quality")
    write_tiny_extractors(cache / "quality-extractors")
    assert find_dir(model, cache, None) == model / "fedsd-quality"
    assert find_dir(tmp_path / "bare", cache, None) == cache / "quality-extractors"
    mine = write_tiny_extractors(tmp_path / "mine")
    assert find_dir(model, cache, str(mine)) == mine


def test_missing_extractors_name_the_command_that_fetches_them(tmp_path):
    with pytest.raises(ExtractorsMissing, match="fedsd fetch-extractors --out .*eval-every=0"):
        find_dir(tmp_path / "model", tmp_path / "cache", None)


def test_fetch_refuses_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE"):
        fetch_extractors(tmp_path / "x")
    assert not (tmp_path / "x").exists()
