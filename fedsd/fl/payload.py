"""LoRA tensors on the wire: one flat vector per message, in sorted-name order, as bytes.

Flower 1.41 moves every object of a message (the message, its RecordDict, each record,
each Array and each Array chunk) with its own HTTP request at every hop (ServerApp ->
SuperLink -> SuperNode -> ClientApp and back), and each request costs the SuperLink CPU.
So 64 small LoRA tensors would cost hundreds of round trips per message, and even one
vector in an ArrayRecord costs 3 objects (record, Array, chunk). fedsd sends the vector as
bytes inside a ConfigRecord the message has anyway: down, the global adapter (float32)
under ``ADAPTER`` in the ``config`` record (3 objects per message instead of 6); up, the
update under ``FLAT`` with its dtype under ``DTYPE`` in the ``update`` record (5 instead
of 7). ``bench/round_overhead.py``'s ``floor_bytes`` arm measures what that buys
(docs/performance.md).

Both ends know the names and shapes (the server from the seeded initial adapter, a node
from its own model), so only the values travel; a length mismatch is refused.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

#: Down: the global adapter's float32 bytes, in the message's ``config`` ConfigRecord.
ADAPTER = "adapter"
#: Up: the update's bytes and its dtype name, in the reply's ``update`` ConfigRecord.
FLAT, DTYPE = "flat", "dtype"
#: The dtypes a vector may travel as (little-endian).
WIRE_DTYPES = ("float32", "float16")


def pack(arrays: Mapping[str, np.ndarray], keys: list[str] | None = None) -> np.ndarray:
    """Concatenate ``arrays`` (``keys`` order, default sorted names) into one float32 vector."""
    order = sorted(arrays) if keys is None else keys
    if not order:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate([np.asarray(arrays[k], dtype=np.float32).ravel() for k in order])


#: ``update-dtype``: what a node's update travels as. float16 halves the bytes; the server
#: validates and aggregates in float32/float64 either way (``fedsd.fl.validation``).
UPDATE_DTYPES = ("float32", "float16")
_FLOAT16_MAX = float(np.finfo(np.float16).max)


def encode_update(flat: np.ndarray, dtype: str) -> np.ndarray:
    """``flat`` (float32) as the ``update-dtype`` asks. An update with a value beyond
    float16's range (65504) stays float32: as float16 it would be infinite, and the
    server rejects non-finite updates."""
    if dtype not in UPDATE_DTYPES:
        raise ValueError(f"update dtype {dtype!r}: expected one of {', '.join(UPDATE_DTYPES)}")
    if dtype == "float16" and (flat.size == 0 or float(np.abs(flat).max()) <= _FLOAT16_MAX):
        return flat.astype(np.float16)
    return flat


def to_bytes(flat: np.ndarray) -> bytes:
    """``flat``'s values as little-endian bytes of its dtype."""
    flat = np.asarray(flat)
    return np.ascontiguousarray(flat, dtype=flat.dtype.newbyteorder("<")).tobytes()


def from_bytes(raw: object, dtype: str) -> np.ndarray:
    """The vector in ``raw`` (bytes made by ``to_bytes``), as a writable array of ``dtype``.
    Whatever a peer sent: anything else is a ValueError saying what is wrong."""
    if dtype not in WIRE_DTYPES:
        raise ValueError(f"vector dtype {dtype!r}: expected one of {', '.join(WIRE_DTYPES)}")
    if not isinstance(raw, bytes):
        raise ValueError(f"vector is {type(raw).__name__}, expected bytes")
    wire = np.dtype(dtype).newbyteorder("<")
    if len(raw) % wire.itemsize:
        raise ValueError(f"{len(raw)} bytes are not a whole number of {dtype} values")
    return np.frombuffer(raw, dtype=wire).astype(dtype)


def vector_record(flat: np.ndarray) -> dict[str, bytes | str]:
    """The ``update`` record's entries for ``flat`` (any dtype: the reader decides)."""
    return {FLAT: to_bytes(flat), DTYPE: np.asarray(flat).dtype.name}


def read_vector(record: Mapping[str, object]) -> np.ndarray:
    """The vector of a record made by ``vector_record``; ValueError if it is not one."""
    if FLAT not in record:
        raise ValueError(f"no {FLAT!r} entry")
    return from_bytes(record[FLAT], str(record.get(DTYPE, "")))


def unpack(flat: np.ndarray, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Split a vector made by ``pack`` back into named arrays of ``shapes`` (sorted names)."""
    flat = np.asarray(flat)
    sizes = {k: int(np.prod(shapes[k], dtype=np.int64)) for k in sorted(shapes)}
    if flat.ndim != 1 or flat.size != sum(sizes.values()):
        raise ValueError(
            f"LoRA payload has {flat.size} values in shape {flat.shape}, expected a vector of "
            f"{sum(sizes.values())} for {len(sizes)} tensors: server and node disagree on the "
            "model or the LoRA settings"
        )
    out, start = {}, 0
    for k, n in sizes.items():
        out[k] = flat[start : start + n].reshape(shapes[k]).astype(np.float32, copy=True)
        start += n
    return out


def shapes_of(arrays: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """Name -> shape."""
    return {k: tuple(np.shape(v)) for k, v in arrays.items()}
