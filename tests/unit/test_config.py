"""Run config: typed, validated once, refused with a message naming the value."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedsd.config import ConfigError, RunConfig

ROOT = Path(__file__).resolve().parents[2]


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
        ("max-update-norm", 0.0),
        ("max-update-norm", float("inf")),
        ("max-node-weight", -1.0),
        ("aggregation", "krum"),
        ("trim-fraction", 0.5),
        ("trim-fraction", -0.1),
        ("update-dtype", "bfloat16"),
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


@pytest.mark.parametrize("rule", ["trimmed-mean", "median"])
@pytest.mark.parametrize("privacy", ["secagg", "secagg+dp-sample"])
def test_robust_rules_are_refused_with_secagg(rule, privacy):
    raw = {"aggregation": rule, "privacy": privacy, "dp-noise-multiplier": 1.0}
    with pytest.raises(ConfigError, match="aggregation=.*SecAgg\\+ the server sees only the sum"):
        RunConfig.from_mapping(raw)
    assert RunConfig.from_mapping({**raw, "aggregation": "fedavg"}).aggregation == "fedavg"


def test_float16_updates_are_refused_with_secagg():
    with pytest.raises(ConfigError, match="SecAgg\\+ sends its own quantized vector"):
        RunConfig.from_mapping({"privacy": "secagg", "update-dtype": "float16"})
    dp_output = {"dp-output-clip": 1.0, "dp-output-epsilon": 8.0, "dp-output-delta": 1e-5}
    cfg = RunConfig.from_mapping({"privacy": "dp-output", "update-dtype": "float16", **dp_output})
    assert cfg.update_dtype == "float16"


def test_robust_rules_are_refused_with_central_dp():
    raw = {"privacy": "dp-central", "dp-central-clip": 1.0, "dp-central-noise-multiplier": 1.0}
    with pytest.raises(ConfigError, match="aggregation='median'.*sensitivity"):
        RunConfig.from_mapping({**raw, "aggregation": "median"})


def test_validation_and_aggregation_defaults():
    cfg = RunConfig.from_mapping({"aggregation": "trimmed-mean", "trim-fraction": 0.1})
    assert (cfg.aggregation, cfg.trim_fraction) == ("trimmed-mean", 0.1)
    default = RunConfig()
    assert default.aggregation == "fedavg" and default.max_update_norm == 10_000.0
