"""Per-node data shards: written once by ``fedsd shards``, read by the ClientApp each round.

Writer side (:func:`write_shards`) turns a source (a hub dataset, a local image folder,
a ``save_to_disk`` directory, or a generated ``synthetic`` set) into ``num_shards``
directories, one per SuperNode, partitioned with flwr-datasets so that the IID and
Dirichlet (label-skewed) settings match what the Flower ecosystem reports. Layout::

    OUT/manifest.json
    OUT/shard-<i>/train/metadata.jsonl   # {"file_name", "text", "label", "label_name"}
    OUT/shard-<i>/train/<source index>.png
    OUT/shard-<i>/val/metadata.jsonl + images

Reader side (:func:`load_split`, :func:`split_fingerprint`, :func:`resolve_shard_dir`)
runs in a fresh ClientApp process for every message, so this module imports only the
standard library and Pillow at import time; ``datasets`` and ``flwr_datasets`` are
imported inside :func:`write_shards`.

A bad image never stops either side: it is skipped, counted (in the manifest on the
writer side, in :class:`ShardSplit` on the reader side) and logged.

Modules: ``shards`` (the layout and the reader side), ``writer`` (partition, split, publish),
``sources`` (hub, image folder, ``save_to_disk``), ``synthetic`` (the generated stand-in).
"""

from fedsd.ml.data.shards import (
    MANIFEST,
    METADATA,
    PARTITIONERS,
    SPLITS,
    SYNTHETIC,
    ShardSplit,
    SourceUnavailableError,
    load_split,
    resolve_shard_dir,
    split_fingerprint,
)
from fedsd.ml.data.synthetic import make_synthetic_dataset, synthetic_image
from fedsd.ml.data.writer import write_shards

__all__ = [
    "MANIFEST",
    "METADATA",
    "PARTITIONERS",
    "SPLITS",
    "SYNTHETIC",
    "ShardSplit",
    "SourceUnavailableError",
    "load_split",
    "make_synthetic_dataset",
    "resolve_shard_dir",
    "split_fingerprint",
    "synthetic_image",
    "write_shards",
]
