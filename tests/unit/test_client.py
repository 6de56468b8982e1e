"""The ClientApp path: start from the global adapter, train, cache, evaluate."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from PIL import Image

from fedsd.config import RunConfig
from fedsd.fl.payload import ADAPTER, pack, read_vector, shapes_of, to_bytes, unpack
from fedsd.ml.model import init_lora_arrays, lora_shapes


def _write_split(root, n, seed):
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        label = i % 2
        arr = np.zeros((64, 64, 3), np.uint8)
        arr[..., label] = 200
        arr += rng.integers(0, 40, arr.shape, dtype=np.uint8)
        Image.fromarray(arr).save(root / f"{i:05d}.png")
        lines.append(
            {
                "file_name": f"{i:05d}.png",
                "text": f"a photo of flower {label}",
                "label": label,
                "label_name": str(label + 1),
            }
        )
    (root / "metadata.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    """Messages are created as a ServerApp task would (Flower reads its identity)."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


@pytest.fixture
def shard(tmp_path):
    root = tmp_path / "shard-0"
    _write_split(root / "train", 8, 0)
    _write_split(root / "val", 4, 1)
    return root


def _run_config(tiny_model, tmp_path, **kw):
    return {
        "model": str(tiny_model),
        "resolution": 64,
        "batch-size": 4,
        "local-epochs": 1,
        "out-dir": str(tmp_path / "out"),
        **kw,
    }


def _message(arrays, message_type, server_round=1, digest=None):
    config = {"server-round": server_round, "run-key": "test"}
    if digest:
        config["lora-a-digest"] = digest
    content = RecordDict({"config": ConfigRecord({**config, ADAPTER: to_bytes(pack(arrays))})})
    return Message(content=content, dst_node_id=1, message_type=message_type, group_id="1")


def _context(run_config, shard, cache):
    node_config = {"partition-id": 0, "shard-dir": str(shard), "cache-dir": str(cache)}
    return Context(
        run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config=run_config
    )


def _global(cfg):
    init = init_lora_arrays(lora_shapes(cfg.model, cfg), cfg.seed)
    rng = np.random.default_rng(5)
    return {
        k: v if ".lora_A." in k else (rng.standard_normal(v.shape) * 0.2).astype(np.float32)
        for k, v in init.items()
    }, init


def test_client_starts_from_the_global_adapter(tiny_model, shard, tmp_path):
    from fedsd import client_app

    rc = _run_config(tiny_model, tmp_path, **{"learning-rate": 1e-6})
    cfg = RunConfig.from_mapping(rc)
    glob, init = _global(cfg)
    ctx = _context(rc, shard, tmp_path / "c")
    reply = client_app.train(_message(glob, "train"), ctx)
    update = unpack(read_vector(reply.content.config_records["update"]), shapes_of(glob))
    metrics = reply.content.metric_records["metrics"]
    assert metrics["num-examples"] == 8  # images, not batches
    assert metrics["train-steps"] == 2
    assert sorted(update) == sorted(glob)
    # The reply is an update (trained minus received): tiny at a tiny learning rate...
    assert 0 < max(np.abs(u).max() for u in update.values()) < 1e-4
    # ...and the node trained from the adapter it received, which it scored first: the
    # val loss it reports is the received adapter's, not the initial adapter's.
    score = client_app.evaluate(_message(glob, "evaluate"), ctx).content.metric_records
    base = client_app.evaluate(_message(init, "evaluate"), ctx).content.metric_records
    assert metrics["val-loss"] == score["metrics"]["val-loss"] != base["metrics"]["val-loss"]


def test_update_dtype_float16_sends_the_update_in_half_the_bytes(tiny_model, shard, tmp_path):
    from fedsd import client_app

    replies = {}
    for dtype in ("float32", "float16"):
        rc = _run_config(tiny_model, tmp_path, **{"update-dtype": dtype})
        glob, _ = _global(RunConfig.from_mapping(rc))
        ctx = _context(rc, shard, tmp_path / "c")
        replies[dtype] = client_app.train(_message(glob, "train"), ctx).content.config_records
    full, half = (replies[d]["update"] for d in ("float32", "float16"))
    assert read_vector(full).dtype == np.float32 and read_vector(half).dtype == np.float16
    assert half.count_bytes() < 0.55 * full.count_bytes()
    # Same seed, same data: the same training, only the wire format differs.
    np.testing.assert_allclose(
        read_vector(half).astype(np.float32), read_vector(full), rtol=1e-3, atol=1e-7
    )


def test_ffa_sends_only_b_and_checks_a(tiny_model, shard, tmp_path):
    from fedsd import client_app
    from fedsd.ml.model import lora_a_digest

    rc = _run_config(tiny_model, tmp_path, **{"lora-variant": "ffa"})
    cfg = RunConfig.from_mapping(rc)
    glob, _ = _global(cfg)
    b_only = {k: v for k, v in glob.items() if ".lora_B." in k}
    ctx = _context(rc, shard, tmp_path / "c")
    reply = client_app.train(_message(b_only, "train", digest=lora_a_digest(glob)), ctx)
    got = read_vector(reply.content.config_records["update"])
    assert got.size == sum(v.size for v in b_only.values()) < sum(v.size for v in glob.values())
    with pytest.raises(RuntimeError, match="A matrices differ"):
        client_app.train(_message(b_only, "train", digest="0" * 16), ctx)


def test_latent_cache_is_reused_and_val_loss_is_reproducible(tiny_model, shard, tmp_path):
    from fedsd import client_app

    rc = _run_config(tiny_model, tmp_path)
    glob, _ = _global(RunConfig.from_mapping(rc))
    ctx = _context(rc, shard, tmp_path / "cache")
    first = client_app.evaluate(_message(glob, "evaluate"), ctx).content.metric_records["metrics"]
    assert first["cache-hits"] == 0 and first["num-examples"] == 4
    assert list((tmp_path / "cache").glob("latents-*.pt"))
    second = client_app.evaluate(_message(glob, "evaluate"), ctx).content.metric_records["metrics"]
    assert second["cache-hits"] == 1
    assert second["val-loss"] == first["val-loss"]
    # A different adapter gives a different loss: the metric sees the adapter.
    other = {k: v * 3 if ".lora_B." in k else v for k, v in glob.items()}
    third = client_app.evaluate(_message(other, "evaluate"), ctx).content.metric_records["metrics"]
    assert third["val-loss"] != first["val-loss"]
    # Touching the shard invalidates the cache (fingerprint changes).
    img = shard / "val" / "00000.png"
    Image.new("RGB", (64, 64), "white").save(img)
    fourth = client_app.evaluate(_message(glob, "evaluate"), ctx).content.metric_records["metrics"]
    assert fourth["cache-hits"] == 0
