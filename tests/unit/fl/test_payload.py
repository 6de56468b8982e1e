"""What a node's update travels as (``update-dtype``): float16 halves the bytes, keeps
float16's precision, never turns a large value into an infinity, and the server accepts it."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from fedsd.fl.payload import FLAT, encode_update
from fedsd.fl.validation import Accepted, Limits, check_reply


def _update(n: int = 1000, scale: float = 1e-3) -> np.ndarray:
    return (np.random.default_rng(0).standard_normal(n) * scale).astype(np.float32)


def test_float16_halves_the_bytes_within_float16_precision():
    flat = _update()
    sent = encode_update(flat, "float16")
    assert sent.dtype == np.float16
    full = ArrayRecord(array_dict={FLAT: Array(flat)}).count_bytes()
    half = ArrayRecord(array_dict={FLAT: Array(sent)}).count_bytes()
    assert half < 0.55 * full
    back = sent.astype(np.float32)
    rel = np.linalg.norm(back - flat) / np.linalg.norm(flat)
    assert 0 < rel < 2 * float(np.finfo(np.float16).eps)


def test_float32_is_sent_unchanged_and_unknown_dtypes_are_refused():
    flat = _update()
    assert encode_update(flat, "float32") is flat
    with pytest.raises(ValueError, match="float32, float16"):
        encode_update(flat, "bfloat16")


def test_a_value_beyond_float16_range_keeps_float32():
    flat = _update()
    flat[3] = 7e4  # float16's largest finite value is 65504
    sent = encode_update(flat, "float16")
    assert sent.dtype == np.float32 and np.isfinite(sent).all()


def test_the_server_accepts_a_float16_update_as_float32():
    sent = encode_update(_update(4, 1.0), "float16")
    metrics = {"num-examples": 4, "shard-images": 4, "val-loss": 1.0, "val-examples": 1}
    limits = Limits(length=4, max_norm=10.0, max_weight=100.0, local_epochs=1)
    verdict = check_reply(sent, metrics, limits)
    assert isinstance(verdict, Accepted), verdict
    assert verdict.update.dtype == np.float32
    np.testing.assert_array_equal(verdict.update, sent.astype(np.float32))
