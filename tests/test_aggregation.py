"""FedAvg: the aggregate is the image-weighted mean."""

from __future__ import annotations

import numpy as np
import pytest

from fedsd.aggregation import weighted_mean, weighted_metric


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
