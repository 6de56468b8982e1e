"""The ClientApp: train the global adapter on this node's shard, or evaluate it.

A SuperNode starts a fresh process for every message, so this module imports only
Flower at import time; torch and diffusers come in with ``fedsd.task`` inside the
handlers.

Messages carry ``arrays`` (the global LoRA tensors) and ``config`` (``server-round``,
and under FFA-LoRA ``lora-a-digest``). Train replies carry the node's tensors and
``metrics`` with ``num-examples`` = images trained on (what FedAvg weights by).
"""

from __future__ import annotations

import time

from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


def _setup(msg: Message, context: Context) -> tuple[object, int]:
    from fedsd.config import RunConfig
    from fedsd.task import NodeSettings, NodeTask

    cfg = RunConfig.from_mapping(context.run_config)
    node = NodeSettings.from_node_config(context.node_config)
    task = NodeTask(cfg, node)
    config = msg.content.config_records.get("config", {})
    arrays = {k: v.numpy() for k, v in msg.content.array_records["arrays"].items()}
    digest = config.get("lora-a-digest")
    task.load_global(arrays, str(digest) if digest else None)
    return task, int(config.get("server-round", 0))


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Score the global adapter, train local epochs on it, return adapter and image count."""
    t0 = time.perf_counter()
    task, server_round = _setup(msg, context)
    val_loss, val_examples = task.evaluate()
    result, data = task.train(server_round)
    arrays = task.outgoing()
    metrics = MetricRecord(
        {
            "num-examples": result.images,
            "val-loss": val_loss,
            "val-examples": val_examples,
            "train-loss": result.loss,
            "train-steps": result.steps,
            "train-seconds": result.seconds,
            "images-per-second": result.images_per_second,
            "shard-images": len(data),
            "skipped-images": data.skipped,
            "cache-hits": task.cache_hits,
            "node-seconds": time.perf_counter() - t0,
        }
    )
    content = RecordDict({"arrays": to_record(arrays), "metrics": metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Validation denoising loss of the global adapter at fixed timesteps and noise."""
    task, _ = _setup(msg, context)
    loss, n = task.evaluate()
    metrics = MetricRecord(
        {"num-examples": n, "val-loss": loss, "val-examples": n, "cache-hits": task.cache_hits}
    )
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


def to_record(arrays: dict) -> ArrayRecord:
    """Named numpy arrays -> ArrayRecord, keeping names and order."""
    return ArrayRecord(array_dict={k: Array(v) for k, v in arrays.items()})
