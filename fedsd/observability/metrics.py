"""Prometheus metrics of fedsd's ServerApp and ClientApps (``fedsd_`` prefix).

ClientApps and ServerApps live in short-lived processes (one per message, one per run),
so they write prometheus-client's multiprocess files into ``PROMETHEUS_MULTIPROC_DIR``
and one long-lived exporter per service (``fedsd metrics-exporter``) serves the
aggregate on a fixed port: counters and histograms add up across processes, so totals
survive rounds and runs; gauges keep the most recent value.

Without ``PROMETHEUS_MULTIPROC_DIR`` every function here is a no-op, so a run without
monitoring pays nothing. prometheus-client is imported only when metrics are on.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import cache
from typing import Any

ENV = "PROMETHEUS_MULTIPROC_DIR"
STEP_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ROUND_BUCKETS = (1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


def enabled() -> bool:
    """Whether this process records metrics (``PROMETHEUS_MULTIPROC_DIR`` is set)."""
    return bool(os.environ.get(ENV))


@cache
def _node() -> dict[str, Any]:
    from prometheus_client import Counter, Gauge, Histogram

    labels = ("node", "run")
    last = {"multiprocess_mode": "mostrecent"}
    return {
        "train_loss": Gauge(
            "fedsd_node_train_loss", "Local training loss of the last round", labels, **last
        ),
        "val_loss": Gauge(
            "fedsd_node_val_loss", "Validation loss of the global adapter", labels, **last
        ),
        "steps": Counter("fedsd_node_train_steps_total", "Local optimizer steps", labels),
        "images": Counter("fedsd_node_train_images_total", "Images trained on", labels),
        "images_per_second": Gauge(
            "fedsd_node_images_per_second", "Training throughput of the last round", labels, **last
        ),
        "step_seconds": Histogram(
            "fedsd_node_step_seconds", "Seconds per optimizer step", labels, buckets=STEP_BUCKETS
        ),
        "epsilon": Gauge(
            "fedsd_node_epsilon",
            "Cumulative DP epsilon spent",
            ("node", "run", "mechanism"),
            **last,
        ),
        "last_round": Gauge(
            "fedsd_node_last_round", "Last round this node trained", labels, **last
        ),
        "bytes_sent": Counter("fedsd_node_sent_bytes_total", "Update bytes sent", labels),
        "bytes_received": Counter(
            "fedsd_node_received_bytes_total", "Adapter bytes received", labels
        ),
        "cache_hits": Counter("fedsd_node_latent_cache_hits_total", "Latent cache hits", labels),
        "messages": Counter(
            "fedsd_node_messages_total", "Messages handled", ("node", "run", "type")
        ),
        "epsilon_budget": Gauge(
            "fedsd_node_epsilon_budget",
            "Configured epsilon budget (dp-target-epsilon)",
            ("node", "run", "mechanism"),
            **last,
        ),
        "peak_memory": Gauge(
            "fedsd_node_peak_memory_bytes",
            "Peak memory of the last train message: kind=gpu (CUDA allocated), kind=rss (process)",
            ("node", "run", "kind"),
            **last,
        ),
    }


@cache
def _server() -> dict[str, Any]:
    from prometheus_client import Counter, Gauge, Histogram

    run = ("run",)
    last = {"multiprocess_mode": "mostrecent"}
    return {
        "round": Gauge("fedsd_server_round", "Round in progress or last completed", run, **last),
        "rounds": Counter("fedsd_server_rounds_completed_total", "Rounds completed", run),
        "sampled": Gauge(
            "fedsd_server_nodes_sampled", "Nodes sampled in the last round", run, **last
        ),
        "replied": Gauge(
            "fedsd_server_nodes_replied", "Nodes that replied in the last round", run, **last
        ),
        "failed": Counter("fedsd_server_node_failures_total", "Sampled nodes that failed", run),
        "train_loss": Gauge(
            "fedsd_server_train_loss", "Weighted train loss of the last round", run, **last
        ),
        "val_loss": Gauge(
            "fedsd_server_val_loss", "Weighted val loss of the last aggregate", run, **last
        ),
        "round_seconds": Histogram(
            "fedsd_server_round_seconds", "Round duration", run, buckets=ROUND_BUCKETS
        ),
        "bytes_sent": Counter("fedsd_server_sent_bytes_total", "Bytes sent to nodes", run),
        "bytes_received": Counter("fedsd_server_received_bytes_total", "Bytes from nodes", run),
        "secagg_dropouts": Counter(
            "fedsd_server_secagg_dropouts_total", "Nodes lost during SecAgg+ rounds", run
        ),
        "max_epsilon": Gauge(
            "fedsd_server_max_epsilon",
            "Largest cumulative epsilon reported",
            ("run", "mechanism"),
            **last,
        ),
        "checkpoint_time": Gauge(
            "fedsd_server_checkpoint_timestamp_seconds",
            "Unix time of the last checkpoint",
            run,
            **last,
        ),
        "last_round_seconds": Gauge(
            "fedsd_server_last_round_seconds", "Duration of the last round", run, **last
        ),
        "rounds_planned": Gauge(
            "fedsd_server_rounds_planned", "num-server-rounds of the run", run, **last
        ),
        "round_timeout": Gauge(
            "fedsd_server_round_timeout_seconds", "round-timeout of the run", run, **last
        ),
        "progress_time": Gauge(
            "fedsd_server_progress_timestamp_seconds",
            "Unix time of the last progress: run start or round end",
            run,
            **last,
        ),
        "val_loss_rising": Gauge(
            "fedsd_server_val_loss_rising_rounds",
            "Consecutive rounds in which the validation loss rose",
            run,
            **last,
        ),
        "epsilon_budget": Gauge(
            "fedsd_server_epsilon_budget",
            "Configured epsilon budget (dp-target-epsilon)",
            ("run", "mechanism"),
            **last,
        ),
        "fid": Gauge("fedsd_server_fid", "Pooled FID of the last evaluated aggregate", run, **last),
        "kid": Gauge(
            "fedsd_server_kid",
            "KID (mean of the nodes') of the last evaluated aggregate",
            run,
            **last,
        ),
        "clip_score": Gauge(
            "fedsd_server_clip_score", "CLIP score of the last evaluated aggregate", run, **last
        ),
        "quality_round": Gauge(
            "fedsd_server_quality_round",
            "Round whose aggregate the image-quality figures score (0: base model)",
            run,
            **last,
        ),
        "rejected": Counter(
            "fedsd_server_rejected_updates_total",
            "Train replies dropped by the server's validation, by reason",
            ("run", "reason"),
        ),
        "refusals": Counter(
            "fedsd_server_node_refusals_total",
            "Error replies by which a node refused the run, by reason: app-not-trusted "
            "(app pinning) or the privacy-policy rule (node-config key)",
            ("run", "reason"),
        ),
    }


def _peak_rss_bytes() -> float:
    """Peak resident set size of this process (Linux reports KiB)."""
    import resource

    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024.0


def record_node_train(
    node: int,
    run: str,
    metrics: Mapping[str, Any],
    records: list[dict[str, Any]],
    server_round: int,
    bytes_sent: int,
    bytes_received: int,
    epsilon_budgets: Mapping[str, float] | None = None,
) -> None:
    """What a train message did on this node.

    ``epsilon_budgets`` maps a mechanism to its configured budget, so that an alert can
    compare the spent epsilon with a number Prometheus has (not one in a config file).
    """
    if not enabled():
        return
    m, lab = _node(), {"node": str(node), "run": run}
    m["messages"].labels(type="train", **lab).inc()
    if float(metrics.get("val-examples", 1)) > 0:  # no val split: NaN that means "no data"
        m["val_loss"].labels(**lab).set(float(metrics["val-loss"]))
    m["cache_hits"].labels(**lab).inc(int(metrics.get("cache-hits", 0)))
    m["bytes_sent"].labels(**lab).inc(bytes_sent)
    m["bytes_received"].labels(**lab).inc(bytes_received)
    steps = int(metrics.get("train-steps", 0))
    if steps:
        m["train_loss"].labels(**lab).set(float(metrics["train-loss"]))
        m["steps"].labels(**lab).inc(steps)
        m["images"].labels(**lab).inc(int(metrics.get("num-examples", 0)))
        m["images_per_second"].labels(**lab).set(float(metrics.get("images-per-second", 0)))
        m["step_seconds"].labels(**lab).observe(float(metrics["train-seconds"]) / steps)
        m["last_round"].labels(**lab).set(server_round)
    if "gpu-peak-bytes" in metrics:
        m["peak_memory"].labels(kind="gpu", **lab).set(float(metrics["gpu-peak-bytes"]))
    m["peak_memory"].labels(kind="rss", **lab).set(_peak_rss_bytes())
    for rec in records:
        if rec.get("epsilon") is not None:
            m["epsilon"].labels(mechanism=rec["mechanism"], **lab).set(float(rec["epsilon"]))
    for mech, budget in (epsilon_budgets or {}).items():
        m["epsilon_budget"].labels(mechanism=mech, **lab).set(float(budget))


def record_node_eval(
    node: int, run: str, val_loss: float, bytes_received: int, val_examples: float = 1
) -> None:
    """What an evaluate message did on this node."""
    if not enabled():
        return
    m, lab = _node(), {"node": str(node), "run": run}
    m["messages"].labels(type="evaluate", **lab).inc()
    if val_examples > 0:
        m["val_loss"].labels(**lab).set(val_loss)
    m["bytes_received"].labels(**lab).inc(bytes_received)


def record_run_start(
    run: str,
    rounds_planned: int,
    round_timeout: float,
    epsilon_budgets: Mapping[str, float] | None = None,
    when: float | None = None,
) -> None:
    """A ServerApp started (or resumed) the run: what the alerts compare against."""
    if not enabled():
        return
    import time

    m = _server()
    m["rounds_planned"].labels(run=run).set(rounds_planned)
    m["round_timeout"].labels(run=run).set(round_timeout)
    m["progress_time"].labels(run=run).set(time.time() if when is None else when)
    m["failed"].labels(run=run).inc(0)  # the failure counter exists (0) before any failure
    from fedsd.fl.validation import NODE_REFUSALS, REASONS

    for reason in REASONS:  # and so does each rejection reason
        m["rejected"].labels(run=run, reason=reason).inc(0)
    for reason in NODE_REFUSALS:  # and each refusal reason
        m["refusals"].labels(run=run, reason=reason).inc(0)
    for mech, budget in (epsilon_budgets or {}).items():
        m["epsilon_budget"].labels(run=run, mechanism=mech).set(float(budget))


def record_round(run: str, record: Mapping[str, Any], when: float | None = None) -> None:
    """A completed round, from its history record."""
    if not enabled():
        return
    import time

    m = _server()
    m["round"].labels(run=run).set(record["round"])
    m["rounds"].labels(run=run).inc()
    m["sampled"].labels(run=run).set(record["nodes_sampled"])
    m["replied"].labels(run=run).set(record["nodes_replied"])
    m["failed"].labels(run=run).inc(record["nodes_failed"])
    if record.get("train_loss") is not None:
        m["train_loss"].labels(run=run).set(record["train_loss"])
    m["round_seconds"].labels(run=run).observe(record["seconds"])
    m["last_round_seconds"].labels(run=run).set(record["seconds"])
    m["progress_time"].labels(run=run).set(time.time() if when is None else when)
    m["bytes_sent"].labels(run=run).inc(record["bytes_sent"])
    m["bytes_received"].labels(run=run).inc(record["bytes_received"])
    secagg = [p for p in record.get("privacy", []) if p["mechanism"] == "secagg+"]
    for p in secagg:
        m["secagg_dropouts"].labels(run=run).inc(
            max(0, record["nodes_sampled"] - p["extra"]["aggregated_nodes"])
        )
    worst: dict[str, float] = {}
    for p in record.get("privacy", []):
        if p.get("epsilon") is not None:
            worst[p["mechanism"]] = max(worst.get(p["mechanism"], 0.0), float(p["epsilon"]))
    for mech, eps in worst.items():
        m["max_epsilon"].labels(run=run, mechanism=mech).set(eps)


def record_rejection(run: str, reason: str) -> None:
    """A train reply the server dropped (``fedsd.fl.validation.REASONS``)."""
    if enabled():
        _server()["rejected"].labels(run=run, reason=reason).inc()


def record_node_refusal(run: str, reason: str) -> None:
    """A node refused the run (``fedsd.fl.validation.NODE_REFUSALS``)."""
    if enabled():
        _server()["refusals"].labels(run=run, reason=reason).inc()


def record_val_loss(run: str, loss: float | None, rising_rounds: int | None = None) -> None:
    """The validation loss of the latest aggregate, and for how many rounds in a row it
    rose (an alert wants "rising for k rounds", which PromQL cannot count in rounds)."""
    if not enabled():
        return
    if loss is not None:
        _server()["val_loss"].labels(run=run).set(loss)
    if rising_rounds is not None:
        _server()["val_loss_rising"].labels(run=run).set(rising_rounds)


def record_quality(run: str, evaluated_round: int, quality: Mapping[str, Any]) -> None:
    """The image quality of round ``evaluated_round``'s aggregate (0: the base model), from
    its QualityRecord (``fid``, ``kid``, ``clip_score``): a dashboard charts quality over
    rounds next to the loss, which says little about the images. A None figure (not
    computed: no statistics, no CLIP model) leaves its gauge at the last value."""
    if not enabled():
        return
    m = _server()
    m["quality_round"].labels(run=run).set(evaluated_round)
    for key in ("fid", "kid", "clip_score"):
        if quality.get(key) is not None:
            m[key].labels(run=run).set(float(quality[key]))


def record_checkpoint(run: str, when: float) -> None:
    """A checkpoint was written at ``when`` (unix seconds)."""
    if enabled():
        _server()["checkpoint_time"].labels(run=run).set(when)


def rising_rounds(losses: list[float | None]) -> int:
    """How many of the last consecutive steps of ``losses`` went up (None breaks a run)."""
    count = 0
    for prev, cur in zip(reversed(losses[:-1]), reversed(losses[1:]), strict=True):
        if prev is None or cur is None or not cur > prev:
            break
        count += 1
    return count


def epsilon_budgets(privacy: Any) -> dict[str, float]:
    """Configured budgets by mechanism name: DP-SGD's dp-target-epsilon when given."""
    target = float(getattr(privacy, "dp_target_epsilon", 0.0) or 0.0)
    if "dp-sample" in privacy.components and target > 0:
        return {"dp-sgd": target}
    return {}


def serve_exporter(port: int, multiproc_dir: str, host: str = "127.0.0.1") -> None:
    """Serve the aggregate of ``multiproc_dir`` on ``host:port/metrics`` until stopped.

    One per service (each SuperNode, the ServerApp SuperExec): the app processes come
    and go, the exporter and its port stay.
    """
    import signal
    import threading

    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    os.makedirs(multiproc_dir, exist_ok=True)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=multiproc_dir)
    server, thread = start_http_server(port, addr=host, registry=registry)
    print(f"fedsd metrics-exporter: {multiproc_dir} on http://{host}:{port}/metrics", flush=True)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    server.shutdown()
    thread.join(timeout=5)


@cache
def _runner() -> dict[str, Any]:
    from prometheus_client import Counter

    return {
        "restarts": Counter(
            "fedsd_service_restarts_total",
            "Services that `fedsd up` restarted after they died",
            ("service",),
        )
    }


def record_service_restart(service: str) -> None:
    """One restart of ``service`` by the ``fedsd up --local`` supervisor."""
    if enabled():
        _runner()["restarts"].labels(service).inc()
