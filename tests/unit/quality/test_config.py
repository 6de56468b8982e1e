"""The eval-* keys: validated, owned by QualityConfig, round-tripped by RunConfig."""

from __future__ import annotations

import pytest

from fedsd.config import ConfigError, RunConfig
from fedsd.quality.config import QualityConfig


def test_off_by_default_and_scores_base_every_kth_and_last_round():
    assert not RunConfig().quality.enabled
    q = RunConfig.from_mapping({"eval-every": 2, "num-server-rounds": 5}).quality
    assert [r for r in range(6) if q.due(r, 5)] == [0, 2, 4, 5]
    assert not QualityConfig().due(0, 3)


def test_bad_values_and_typos_are_refused_with_the_key():
    with pytest.raises(ConfigError, match="eval-every"):
        RunConfig.from_mapping({"eval-every": -1})
    with pytest.raises(ConfigError, match="eval-steps"):
        RunConfig.from_mapping({"eval-steps": 0})
    with pytest.raises(ConfigError, match="did you mean 'eval-every'"):
        RunConfig.from_mapping({"eval-evry": 1})
    RunConfig.from_mapping({"eval-timesteps": 4})  # RunConfig's own, not a typo


def test_round_trips_through_the_flower_mapping():
    cfg = RunConfig.from_mapping({"eval-every": 3, "eval-guidance-scale": 2.0})
    again = RunConfig.from_mapping(cfg.to_mapping())
    assert again.quality == cfg.quality == QualityConfig(eval_every=3, eval_guidance_scale=2.0)
