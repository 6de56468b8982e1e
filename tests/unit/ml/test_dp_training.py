"""DP-SGD in fedsd's training loop: Opacus' per-sample clipping on the LoRA UNet equals a
manual per-sample loop, an empty Poisson batch is still a (noise-only) step, and the
node-side privacy plan spends and stops as promised."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsd.config import ConfigError, RunConfig
from fedsd.ml.training import DpSgd, denoising_loss, make_private


@pytest.fixture(scope="module")
def unet_and_scheduler(tiny_model):
    from diffusers import DDPMScheduler

    from fedsd.ml.model import add_lora, load_unet

    cfg = RunConfig.from_mapping({"model": str(tiny_model)})
    unet = add_lora(load_unet(str(tiny_model), torch.device("cpu")), cfg)
    sched = DDPMScheduler.from_pretrained(str(tiny_model), subfolder="scheduler")
    return unet, sched


def _batch(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, 4, 8, 8, generator=g)
    noise = torch.randn(n, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    cond = torch.randn(n, 77, 32, generator=g)
    return latents, noise, t, cond


@pytest.mark.parametrize("mode", ["hooks", "ew", "functorch"])
def test_per_sample_clipping_equals_a_manual_loop(unet_and_scheduler, mode):
    import copy

    unet, sched = unet_and_scheduler
    unet = copy.deepcopy(unet)
    dev = torch.device("cpu")
    params = [p for p in unet.parameters() if p.requires_grad]
    clip, n = 0.01, 3
    latents, noise, t, cond = _batch(n)
    # Manual: each sample's gradient, clipped to `clip` as one flat vector, summed, / n.
    manual = [torch.zeros_like(p) for p in params]
    norms = []
    for i in range(n):
        unet.zero_grad()
        loss = denoising_loss(
            unet, sched, latents[i : i + 1], noise[i : i + 1], t[i : i + 1], cond[i : i + 1], dev
        )
        loss.backward()
        grads = [p.grad.detach().clone() for p in params]
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        norms.append(float(norm))
        for acc, g in zip(manual, grads, strict=True):
            acc += g * min(1.0, clip / (float(norm) + 1e-6))
    manual = [m / n for m in manual]
    assert max(norms) > clip  # clipping is active
    # Opacus, through fedsd's make_private, without noise; one batch of the same samples.
    opt = torch.optim.SGD(params, lr=0.0)
    model, dp_opt, _, _ = make_private(unet, opt, n, n, DpSgd(0.0, clip, mode))
    dp_opt.zero_grad()
    denoising_loss(model, sched, latents, noise, t, cond, dev).backward()
    dp_opt.pre_step()  # clip per sample, sum, (no) noise, scale by the expected batch size
    for p, want in zip(params, manual, strict=True):
        assert torch.allclose(p.grad, want, rtol=1e-3, atol=1e-9)
    if hasattr(model, "_close"):
        model._close()


def test_dp_training_pass_counts_every_poisson_step(unet_and_scheduler, tiny_model):
    """A whole local pass: Poisson batches (some may be empty), and the accountant history
    has exactly one entry per step at the planned sample rate."""
    import copy

    from fedsd.ml.training import EncodedSplit, train_lora

    unet, sched = unet_and_scheduler
    unet = copy.deepcopy(unet)
    n = 10
    data = EncodedSplit(
        latent_mean=torch.randn(n, 2, 4, 8, 8).half(),
        latent_std=torch.full((n, 2, 4, 8, 8), 0.1).half(),
        text_embeds=torch.randn(2, 77, 32).half(),
        prompt_index=torch.tensor([i % 2 for i in range(n)]),
        skipped=0,
    )
    cfg = RunConfig.from_mapping(
        {"model": str(tiny_model), "batch-size": 4, "local-epochs": 2, "learning-rate": 1e-3}
    )
    before = {k: v.detach().clone() for k, v in unet.named_parameters() if v.requires_grad}
    res = train_lora(
        unet,
        data,
        sched,
        cfg,
        torch.device("cpu"),
        scaling_factor=0.18,
        seed=0,
        dp=DpSgd(1.0, 1.0, "hooks"),
    )
    assert res.steps == 2 * 3  # ceil(10/4) Poisson batches per epoch
    assert res.sample_rate == pytest.approx(1 / 3)
    assert sum(s for _, _, s in res.dp_history) == res.steps
    assert all(nm == 1.0 and q == pytest.approx(1 / 3) for nm, q, _ in res.dp_history)
    after = dict(unet.named_parameters())
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_empty_poisson_batch_is_a_noise_only_step(unet_and_scheduler):
    import copy

    from fedsd.ml.training import _step

    unet, sched = unet_and_scheduler
    unet = copy.deepcopy(unet)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1.0)
    model, dp_opt, _, engine = make_private(unet, opt, 8, 4, DpSgd(1.0, 1.0, "hooks"))
    before = [p.detach().clone() for p in params]
    out = _step(
        model,
        dp_opt,
        None,
        torch.zeros(0, dtype=torch.long),
        None,
        sched,
        0.18,
        1000,
        torch.Generator(),
        torch.device("cpu"),
    )
    assert out is None
    assert any(not torch.equal(a, p) for a, p in zip(before, params, strict=True))  # noise
    assert engine.accountant.history == [(1.0, 0.5, 1)]
    model._close()


def _privacy(tmp_path, mode, **kw):
    from fedsd.privacy.node import NodePrivacy

    cfg = RunConfig.from_mapping({"privacy": mode, "num-server-rounds": 2, **kw})
    return NodePrivacy(cfg, tmp_path, "run", 7)


def test_node_refuses_what_secagg_would_clip_silently(tmp_path):
    priv = _privacy(tmp_path, "secagg", **{"secagg-clipping-range": 0.01})
    with pytest.raises(ConfigError, match=r"secagg-clipping-range=0.01 but a sent value has"):
        priv.release({"a": np.array([0.5, -0.02], np.float32)}, 1)
    priv.release({"a": np.array([0.005], np.float32)}, 1)  # inside: fine
    with pytest.raises(ConfigError, match="secagg-max-weight=1000.0 is below the 5000"):
        priv.weight(5000, 5000)


def test_dp_sgd_plan_meets_the_target_and_then_stops(tmp_path):
    priv = _privacy(tmp_path, "dp-sample", **{"dp-target-epsilon": 3.0, "batch-size": 4})
    plan = priv.plan_dp_sgd(20)
    assert not plan.budget_spent and plan.steps == 5 and plan.sample_rate == 0.2
    for _ in range(2):  # the two planned rounds
        rec = priv.dp_sgd_record(plan, [(plan.noise_multiplier, plan.sample_rate, plan.steps)])
    assert 2.9 < rec.epsilon <= 3.0  # sigma was planned for the whole run
    assert priv.plan_dp_sgd(20).budget_spent  # a third round would overshoot
