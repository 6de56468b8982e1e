"""LoRA state handling: what travels, what trains, what diffusers loads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsd.config import RunConfig
from fedsd.ml.model import (
    add_lora,
    init_lora_arrays,
    load_adapter_arrays,
    load_unet,
    lora_arrays,
    lora_shapes,
    save_adapter,
    set_lora_state,
)


def _cfg(tiny_model, **kw):
    return RunConfig.from_mapping({"model": str(tiny_model), "resolution": 64, **kw})


def _random_b(arrays, scale=0.1, seed=0):
    rng = np.random.default_rng(seed)
    return {
        k: v if ".lora_A." in k else (rng.standard_normal(v.shape) * scale).astype(np.float32)
        for k, v in arrays.items()
    }


def test_lora_state_round_trip_is_exact(tiny_model, tmp_path):
    cfg = _cfg(tiny_model)
    unet = add_lora(load_unet(str(tiny_model)), cfg)
    arrays = _random_b(lora_arrays(unet))
    assert list(arrays) == sorted(arrays)  # fixed wire order
    set_lora_state(unet, arrays)
    back = lora_arrays(unet)
    assert list(back) == list(arrays)
    assert all(np.array_equal(back[k], arrays[k]) for k in arrays)
    save_adapter(arrays, tmp_path / "a", cfg, {"round": 1})
    loaded = load_adapter_arrays(tmp_path / "a")
    assert list(loaded) == list(arrays)
    assert all(np.array_equal(loaded[k], arrays[k]) for k in arrays)


def test_mismatched_keys_are_refused(tiny_model):
    unet = add_lora(load_unet(str(tiny_model)), _cfg(tiny_model))
    arrays = lora_arrays(unet)
    # The reference example's bug: peft's ".default." names vs adapter-free names.
    renamed = {k.replace(".lora_A.", ".lora_A.default."): v for k, v in arrays.items()}
    with pytest.raises(KeyError, match="unexpected"):
        set_lora_state(unet, renamed)
    missing = dict(list(arrays.items())[1:])
    with pytest.raises(KeyError, match="missing"):
        set_lora_state(unet, missing)


def test_only_lora_parameters_train(tiny_model):
    for variant in ("lora", "ffa"):
        unet = add_lora(load_unet(str(tiny_model)), _cfg(tiny_model, **{"lora-variant": variant}))
        trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
        assert trainable and all(".lora_" in n for n in trainable)
        if variant == "ffa":
            assert all(".lora_B." in n for n in trainable)
        before = {n: p.detach().clone() for n, p in unet.named_parameters()}
        opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-2)
        out = unet(torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 77, 32))
        out.sample.pow(2).mean().backward()
        opt.step()
        changed = {n for n, p in unet.named_parameters() if not torch.equal(p, before[n])}
        assert changed, "a training step changed nothing"
        assert all(n in trainable for n in changed), sorted(changed - set(trainable))[:3]


def test_initial_adapter_is_deterministic_and_needs_no_weights(tiny_model):
    cfg = _cfg(tiny_model, seed=3)
    a = lora_arrays(add_lora(load_unet(str(tiny_model)), cfg))
    b = lora_arrays(add_lora(load_unet(str(tiny_model)), cfg))
    shapes = lora_shapes(str(tiny_model), cfg)  # meta-device model, no weights read
    c = init_lora_arrays(shapes, 3)
    assert list(a) == list(c)
    for k in a:
        assert np.array_equal(a[k], b[k]) and np.array_equal(a[k], c[k])
        if ".lora_B." in k:
            assert not a[k].any()
    other = init_lora_arrays(shapes, 4)
    assert any(not np.array_equal(c[k], other[k]) for k in c if ".lora_A." in k)


@pytest.mark.parametrize("alpha", [8, 16])
def test_adapter_loads_in_diffusers_and_changes_the_unet(tiny_model, tmp_path, alpha):
    from diffusers import StableDiffusionPipeline

    cfg = _cfg(tiny_model, **{"lora-alpha": alpha})
    unet = add_lora(load_unet(str(tiny_model)), cfg)
    arrays = _random_b(lora_arrays(unet))
    set_lora_state(unet, arrays)
    save_adapter(arrays, tmp_path / "adapter", cfg, {"round": 1})
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model))
    x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        base = pipe.unet(x, t, c).sample
        pipe.load_lora_weights(str(tmp_path / "adapter"))
        adapted = pipe.unet(x, t, c).sample
        ours = unet(x, t, c).sample
    assert (adapted - base).abs().max() > 1e-3
    torch.testing.assert_close(adapted, ours, rtol=1e-5, atol=1e-6)
