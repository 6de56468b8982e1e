"""The server's pooled figures: exact against a central computation, and a node's
statistics checked like any other input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsd.quality.extractors import tiny_features
from fedsd.quality.node import features, fid_state
from fedsd.quality.pooled import check_stats, fid_metric, pool

NAME = "tiny random stand-ins (NOT real metrics)"


def _images(n: int, seed: int, shift: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 200, (n, 3, 24, 24), generator=g) + shift).to(torch.uint8)


def _node(extractor, n_real: int, n_fake: int, seed: int, **metrics):
    real, fake = (
        features(extractor, _images(n_real, seed)),
        features(extractor, _images(n_fake, seed + 1, shift=40)),
    )
    base = {"real-images": n_real, "generated-images": n_fake, "kid": 0.5, "clip-images": 0}
    return fid_state(real, fake), {**base, **metrics}, (real, fake)


def test_pooled_fid_equals_the_fid_of_the_union_of_the_nodes_features():
    torch.manual_seed(0)
    extractor = tiny_features().eval()
    nodes = [_node(extractor, n, m, seed) for n, m, seed in ((5, 3, 1), (9, 7, 2), (2, 6, 3))]
    stats = [check_stats(i, arrays, metrics, NAME) for i, (arrays, metrics, _) in enumerate(nodes)]
    figures, others = pool(stats)
    central = fid_metric(64)
    central.update(torch.cat([real for *_, (real, _) in nodes]), real=True)
    central.update(torch.cat([fake for *_, (_, fake) in nodes]), real=False)
    assert others == []
    assert figures["fid"] == pytest.approx(float(central.compute()), rel=1e-9, abs=1e-12)
    assert figures["fid"] > 0
    assert (figures["real_images"], figures["generated_images"], figures["nodes"]) == (16, 16, 3)


def test_pooled_fid_is_that_of_torchmetrics_on_the_images_themselves():
    """The same figure as torchmetrics' FID handed the extractor and the images."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    torch.manual_seed(0)
    extractor = tiny_features().eval()
    extractor.num_features = 64
    nodes = [_node(extractor, 6, 4, seed) for seed in (10, 20)]
    figures, _ = pool([check_stats(i, a, m, NAME) for i, (a, m, _) in enumerate(nodes)])
    central = FrechetInceptionDistance(feature=extractor)
    for seed, (n_real, n_fake) in ((10, (6, 4)), (20, (6, 4))):
        central.update(_images(n_real, seed), real=True)
        central.update(_images(n_fake, seed + 1, shift=40), real=False)
    assert figures["fid"] == pytest.approx(float(central.compute()), rel=1e-5)


def test_kid_is_the_image_weighted_mean_and_clip_score_pools_exactly():
    extractor = tiny_features().eval()
    a = _node(extractor, 4, 2, 1, kid=0.1, **{"clip-score-sum": 60.0, "clip-images": 2})
    b = _node(extractor, 4, 6, 2, kid=0.5, **{"clip-score-sum": 120.0, "clip-images": 6})
    figures, _ = pool([check_stats(i, arr, m, NAME) for i, (arr, m, _) in enumerate((a, b))])
    assert figures["kid"] == pytest.approx((0.1 * 2 + 0.5 * 6) / 8)
    assert figures["clip_score"] == pytest.approx(180.0 / 8)
    assert figures["clip_images"] == 8


def _bad(mutate) -> str:
    extractor = tiny_features().eval()
    arrays, metrics, _ = _node(extractor, 5, 5, 7)
    mutate(arrays, metrics)
    verdict = check_stats(3, arrays, metrics, NAME)
    assert isinstance(verdict, str), verdict
    return verdict


def test_statistics_no_node_could_produce_are_dropped_with_their_reason():
    assert _bad(lambda a, m: a.pop("fake-sum")) == "missing-statistics"
    assert _bad(lambda a, m: a.update({"real-sum": a["real-sum"][:10]})) == "shape"
    assert _bad(lambda a, m: a["real-cov-sum"].__setitem__((0, 0), np.nan)) == "non-finite"
    assert _bad(lambda a, m: a["fake-sum"].__setitem__(0, np.inf)) == "non-finite"
    assert _bad(lambda a, m: m.update({"real-images": 0})) == "counts"
    assert _bad(lambda a, m: m.update({"generated-images": 1e12})) == "counts"
    assert _bad(lambda a, m: m.update({"real-images": 2.5})) == "counts"
    assert _bad(lambda a, m: m.update({"real-images": True})) == "counts"
    assert _bad(lambda a, m: m.update({"clip-images": 6})) == "counts"  # > generated
    # a second moment below the squared mean: no set of real features has it
    assert _bad(lambda a, m: a.update({"real-cov-sum": a["real-cov-sum"] * 0.01})) == "moments"
    assert _bad(lambda a, m: a["fake-cov-sum"].__setitem__((0, 1), 1e9)) == "moments"
    assert _bad(lambda a, m: m.update({"clip-score-sum": 1e6, "clip-images": 5})) == "clip-score"


def test_a_node_with_another_extractor_is_left_out_not_mixed_in():
    extractor = tiny_features().eval()
    same = [check_stats(i, *_node(extractor, 4, 4, i)[:2], NAME) for i in range(2)]
    other = check_stats(9, *_node(extractor, 4, 4, 9)[:2], "inception-2015-12-05 + clip")
    figures, left_out = pool([*same, other])
    assert [s.node for s in left_out] == [9]
    assert figures["nodes"] == 2 and figures["extractors"] == NAME


def test_no_statistics_give_no_figures():
    figures, left_out = pool([])
    assert figures["fid"] is None and figures["kid"] is None and figures["clip_score"] is None
    assert figures["nodes"] == 0 and left_out == []


def test_a_nodes_extractor_name_is_made_printable_and_bounded():
    arrays, metrics, _ = _node(tiny_features().eval(), 3, 3, 5)
    stats = check_stats(1, arrays, metrics, "x\n\x1b[31mfake line" + "y" * 500)
    assert stats.extractors.startswith("x??[31mfake line") and len(stats.extractors) == 120
