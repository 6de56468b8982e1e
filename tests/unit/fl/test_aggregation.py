"""FedAvg: the aggregate is the image-weighted mean; the robust rules are exact and bound
one poisoning node."""

from __future__ import annotations

import numpy as np
import pytest

from fedsd.fl.aggregation import (
    AGGREGATIONS,
    aggregate,
    coordinate_median,
    trim_count,
    trimmed_mean,
    weighted_mean,
    weighted_metric,
)


def test_aggregate_equals_image_weighted_mean():
    rng = np.random.default_rng(0)
    names = ["b.lora_B.weight", "a.lora_A.weight"]
    updates = [
        ({n: rng.standard_normal((3, 4)).astype(np.float32) for n in names}, w)
        for w in (10.0, 30.0, 60.0)
    ]
    agg = weighted_mean(updates)
    assert list(agg) == sorted(names)
    for n in names:
        expected = sum(u[n].astype(np.float64) * w for u, w in updates) / 100.0
        np.testing.assert_allclose(agg[n], expected, rtol=1e-6)
        assert agg[n].dtype == np.float32
    # Not the unweighted mean (guards against counting batches or nodes instead of images).
    plain = np.mean([u[names[0]] for u, _ in updates], axis=0)
    assert not np.allclose(agg[names[0]], plain)


def test_order_of_nodes_does_not_matter():
    rng = np.random.default_rng(1)
    updates = [({"x": rng.standard_normal(5).astype(np.float32)}, float(w)) for w in (1, 2, 3)]
    a = weighted_mean(updates)["x"]
    b = weighted_mean(list(reversed(updates)))["x"]
    np.testing.assert_array_equal(a, b)


def test_bad_updates_are_refused():
    x = {"x": np.ones(2, np.float32)}
    with pytest.raises(ValueError, match="no updates"):
        weighted_mean([])
    with pytest.raises(ValueError, match="positive sum"):
        weighted_mean([(x, 0.0)])
    with pytest.raises(KeyError):
        weighted_mean([(x, 1.0), ({"y": np.ones(2, np.float32)}, 1.0)])
    with pytest.raises(ValueError, match="shape"):
        weighted_mean([(x, 1.0), ({"x": np.ones(3, np.float32)}, 1.0)])


def test_weighted_metric_skips_nan_and_zero_weight():
    assert weighted_metric([(1.0, 1.0), (3.0, 3.0), (float("nan"), 5.0), (9.0, 0.0)]) == 2.5
    assert np.isnan(weighted_metric([]))


# -- robust rules (fedsd.fl.aggregation.trimmed_mean / coordinate_median) -------------------
def _updates(*rows, weights=None):
    weights = weights or [1.0] * len(rows)
    return [({"x": np.asarray(r, np.float32)}, w) for r, w in zip(rows, weights, strict=True)]


def test_trim_count():
    assert [trim_count(n, 0.2) for n in (1, 2, 3, 4, 5, 9, 10, 11)] == [0, 0, 1, 1, 1, 1, 2, 2]
    assert trim_count(5, 0.0) == 1  # at least one from each end with 3+ nodes
    assert trim_count(4, 0.49) == 1  # always leaves a value
    assert trim_count(7, 0.49) == 3


def test_trimmed_mean_is_exact_and_ignores_weights():
    ups = _updates([1, 10], [2, -5], [3, 0], [4, 7], [100, 1], weights=[1, 1, 1, 1, 1000])
    # one cut from each end per coordinate: [2, 3, 4] and [0, 1, 7]
    np.testing.assert_allclose(trimmed_mean(ups, 0.2)["x"], [3.0, 8 / 3], rtol=1e-6)
    # 0.4 of 5 nodes = 2 from each end: the median
    np.testing.assert_allclose(trimmed_mean(ups, 0.4)["x"], [3.0, 1.0])
    # fewer than 3 nodes: nothing to cut, the plain mean
    np.testing.assert_allclose(trimmed_mean(ups[:2], 0.2)["x"], [1.5, 2.5])
    # weight 0 means "no update": left out before trimming
    zero = _updates([1], [2], [3], [1e9], weights=[1, 1, 1, 0])
    np.testing.assert_allclose(trimmed_mean(zero, 0.2)["x"], [2.0])
    assert trimmed_mean(ups, 0.2)["x"].dtype == np.float32


def test_coordinate_median_is_exact():
    ups = _updates([1, 10], [2, -5], [3, 0], [4, 7], [100, 1])
    np.testing.assert_array_equal(coordinate_median(ups)["x"], [3, 1])
    np.testing.assert_array_equal(coordinate_median(ups[:4])["x"], [2.5, 3.5])
    with pytest.raises(ValueError, match="positive weight"):
        coordinate_median(_updates([1], weights=[0.0]))


def test_aggregate_dispatches_and_fedavg_is_the_weighted_mean():
    ups = _updates([1.0], [3.0], weights=[1.0, 3.0])
    assert aggregate("fedavg", ups)["x"][0] == pytest.approx(2.5)
    assert aggregate("median", ups)["x"][0] == 2.0
    assert aggregate("trimmed-mean", ups, 0.2)["x"][0] == 2.0
    with pytest.raises(ValueError, match="aggregation"):
        aggregate("krum", ups)


def test_one_poisoner_x100_moves_robust_rules_far_less_than_fedavg():
    """5 nodes with equal weights send noisy versions of one true update; one of them
    scales its update by 100. The shift of the aggregate (against the honest run's) is
    measured for each rule."""
    rng = np.random.default_rng(0)
    true = rng.standard_normal(1000)
    honest = [true + 0.3 * rng.standard_normal(1000) for _ in range(5)]
    poisoned = [h.copy() for h in honest]
    poisoned[0] = 100 * poisoned[0]
    shift = {}
    for rule in AGGREGATIONS:
        clean = aggregate(rule, _updates(*honest), 0.2)["x"]
        bad = aggregate(rule, _updates(*poisoned), 0.2)["x"]
        shift[rule] = float(np.linalg.norm(bad - clean) / np.linalg.norm(clean))
        if rule != "fedavg":  # the robust aggregate stays close to the truth
            assert np.linalg.norm(bad - true) < 0.5 * np.linalg.norm(true), rule
    assert shift["fedavg"] > 15  # (100 - 1) / 5 of one node's update
    assert shift["trimmed-mean"] < shift["fedavg"] / 50
    assert shift["median"] < shift["fedavg"] / 50
