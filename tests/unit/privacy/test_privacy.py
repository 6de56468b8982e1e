"""fedsd.privacy: modes, config, output DP calibration, cumulative accounting, SecAgg+ checks."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from fedsd.config import ConfigError, RunConfig
from fedsd.privacy import (
    ALLOWED_MODES,
    NodeAccountant,
    PrivacyConfig,
    PrivacyRecord,
    canonical_privacy,
    central_dp_epsilon,
    check_secagg,
    check_secagg_values,
    check_secagg_weight,
    clip_update,
    compose_basic,
    compose_rdp_gaussian,
    compose_rounds,
    gaussian_delta,
    gaussian_sigma,
    history_epsilon,
    laplace_scale,
    noise_multiplier_for,
    parse_privacy,
    planned_steps,
    privatize_update,
    sample_rate_for,
    secagg_defaults,
)

DELTA = 1e-5


# -- modes --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ALLOWED_MODES)
def test_every_allowed_mode_parses_in_any_order(mode):
    comps = parse_privacy(mode)
    assert canonical_privacy(mode) == mode
    assert comps == (frozenset() if mode == "none" else frozenset(mode.split("+")))
    for perm in itertools.permutations(mode.split("+")):
        spelled = " + ".join(perm).upper()  # spaces and case do not matter either
        assert parse_privacy(spelled) == comps
        assert canonical_privacy(spelled) == mode


def test_the_allowed_list_is_exactly_the_documented_one():
    assert set(ALLOWED_MODES) == {
        "none",
        "secagg",
        "dp-sample",
        "dp-output",
        "dp-central",
        "secagg+dp-sample",
        "secagg+dp-central",
        "secagg+dp-output",
        "dp-sample+dp-output",
        "secagg+dp-sample+dp-output",
    }


@pytest.mark.parametrize(
    ("mode", "why"),
    [
        ("", "empty component"),
        ("dp", "unknown component"),
        ("secagg+dpsample", "unknown component"),
        ("secagg++dp-sample", "empty component"),
        ("secagg+secagg", "more than once"),
        ("dp-sample+secagg+dp-sample", "more than once"),
        ("none+secagg", "cannot be combined"),
        ("dp-output+none", "cannot be combined"),
        ("dp-central+dp-output", "pick one"),
        ("dp-sample+dp-central", "pick one"),
        ("secagg+dp-central+dp-sample", "pick one"),
        ("dp-central+dp-sample+dp-output", "pick one"),
    ],
)
def test_refused_modes_name_the_value_and_list_the_allowed(mode, why):
    with pytest.raises(ConfigError) as err:
        parse_privacy(mode)
    msg = str(err.value)
    assert f"privacy={mode!r}" in msg
    assert why in msg
    assert "secagg+dp-sample+dp-output" in msg  # the allowed list is in the message
    with pytest.raises(ConfigError):
        PrivacyConfig.from_mapping({"privacy": mode})


def test_double_noising_refusal_says_why():
    with pytest.raises(ConfigError, match="adds noise twice.*accounting.*compose"):
        parse_privacy("dp-central+dp-output")


# -- config -------------------------------------------------------------------------------

FULL = {
    "privacy": "dp-output+secagg+dp-sample",
    "dp-target-epsilon": 8.0,
    "dp-delta": 1e-6,
    "dp-noise-multiplier": 0.0,
    "dp-max-grad-norm": 0.5,
    "dp-grad-sample-mode": "functorch",
    "dp-output-mechanism": "gaussian",
    "dp-output-clip": 0.1,
    "dp-output-epsilon": 2.0,
    "dp-output-delta": 1e-6,
    "secagg-num-shares": 5,
    "secagg-reconstruction-threshold": 0.6,
    "secagg-clipping-range": 4.0,
    "secagg-quantization-range": 2**20,
    "secagg-modulus-range": 2**30,
    "secagg-max-weight": 5000.0,
}


def test_config_defaults_round_trip_and_canonical_mode():
    default = PrivacyConfig.from_mapping({})
    assert default == PrivacyConfig()
    assert default.privacy == "none" and default.components == frozenset()
    assert default.dp_delta == 1e-5 and default.dp_max_grad_norm == 1.0

    cfg = PrivacyConfig.from_mapping({**FULL, "model": "x", "num-server-rounds": 3})
    assert cfg.privacy == "secagg+dp-sample+dp-output"
    assert cfg.components == {"secagg", "dp-sample", "dp-output"}
    mapping = cfg.to_mapping()
    assert mapping["privacy"] == "secagg+dp-sample+dp-output"
    # an int share count stays an int and a fraction a float (Flower reads them differently)
    assert type(mapping["secagg-num-shares"]) is int
    assert type(mapping["secagg-reconstruction-threshold"]) is float
    assert PrivacyConfig.from_mapping(mapping) == cfg
    assert {k: v for k, v in mapping.items() if k != "privacy"} == {
        k: v for k, v in FULL.items() if k != "privacy"
    }


def test_config_from_run_config_extra_keys():
    run = RunConfig.from_mapping({"num-server-rounds": 2, **FULL})
    assert PrivacyConfig.from_mapping(run.extra) == PrivacyConfig.from_mapping(FULL)
    # numeric strings (e.g. from a CLI) are read like RunConfig reads them
    cfg = PrivacyConfig.from_mapping({"dp-delta": "1e-6", "secagg-num-shares": "0.5"})
    assert cfg.dp_delta == 1e-6 and cfg.secagg_num_shares == 0.5


@pytest.mark.parametrize(
    ("raw", "key", "value"),
    [
        ({"dp-target-epsilon": -1.0}, "dp-target-epsilon", -1.0),
        ({"dp-delta": 0.0}, "dp-delta", 0.0),
        ({"dp-delta": 1.0}, "dp-delta", 1.0),
        ({"dp-delta": True}, "dp-delta", True),
        ({"dp-delta": "small"}, "dp-delta", "small"),
        ({"dp-delta": float("nan")}, "dp-delta", float("nan")),
        ({"dp-noise-multiplier": -0.5}, "dp-noise-multiplier", -0.5),
        ({"dp-max-grad-norm": 0.0}, "dp-max-grad-norm", 0.0),
        ({"dp-output-mechanism": "uniform"}, "dp-output-mechanism", "uniform"),
        ({"dp-output-clip": -0.5}, "dp-output-clip", -0.5),
        ({"dp-output-epsilon": -2.0}, "dp-output-epsilon", -2.0),
        ({"dp-output-delta": 1.0}, "dp-output-delta", 1.0),
        ({"dp-central-noise-multiplier": -1.0}, "dp-central-noise-multiplier", -1.0),
        ({"dp-central-clip": -1.0}, "dp-central-clip", -1.0),
        ({"secagg-num-shares": 2}, "secagg-num-shares", 2),
        ({"secagg-num-shares": 1}, "secagg-num-shares", 1),
        ({"secagg-num-shares": 3.0}, "secagg-num-shares", 3.0),
        ({"secagg-num-shares": -0.5}, "secagg-num-shares", -0.5),
        ({"secagg-reconstruction-threshold": 1}, "secagg-reconstruction-threshold", 1),
        ({"secagg-reconstruction-threshold": 1.5}, "secagg-reconstruction-threshold", 1.5),
        (
            {"secagg-num-shares": 3, "secagg-reconstruction-threshold": 3},
            "secagg-reconstruction-threshold",
            3,
        ),
        ({"secagg-clipping-range": 0.0}, "secagg-clipping-range", 0.0),
        ({"secagg-quantization-range": 0}, "secagg-quantization-range", 0),
        ({"secagg-quantization-range": 1.5}, "secagg-quantization-range", 1.5),
        ({"secagg-modulus-range": 3 * 2**30}, "secagg-modulus-range", 3 * 2**30),
        ({"secagg-modulus-range": 2**20}, "secagg-modulus-range", 2**20),
        ({"secagg-modulus-range": 2**33}, "secagg-modulus-range", 2**33),
        ({"secagg-max-weight": 0.0}, "secagg-max-weight", 0.0),
    ],
)
def test_config_refuses_bad_values_naming_key_and_value(raw, key, value):
    with pytest.raises(ConfigError) as err:
        PrivacyConfig.from_mapping(raw)
    assert f"{key}={value!r}" in str(err.value)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"privacy": "dp-sample"}, ["privacy='dp-sample'", "dp-target-epsilon", "dp-noise-mul"]),
        (
            {"privacy": "dp-output", "dp-output-clip": 1.0, "dp-output-epsilon": 1.0},
            ["privacy='dp-output'", "dp-output-delta", "gaussian"],
        ),
        (
            {"dp-output-mechanism": "laplace", "dp-output-delta": 1e-5},
            ["dp-output-delta=1e-05", "laplace", "pure epsilon"],
        ),
        (
            {"privacy": "dp-output", "dp-output-epsilon": 1.0, "dp-output-delta": 1e-5},
            ["privacy='dp-output'", "dp-output-clip"],
        ),
        (
            {"privacy": "secagg+dp-output", "dp-output-clip": 1.0, "dp-output-delta": 1e-5},
            ["privacy='secagg+dp-output'", "dp-output-epsilon"],
        ),
        ({"privacy": "dp-central", "dp-central-clip": 1.0}, ["dp-central-noise-multiplier"]),
        ({"privacy": "dp-central", "dp-central-noise-multiplier": 1.0}, ["dp-central-clip"]),
        ({"dp-epsilon": 1.0}, ["dp-epsilon=1.0", "unknown privacy key", "did you mean"]),
        ({"secagg-shares": 3}, ["secagg-shares=3", "unknown privacy key"]),
    ],
)
def test_config_refuses_inconsistent_combinations(raw, expected):
    with pytest.raises(ConfigError) as err:
        PrivacyConfig.from_mapping(raw)
    for part in expected:
        assert part in str(err.value)


def test_config_accepts_each_mode_with_its_required_keys():
    laplace = PrivacyConfig.from_mapping(
        {
            "privacy": "dp-output",
            "dp-output-mechanism": "laplace",
            "dp-output-clip": 1.0,
            "dp-output-epsilon": 0.5,
        }
    )
    assert laplace.dp_output_delta is None
    assert PrivacyConfig(privacy="dp-sample", dp_noise_multiplier=1.0).dp_target_epsilon == 0
    central = PrivacyConfig(
        privacy="secagg+dp-central", dp_central_noise_multiplier=0.8, dp_central_clip=0.1
    )
    assert central.components == {"secagg", "dp-central"}
    # keys for a component that is off are valid but reported, so the server can warn
    off = PrivacyConfig(privacy="secagg", dp_output_clip=1.0, dp_noise_multiplier=2.0)
    assert off.ignored_keys() == ["dp-noise-multiplier", "dp-output-clip"]
    assert central.ignored_keys() == []


# -- SecAgg+ ------------------------------------------------------------------------------


def test_secagg_defaults():
    assert secagg_defaults(2) == {"secagg-num-shares": 1.0, "secagg-reconstruction-threshold": 2}
    assert secagg_defaults(3) == {"secagg-num-shares": 3, "secagg-reconstruction-threshold": 2}
    assert secagg_defaults(5) == {"secagg-num-shares": 5, "secagg-reconstruction-threshold": 3}
    assert secagg_defaults(100) == {
        "secagg-num-shares": 21,
        "secagg-reconstruction-threshold": 13,
    }
    for n in range(3, 60):
        d = secagg_defaults(n)
        shares, thr = d["secagg-num-shares"], d["secagg-reconstruction-threshold"]
        # valid for Flower (ints, shares > 2, threshold < shares) and a strict majority
        PrivacyConfig(secagg_num_shares=shares, secagg_reconstruction_threshold=thr)
        plan = check_secagg(n, PrivacyConfig())
        assert plan.threshold == thr and 2 * plan.threshold > plan.neighbourhood
        assert plan.dropouts_tolerated >= 1 and plan.warnings == ()
    with pytest.raises(ConfigError, match="at least 2 nodes"):
        secagg_defaults(1)


def test_secagg_two_nodes_warns_about_dropouts_and_recovery():
    plan = check_secagg(2, PrivacyConfig())
    assert (plan.neighbourhood, plan.threshold, plan.dropouts_tolerated) == (2, 2, 0)
    text = " ".join(plan.warnings)
    assert "any dropout aborts" in text and "recover the other's update" in text


def test_secagg_resolves_fractions_like_flower():
    # Flower: shares = round(0.5 * 10) = 5; threshold = max(round(0.5 * 5), 2) = 2
    plan = check_secagg(
        10, PrivacyConfig(secagg_num_shares=0.5, secagg_reconstruction_threshold=0.5)
    )
    assert (plan.neighbourhood, plan.threshold) == (5, 2)
    assert any("not a majority" in w for w in plan.warnings)
    # even share counts below the node count are bumped to odd
    plan = check_secagg(10, PrivacyConfig(secagg_num_shares=4, secagg_reconstruction_threshold=3))
    assert plan.neighbourhood == 5


@pytest.mark.parametrize(
    ("nodes", "cfg", "expected"),
    [
        (1, PrivacyConfig(), "at least 2 nodes"),
        (3, PrivacyConfig(secagg_num_shares=1.0, secagg_reconstruction_threshold=4), "abort"),
        (3, PrivacyConfig(secagg_num_shares=5, secagg_reconstruction_threshold=4), "abort"),
        (
            4,
            PrivacyConfig(secagg_quantization_range=2**30, secagg_modulus_range=2**32),
            "wraps around",
        ),
    ],
)
def test_check_secagg_refuses_what_flower_would_mishandle(nodes, cfg, expected):
    with pytest.raises(ConfigError, match=expected):
        check_secagg(nodes, cfg)


def test_config_refuses_what_flowers_secaggplus_refuses():
    from flwr.server.workflow import SecAggPlusWorkflow

    cases = [
        (2, 2, 2**22, 2**32),
        (3, 3, 2**22, 2**32),
        (5, 6, 2**22, 2**32),
        (3, 2, 2**22, 2**21),
        (3, 2, 2**22, 2**22 + 2**23),
        (0.0, 2, 2**22, 2**32),
        (1.0, 1.5, 2**22, 2**32),
    ]
    for shares, thr, q, mod in cases:
        with pytest.raises(ValueError):
            SecAggPlusWorkflow(shares, thr, quantization_range=q, modulus_range=mod)
        with pytest.raises(ConfigError):
            PrivacyConfig(
                secagg_num_shares=shares,
                secagg_reconstruction_threshold=thr,
                secagg_quantization_range=q,
                secagg_modulus_range=mod,
            )


def test_secagg_weight_and_value_range_checks():
    cfg = PrivacyConfig(secagg_max_weight=1000.0, secagg_clipping_range=8.0)
    check_secagg_weight(1000, cfg)
    with pytest.raises(ConfigError, match=r"secagg-max-weight=1000\.0.*1001"):
        check_secagg_weight(1001, cfg)
    check_secagg_values({"a": np.array([-8.0, 7.9], np.float32)}, cfg)
    with pytest.raises(ConfigError, match="secagg-clipping-range=8.0.*clip it silently"):
        check_secagg_values({"a": np.zeros(3, np.float32), "b": np.array([8.5])}, cfg)


# -- clipping -----------------------------------------------------------------------------


def _update(seed: int = 0, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "down.lora_A": (scale * rng.normal(size=(8, 64))).astype(np.float32),
        "down.lora_B": (scale * rng.normal(size=(64, 8))).astype(np.float32),
        "mid.bias": (scale * rng.normal(size=(5,))).astype(np.float32),
    }


def _norm(arrays: dict, order: int) -> float:
    flat = np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays.values()])
    return float(np.linalg.norm(flat, ord=order))


@pytest.mark.parametrize(("norm", "order"), [("l2", 2), ("l1", 1)])
def test_clip_update_scales_to_the_bound_and_leaves_small_updates_alone(norm, order):
    upd = _update()
    original = _norm(upd, order)
    bound = original / 7.0
    clipped, before = clip_update(upd, bound, norm)
    assert before == pytest.approx(original, rel=1e-12)
    assert _norm(clipped, order) == pytest.approx(bound, rel=1e-6)
    assert list(clipped) == list(upd) and all(clipped[k].dtype == np.float32 for k in clipped)
    # same direction: a single common factor
    ratio = clipped["down.lora_A"] / upd["down.lora_A"]
    assert np.allclose(ratio, bound / original, rtol=1e-6)

    just_over, _ = clip_update(upd, original * 0.99, norm)
    assert _norm(just_over, order) == pytest.approx(original * 0.99, rel=1e-6)

    same, before = clip_update(upd, original * 1.01, norm)
    assert before == pytest.approx(original, rel=1e-12)
    for k in upd:
        assert np.array_equal(same[k], upd[k]) and same[k].dtype == upd[k].dtype
        assert same[k] is not upd[k]


def test_clip_update_refuses_non_finite_and_bad_arguments():
    with pytest.raises(ValueError, match="non-finite"):
        clip_update({"a": np.array([1.0, np.nan])}, 1.0)
    with pytest.raises(ValueError, match="bound"):
        clip_update(_update(), 0.0)
    with pytest.raises(ValueError, match="norm"):
        clip_update(_update(), 1.0, "linf")


# -- noise calibration --------------------------------------------------------------------


def test_classical_gaussian_sigma_formula_and_its_range():
    assert gaussian_sigma(0.5, 0.5, 1e-5, method="classical") == pytest.approx(
        0.5 * math.sqrt(2 * math.log(1.25 / 1e-5)) / 0.5, rel=1e-12
    )
    with pytest.raises(ValueError, match="epsilon < 1"):
        gaussian_sigma(1.0, 1.0, 1e-5, method="classical")


@pytest.mark.parametrize(("epsilon", "delta"), [(0.3, 1e-5), (1.0, 1e-5), (4.0, 1e-6)])
def test_analytic_gaussian_sigma_is_exactly_calibrated(epsilon, delta):
    """delta(sigma) checked by integrating the densities numerically (independent of the
    closed form), at sigma (within delta) and at 0.98 sigma (over delta: sigma is tight)."""
    from scipy import integrate, stats

    clip = 0.7
    sigma = gaussian_sigma(clip, epsilon, delta)

    def hockey_stick(s: float) -> float:
        # delta = integral of max(0, p - e^eps q), p = N(0, s^2), q = N(clip, s^2);
        # p > e^eps q exactly for x < clip/2 - eps s^2 / clip
        x0 = clip / 2 - epsilon * s * s / clip
        f = lambda x: stats.norm.pdf(x, 0, s) - math.exp(epsilon) * stats.norm.pdf(x, clip, s)  # noqa: E731
        val, _ = integrate.quad(f, -np.inf, x0, epsabs=1e-15, epsrel=1e-10, limit=200)
        return val

    assert hockey_stick(sigma) == pytest.approx(delta, rel=1e-3)
    assert hockey_stick(sigma) <= delta * (1 + 1e-6)
    assert hockey_stick(0.98 * sigma) > delta * 1.05
    assert gaussian_delta(sigma, clip, epsilon) <= delta
    if epsilon < 1:  # never more noise than the classical formula
        assert sigma < gaussian_sigma(clip, epsilon, delta, method="classical")


def test_gaussian_noise_std_matches_sigma():
    zero = {"a": np.zeros((400, 250), np.float32), "b": np.zeros(100_000, np.float32)}
    clip, eps, delta = 0.2, 2.0, 1e-5
    noisy, report = privatize_update(zero, "gaussian", clip, eps, delta, np.random.default_rng(1))
    flat = np.concatenate([v.ravel().astype(np.float64) for v in noisy.values()])
    assert flat.size == 200_000 and all(v.dtype == np.float32 for v in noisy.values())
    assert report.sigma == gaussian_sigma(clip, eps, delta)
    assert flat.std() == pytest.approx(report.sigma, rel=0.01)
    assert abs(flat.mean()) < 5 * report.sigma / math.sqrt(flat.size)
    assert report.clipped is False and report.norm_before == 0.0 and report.scale is None
    assert report.noise_multiplier == pytest.approx(report.sigma / clip)
    assert report.num_params == 200_000 and report.norm == "l2"


def test_laplace_noise_mean_absolute_deviation_matches_scale():
    zero = {"a": np.zeros(200_000, np.float32)}
    clip, eps = 3.0, 0.5
    noisy, report = privatize_update(zero, "laplace", clip, eps, None, np.random.default_rng(2))
    x = noisy["a"].astype(np.float64)
    assert report.scale == laplace_scale(clip, eps) == clip / eps
    assert np.mean(np.abs(x)) == pytest.approx(report.scale, rel=0.01)  # E|X| = b
    assert x.var() == pytest.approx(2 * report.scale**2, rel=0.03)  # var = 2 b^2
    assert report.delta == 0.0 and report.sigma is None and report.norm == "l1"


@pytest.mark.parametrize(
    ("mechanism", "order", "delta"), [("gaussian", 2, 1e-5), ("laplace", 1, None)]
)
def test_privatize_clips_the_update_before_adding_noise(mechanism, order, delta):
    upd = _update(scale=3.0)
    clip = _norm(upd, order) / 10
    out, report = privatize_update(upd, mechanism, clip, 200.0, delta, np.random.default_rng(3))
    assert report.clipped and report.norm_before == pytest.approx(_norm(upd, order))
    # what is added to the *clipped* update is exactly noise of the reported size
    clipped, _ = clip_update(upd, clip, "l2" if order == 2 else "l1")
    resid = np.concatenate([(out[k].astype(np.float64) - clipped[k]).ravel() for k in upd])
    if mechanism == "gaussian":
        assert resid.std() == pytest.approx(report.sigma, rel=0.1)
    else:
        assert np.mean(np.abs(resid)) == pytest.approx(report.scale, rel=0.1)
    replace = privatize_update(
        upd, mechanism, clip, 200.0, delta, np.random.default_rng(3), adjacency="replace"
    )[1]
    assert replace.sensitivity == 2 * report.sensitivity == 2 * clip


def test_privatize_refuses_mismatched_arguments():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="pure epsilon"):
        privatize_update(_update(), "laplace", 1.0, 1.0, 1e-5, rng)
    with pytest.raises(ValueError, match="needs delta"):
        privatize_update(_update(), "gaussian", 1.0, 1.0, None, rng)
    with pytest.raises(ValueError, match="mechanism"):
        privatize_update(_update(), "uniform", 1.0, 1.0, 1e-5, rng)
    with pytest.raises(TypeError, match="Generator"):
        privatize_update(_update(), "gaussian", 1.0, 1.0, 1e-5, 0)


# -- composition --------------------------------------------------------------------------


def test_compose_basic():
    assert compose_basic(0.5, 1e-6, 10) == (5.0, pytest.approx(1e-5))
    assert compose_basic(0.5, 1e-6, 0) == (0.0, 0.0)


def test_compose_rdp_gaussian_matches_opacus_and_a_hand_computation():
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    z, rounds, delta = 1.3, 20, 1e-5
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = compute_rdp(q=1.0, noise_multiplier=z, steps=rounds, orders=orders)
    expected, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    got = compose_rdp_gaussian(z, rounds, delta)
    assert got == pytest.approx(expected, rel=1e-12)
    # the Gaussian mechanism's RDP is alpha / (2 z^2) per round; same conversion to (eps, delta)
    a = np.asarray(orders, dtype=np.float64)
    by_hand = rounds * a / (2 * z * z) - (np.log(delta) + np.log(a)) / (a - 1) + np.log((a - 1) / a)
    assert got == pytest.approx(by_hand.min(), rel=1e-9)


@pytest.mark.parametrize("rounds", [5, 10, 30, 100])
def test_rdp_composition_beats_basic_over_several_rounds(rounds):
    clip, eps, delta = 0.1, 1.0, 1e-6
    sigma = gaussian_sigma(clip, eps, delta)
    basic_eps, basic_delta = compose_basic(eps, delta, rounds)
    rdp_eps = compose_rdp_gaussian(sigma / clip, rounds, basic_delta)
    assert rdp_eps < basic_eps
    budget = compose_rounds("gaussian", eps, delta, rounds, noise_multiplier=sigma / clip)
    assert budget.method == "rdp" and budget.epsilon == rdp_eps
    assert (budget.basic_epsilon, budget.rdp_epsilon) == (basic_eps, rdp_eps)
    assert budget.delta == basic_delta


def test_compose_rounds_keeps_the_tighter_bound():
    sigma = gaussian_sigma(1.0, 1.0, 1e-6)
    one = compose_rounds("gaussian", 1.0, 1e-6, 1, noise_multiplier=sigma)
    assert one.epsilon == min(one.basic_epsilon, one.rdp_epsilon) <= 1.0
    lap = compose_rounds("laplace", 0.5, 0.0, 7)
    assert (lap.epsilon, lap.delta, lap.method, lap.rdp_epsilon) == (3.5, 0.0, "basic", None)


# -- DP-SGD accounting --------------------------------------------------------------------

ROUNDS = [(1.1, 0.02, 50), (1.1, 0.02, 50), (0.9, 0.04, 25), (1.1, 0.02, 50), (1.5, 0.02, 60)]


def test_node_accountant_is_cumulative_across_processes(tmp_path):
    from opacus.accountants import RDPAccountant

    path = tmp_path / "node" / "accountant.json"
    assert NodeAccountant.load(path).epsilon(DELTA) == 0.0
    reference = RDPAccountant()
    previous = 0.0
    for r, (sigma, q, steps) in enumerate(ROUNDS, start=1):
        NodeAccountant.load(path).record(sigma, q, steps)  # one "process" per round
        for _ in range(steps):
            reference.step(noise_multiplier=sigma, sample_rate=q)
        fresh = NodeAccountant.load(path)  # and a new one to read it back
        eps = fresh.epsilon(DELTA)
        assert eps == pytest.approx(reference.get_epsilon(delta=DELTA), rel=0.01)
        assert fresh.steps == sum(s for _, _, s in ROUNDS[:r])
        assert eps > previous  # grows with rounds: cumulative, not per round
        previous = eps
    # the first round's epsilon alone is far below the cumulative one
    assert history_epsilon(ROUNDS[:1], DELTA) < 0.6 * previous
    stored = json.loads(path.read_text())
    assert stored["history"] == [
        [1.1, 0.02, 100],
        [0.9, 0.04, 25],
        [1.1, 0.02, 50],
        [1.5, 0.02, 60],
    ]
    assert sorted(p.name for p in path.parent.iterdir()) == [
        "accountant.json",
        "accountant.json.lock",
    ]


def test_node_accountant_budget_and_opacus_history(tmp_path):
    path = tmp_path / "acc.json"
    acc = NodeAccountant.load(path)
    acc.extend(ROUNDS[:-1])  # e.g. an Opacus accountant's history
    sigma, q, steps = ROUNDS[-1]
    after = history_epsilon(ROUNDS, DELTA)
    assert not acc.budget_spent(after * 1.001, DELTA, steps, sigma, q)
    assert acc.budget_spent(after * 0.999, DELTA, steps, sigma, q)
    assert NodeAccountant.load(path).epsilon(DELTA) < after  # budget_spent saves nothing
    NodeAccountant.load(path).record(0.0, q, 1)  # a step without noise: no guarantee left
    assert NodeAccountant.load(path).epsilon(DELTA) == math.inf


def test_node_accountant_refuses_a_corrupt_file_instead_of_resetting(tmp_path):
    path = tmp_path / "acc.json"
    path.write_text('{"history": [[1.0, 0.1, 5]')
    with pytest.raises(ValueError, match="not a readable privacy accountant"):
        NodeAccountant.load(path)
    with pytest.raises(ValueError, match="not a readable privacy accountant"):
        NodeAccountant(path).record(1.0, 0.1, 5)
    with pytest.raises(ValueError, match="sample_rate"):
        NodeAccountant(tmp_path / "new.json").record(1.0, 1.5, 5)
    assert not (tmp_path / "new.json").exists()


def test_planned_steps_and_sample_rate():
    assert sample_rate_for(1000, 10) == 0.01 and sample_rate_for(3, 4) == 1.0
    assert planned_steps(5, 2, 1000, 10) == 5 * 2 * 100
    assert planned_steps(5, 2, 1000, 10, participation=0.5) == 3 * 2 * 100
    assert planned_steps(10, 1, 10, 4, participation=0.3) == 3 * 3  # ceil(10/4) per epoch
    assert planned_steps(3, 1, 3, 4) == 3


def test_noise_multiplier_for_meets_the_target_for_the_planned_steps():
    from opacus.accountants import RDPAccountant

    target = 4.0
    q = sample_rate_for(1000, 10)
    steps = planned_steps(rounds=5, local_epochs=2, num_images=1000, batch_size=10)
    sigma = noise_multiplier_for(target, DELTA, q, steps)
    acc = RDPAccountant()
    acc.history = [(sigma, q, steps)]
    eps = acc.get_epsilon(delta=DELTA)
    assert 0.97 * target <= eps <= target


def test_central_dp_epsilon():
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(1.0, 0.5, 10)]
    assert central_dp_epsilon(1.0, 0.5, 10, DELTA) == pytest.approx(acc.get_epsilon(delta=DELTA))
    assert central_dp_epsilon(1.0, 0.5, 20, DELTA) > central_dp_epsilon(1.0, 0.5, 10, DELTA)
    assert central_dp_epsilon(1.0, 1.0, 10, DELTA) > central_dp_epsilon(1.0, 0.5, 10, DELTA)
    assert central_dp_epsilon(0.0, 0.5, 10, DELTA) == math.inf


def test_privacy_record_to_dict():
    rec = PrivacyRecord("dp-sgd", 1.1, 1.0, 0.01, 300, 3.2, 1e-5, node_id=7, round=3)
    rec.extra["target-epsilon"] = 8.0
    d = rec.to_dict()
    assert d == {
        "mechanism": "dp-sgd",
        "noise_multiplier": 1.1,
        "clip": 1.0,
        "sample_rate": 0.01,
        "steps": 300,
        "epsilon": 3.2,
        "delta": 1e-5,
        "node_id": 7,
        "round": 3,
        "extra": {"target-epsilon": 8.0},
    }
    d["extra"]["x"] = 1
    assert "x" not in rec.extra
    json.dumps(d)


def test_zero_is_unset_for_keys_without_default():
    """pyproject.toml declares the keys without a default as 0 (TOML has no null): a 0 is
    "not given", so the mode that needs the key refuses to start and names it."""
    unset = PrivacyConfig.from_mapping({"dp-output-clip": 0.0, "secagg-num-shares": 0})
    assert unset.dp_output_clip is None and unset.secagg_num_shares is None
    with pytest.raises(ConfigError, match="needs dp-output-clip"):
        PrivacyConfig.from_mapping(
            {"privacy": "dp-output", "dp-output-clip": 0.0, "dp-output-epsilon": 1.0}
        )
    with pytest.raises(ConfigError, match="needs dp-central-noise-multiplier"):
        PrivacyConfig.from_mapping(
            {"privacy": "dp-central", "dp-central-noise-multiplier": 0.0, "dp-central-clip": 1.0}
        )


def test_secagg_range_must_hold_the_output_noise():
    """dp-output noise is added before SecAgg+ quantizes: a clipping range the noised
    update would exceed is refused with the range it needs."""
    base = {"privacy": "secagg+dp-output", "dp-output-clip": 0.05, "dp-output-epsilon": 2.0}
    with pytest.raises(ConfigError, match=r"secagg-clipping-range >= 0\.7977"):
        PrivacyConfig.from_mapping({**base, "dp-output-delta": 1e-5, "secagg-clipping-range": 0.5})
    PrivacyConfig.from_mapping({**base, "dp-output-delta": 1e-5, "secagg-clipping-range": 1.0})
    lap = {**base, "dp-output-mechanism": "laplace", "dp-output-clip": 1.0}
    with pytest.raises(ConfigError, match=r"30 x Laplace scale = 16"):
        PrivacyConfig.from_mapping({**lap, "secagg-clipping-range": 8.0})
