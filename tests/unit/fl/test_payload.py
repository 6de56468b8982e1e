"""What a vector travels as: bytes of its dtype in a ConfigRecord, read back exactly, and
anything else a peer sends refused with its reason; a node's update (``update-dtype``) as
float16 halves the bytes, keeps float16's precision, never turns a large value into an
infinity, and the server accepts it."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict

from fedsd.fl.payload import (
    DTYPE,
    FLAT,
    encode_update,
    from_bytes,
    read_vector,
    to_bytes,
    vector_record,
)
from fedsd.fl.replies import Unreadable, update_of
from fedsd.fl.validation import Accepted, Limits, Rejected, check_reply


def _update(n: int = 1000, scale: float = 1e-3) -> np.ndarray:
    return (np.random.default_rng(0).standard_normal(n) * scale).astype(np.float32)


def test_float16_halves_the_bytes_within_float16_precision():
    flat = _update()
    sent = encode_update(flat, "float16")
    assert sent.dtype == np.float16
    full = ConfigRecord(vector_record(flat)).count_bytes()
    half = ConfigRecord(vector_record(sent)).count_bytes()
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


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_vector_comes_back_exactly_through_a_config_record(dtype):
    flat = _update(1001).astype(dtype)
    record = ConfigRecord(vector_record(flat))
    back = read_vector(record)
    assert back.dtype == np.dtype(dtype) and back.flags.writeable
    np.testing.assert_array_equal(back, flat)
    assert to_bytes(flat) == flat.astype(np.dtype(dtype).newbyteorder("<")).tobytes()


@pytest.mark.parametrize(
    ("record", "said"),
    [
        ({DTYPE: "float32"}, "no 'flat' entry"),
        ({FLAT: b"\0" * 8, DTYPE: "int32"}, "vector dtype 'int32'"),
        ({FLAT: b"\0" * 8}, "vector dtype ''"),
        ({FLAT: b"\0" * 7, DTYPE: "float32"}, "7 bytes are not a whole number of float32"),
        ({FLAT: "text", DTYPE: "float32"}, "vector is str, expected bytes"),
    ],
)
def test_what_is_not_a_vector_is_refused_with_its_reason(record, said):
    with pytest.raises(ValueError, match=said):
        read_vector(record)
    with pytest.raises(ValueError):
        from_bytes(record.get(FLAT), str(record.get(DTYPE, "")))


def test_the_server_rejects_an_unreadable_update_saying_why():
    content = RecordDict({"update": ConfigRecord({FLAT: b"\0" * 6, DTYPE: "float32"})})
    flat, nbytes = update_of(SimpleNamespace(content=content))  # a reply's content is all it reads
    assert isinstance(flat, Unreadable) and nbytes == 0
    metrics = {"num-examples": 4, "shard-images": 4}
    limits = Limits(length=4, max_norm=10.0, max_weight=100.0, local_epochs=1)
    verdict = check_reply(flat, metrics, limits)
    assert isinstance(verdict, Rejected) and verdict.reason == "bad-type"
    assert "6 bytes are not a whole number of float32 values" in verdict.detail
