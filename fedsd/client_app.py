"""The ClientApp: train the global adapter on this node's shard, or evaluate it.

A SuperNode starts a fresh process for every message, so this module imports only
Flower at import time; torch and diffusers come in with ``fedsd.task`` inside the
handlers.

Messages carry one ``config`` record: ``adapter`` (the global LoRA tensors as one flat
vector's bytes, see ``fedsd.fl.payload``), ``server-round``, ``run-key``, and under FFA-LoRA
``lora-a-digest``. A train reply carries the node's ``update`` (its adapter minus the
global one, after the privacy mode's clipping and noise, as bytes with its dtype),
``metrics`` with ``num-examples`` (the FedAvg weight) and ``privacy`` (the node's privacy
records as JSON).

Before any handler (and any SecAgg+ stage), the ``node_policy`` mod checks the run
against the data owner's privacy policy in the node config (``fedsd.privacy.node_policy``) and
answers a run that breaks it with an error naming the rule.

Under SecAgg+ the ServerApp runs Flower's ``SecAggPlusWorkflow``, whose messages use the
legacy FitIns/FitRes layout; ``secaggplus_mod`` handles its key-exchange stages itself and
calls the train handler only in the masked-vector stage, which then answers in FitRes
form: parameters = [update], num_examples = weight, metrics = metrics + privacy.
"""

from __future__ import annotations

import time
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsd.fl.payload import ADAPTER, from_bytes
from fedsd.quality import MESSAGE_TYPE as QUALITY_MESSAGE

SECAGG_RECORD = "secaggplus_configs"  # flwr.common.secure_aggregation.secaggplus_constants


def secagg_when_asked(msg: Message, context: Context, call_next: Any) -> Message:
    """Flower's ``secaggplus_mod`` for the train messages of a SecAgg+ round only (it
    rejects any train message without its stage key, i.e. every non-SecAgg run's)."""
    if msg.metadata.message_type == "train" and SECAGG_RECORD in msg.content.config_records:
        from flwr.client.mod import secaggplus_mod

        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def node_policy(msg: Message, context: Context, call_next: Any) -> Message:
    """The data owner's privacy policy (``fedsd.privacy.node_policy``), checked before anything
    of the run happens on this node (handlers, SecAgg+ stages, any image read); a run
    that breaks it gets an error reply naming the rule."""
    from fedsd.privacy.node_policy import POLICY_KEYS

    if msg.metadata.message_type.split(".")[0] not in ("train", "evaluate") or not any(
        context.node_config.get(k) not in (None, "") for k in POLICY_KEYS
    ):
        return call_next(msg, context)
    reason = policy_refusal(msg, context)
    if reason is None:
        return call_next(msg, context)
    from flwr.app import Error

    print(f"fedsd node: {reason}", flush=True)
    return Message(Error(code=POLICY_ERROR_CODE, reason=reason), reply_to=msg)


POLICY_ERROR_CODE = 2  # flwr ErrorCode.CLIENT_APP_RAISED_EXCEPTION: the app refused


def policy_refusal(msg: Message, context: Context) -> str | None:
    """Why the node's policy refuses this message's run, or None."""
    from fedsd.config import RunConfig
    from fedsd.privacy.node import NodePrivacy, data_owner_id
    from fedsd.privacy.node_policy import NodePolicy, PolicyRefusal, listed_images
    from fedsd.task import NodeSettings

    cfg = RunConfig.from_mapping(context.run_config)
    node = NodeSettings.from_node_config(context.node_config)
    policy = NodePolicy.from_node_config(context.node_config)
    config = msg.content.config_records.get("config") or {}
    run_key = str(config.get("run-key", "default"))
    privacy = NodePrivacy(cfg, node.cache_dir, run_key, data_owner_id(node.shard_dir))
    try:
        policy.check(
            privacy, listed_images(node.shard_dir / "train"), int(config.get("server-round", 0))
        )
        if msg.metadata.message_type == QUALITY_MESSAGE:
            policy.check_quality()
    except PolicyRefusal as exc:
        return str(exc)
    return None


app = ClientApp(mods=[node_policy, secagg_when_asked])

LEGACY_PARAMS = "fitins.parameters"


def _incoming(msg: Message) -> tuple[Any, dict[str, Any], bool]:
    """(flat global adapter, config, legacy?) from our layout or SecAgg+'s FitIns."""
    content = msg.content
    if LEGACY_PARAMS in content.array_records:
        from flwr.common import parameters_to_ndarrays
        from flwr.compat.common.recorddict_compat import recorddict_to_fitins

        fitins = recorddict_to_fitins(content, keep_input=True)
        (flat,) = parameters_to_ndarrays(fitins.parameters)
        return flat, dict(fitins.config), True
    config = dict(content.config_records.get("config", {}))
    if ADAPTER not in config:
        raise ValueError(
            f"the message's config record has no {ADAPTER!r}: is the server's fedsd this "
            "node's version (fedsd.fl.payload)?"
        )
    return from_bytes(config.pop(ADAPTER), "float32"), config, False


def _setup(msg: Message, context: Context) -> tuple[Any, int, dict[str, Any], bool]:
    from fedsd.config import RunConfig
    from fedsd.task import NodeSettings, NodeTask

    cfg = RunConfig.from_mapping(context.run_config)
    node = NodeSettings.from_node_config(context.node_config)
    task = NodeTask(cfg, node)
    flat, config, legacy = _incoming(msg)
    digest = config.get("lora-a-digest")
    task.load_global_flat(flat, str(digest) if digest else None)
    task.received_bytes = int(flat.nbytes)
    return task, int(config.get("server-round", 0)), config, legacy


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Score the global adapter, train on it (privately if asked), return the update."""
    from fedsd.fl.payload import encode_update, pack, vector_record
    from fedsd.ml.training import train_images
    from fedsd.privacy.node import NodePrivacy, data_owner_id, records_json
    from fedsd.privacy.node_policy import NodePolicy

    t0 = time.perf_counter()
    task, server_round, config, legacy = _setup(msg, context)
    val_loss, val_examples = task.evaluate()
    run_key = str(config.get("run-key", "default"))
    owner = data_owner_id(task.node.shard_dir)
    privacy = NodePrivacy(task.cfg, task.node.cache_dir, run_key, owner)
    start = task.outgoing()
    data = task.encoded("train")
    n_train = train_images(data, task.cfg)
    policy = NodePolicy.from_node_config(context.node_config)
    if not policy.empty:  # again with the images actually readable, before training
        policy.check(privacy, n_train, server_round)
    plan = privacy.plan_dp_sgd(n_train) if n_train else None
    records = []
    if plan is not None and plan.budget_spent:
        result = None  # the budget is spent: no training, no update
        records.append(privacy.dp_sgd_record(plan, []))
    else:
        result = task.train(server_round, plan)
        if plan is not None:
            records.append(privacy.dp_sgd_record(plan, result.dp_history))
    trained = task.outgoing()
    update = {k: trained[k] - start[k] for k in start}
    if result is not None:  # a node with its budget spent releases nothing (weight 0)
        update, released = privacy.release(update, server_round)
        records += released
    weight = 0 if result is None else privacy.weight(result.images, n_train)
    metrics: dict[str, Any] = {
        "num-examples": weight,
        "val-loss": val_loss,
        "val-examples": val_examples,
        "train-loss": result.loss if result else float("nan"),
        "train-steps": result.steps if result else 0,
        "train-seconds": result.seconds if result else 0.0,
        "images-per-second": result.images_per_second if result else 0.0,
        "shard-images": len(data),
        "skipped-images": data.skipped,
        "cache-hits": task.cache_hits,
        "dp-budget-spent": int(result is None),
        "node-seconds": time.perf_counter() - t0,
    }
    if task.device.type == "cuda":
        import torch

        metrics["gpu-peak-bytes"] = int(torch.cuda.max_memory_allocated(task.device))
    flat = pack(update)
    from fedsd.observability import metrics as prom

    prom.record_node_train(
        context.node_id,
        run_key,
        metrics,
        [r.to_dict() for r in records],
        server_round,
        int(flat.nbytes),
        int(task.received_bytes),
        prom.epsilon_budgets(task.cfg.privacy),
    )
    if legacy:  # SecAgg+ quantizes the vector itself (secagg-quantization-range)
        return _fitres_reply(msg, flat, weight, metrics, records_json(records))
    content = RecordDict(
        {
            "update": ConfigRecord(vector_record(encode_update(flat, task.cfg.update_dtype))),
            "metrics": MetricRecord(metrics),
            "privacy": ConfigRecord({"records": records_json(records)}),
        }
    )
    return Message(content=content, reply_to=msg)


def _fitres_reply(
    msg: Message, flat: Any, weight: int, metrics: dict[str, Any], privacy: str
) -> Message:
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common.recorddict_compat import fitres_to_recorddict

    fitres = FitRes(
        status=Status(code=Code.OK, message="ok"),
        parameters=ndarrays_to_parameters([flat]),
        num_examples=int(weight),
        metrics={**metrics, "privacy": privacy},
    )
    return Message(content=fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Validation denoising loss of the global adapter at fixed timesteps and noise."""
    task, _, config, _ = _setup(msg, context)
    loss, n = task.evaluate()
    from fedsd.observability import metrics as prom

    run_key = str(config.get("run-key", "default"))
    prom.record_node_eval(context.node_id, run_key, loss, int(task.received_bytes), n)
    metrics = MetricRecord(
        {"num-examples": n, "val-loss": loss, "val-examples": n, "cache-hits": task.cache_hits}
    )
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


@app.evaluate("quality")
def quality(msg: Message, context: Context) -> Message:
    """FID/KID/CLIP statistics of the global adapter against this node's held-out images
    (``fedsd.quality.node``): feature moments and sums, never an image."""
    from fedsd.quality.extractors import find_dir
    from fedsd.quality.node import evaluate_quality

    task, _, config, _ = _setup(msg, context)
    where = find_dir(
        task.model_path, task.node.cache_dir, context.node_config.get("quality-extractors") or None
    )
    result = evaluate_quality(task, task.cfg.quality, where)
    arrays = ArrayRecord(array_dict={k: Array(v) for k, v in result.arrays.items()})
    content = RecordDict(
        {
            "quality": arrays,
            "metrics": MetricRecord(result.metrics),
            "quality-info": ConfigRecord({"extractors": result.extractors}),
        }
    )
    return Message(content=content, reply_to=msg)
