"""Run config: typed, validated once, refused with a message naming the value."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedsd.config import ConfigError, RunConfig

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_defaults_are_valid_and_round_trip():
    raw = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    cfg = RunConfig.from_mapping(raw)
    assert cfg.lora_targets == ("to_q", "to_k", "to_v", "to_out.0")
    assert RunConfig.from_mapping(cfg.to_mapping()) == cfg


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("num-server-rounds", 0),
        ("fraction-train", 0.0),
        ("fraction-train", 1.5),
        ("min-nodes", 0),
        ("local-epochs", 0),
        ("learning-rate", -1.0),
        ("learning-rate", float("nan")),
        ("lora-rank", 0),
        ("lora-variant", "dora"),
        ("resolution", 100),
        ("batch-size", 0),
        ("num-server-rounds", 2.5),
        ("num-server-rounds", "three"),
        ("lora-targets", ""),
    ],
)
def test_invalid_values_are_refused_naming_the_key(key, value):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_mapping({key: value})
    assert key in str(err.value)
    assert repr(value) in str(err.value) or str(value) in str(err.value)


def test_unknown_keys_are_kept_for_later_layers():
    cfg = RunConfig.from_mapping({"privacy": "none", "num-server-rounds": 2})
    assert cfg.extra == {"privacy": "none"} and cfg.num_server_rounds == 2
