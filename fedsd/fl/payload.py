"""LoRA tensors on the wire: one flat float32 vector per message, in sorted-name order.

Flower 1.41 moves every Array of a message as separate objects, each with its own HTTP
request at every hop (ServerApp -> SuperLink -> SuperNode -> ClientApp and back), so 64
small LoRA tensors cost hundreds of round trips per message; one vector costs a handful.
Both ends know the names and shapes (the server from the seeded initial adapter, a node
from its own model), so only the values travel; a length mismatch is refused.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

#: Name of the one Array in the ``adapter`` (down) and ``update`` (up) ArrayRecords.
FLAT = "flat"


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
