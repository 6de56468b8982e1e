"""Grafana dashboards of fedsd, as code: :data:`DASHBOARDS` and :func:`render` give the
JSON that ``scripts/monitoring.py --write`` commits as ``docker/grafana/dashboards/*.json``
(``--check``: exit 1 if a committed file differs). Kept in the package next to the
metrics the panels chart (fedsd.observability.metrics); bench/render_dashboard.py draws
them with :func:`expand`.

Written as code so that every panel has the same datasource (the provisioned one, by its
uid), uids stay stable, and a test can compare the committed files with this output and
run every panel's PromQL against a real Prometheus (:func:`queries`, :func:`expand`).

* ``training-health`` (uid ``fedsd-training-health``): one federation's learning: loss and
  validation loss, image quality (FID, KID, CLIP score), nodes per round, failures, round
  time, images/s and step time per node, epsilon against its budget, peak memory, payload
  bytes, rejected updates, privacy policy refusals, service restarts.
* ``fleet`` (uid ``fedsd-fleet``): the SuperLink's view: health, nodes by status and per
  node, runs by status, exporters up, probe latency and errors, messages per node.

Standard library only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

DATASOURCE_UID = "fedsd-prometheus"
DATASOURCE = {"type": "prometheus", "uid": DATASOURCE_UID}
RUN = '{run=~"$run"}'


def _target(ref: str, expr: str, legend: str) -> dict[str, Any]:
    return {"refId": ref, "datasource": DATASOURCE, "expr": expr, "legendFormat": legend}


def _panel(
    title: str,
    description: str,
    targets: list[tuple[str, str]],
    *,
    unit: str = "short",
    kind: str = "timeseries",
    width: int = 12,
    height: int = 8,
    stepped: bool = True,
) -> dict[str, Any]:
    """A panel without id and position (the layout assigns them)."""
    refs = "ABCDEFGH"
    panel: dict[str, Any] = {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": [_target(refs[i], e, leg) for i, (e, leg) in enumerate(targets)],
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "gridPos": {"w": width, "h": height},
    }
    if kind == "timeseries":
        # Most fedsd gauges change once per round: draw steps, not slopes between rounds.
        style = "stepAfter" if stepped else "linear"
        panel["fieldConfig"]["defaults"]["custom"] = {"lineInterpolation": style}
        panel["options"] = {"legend": {"displayMode": "list", "placement": "bottom"}}
    else:
        panel["options"] = {"reduceOptions": {"calcs": ["lastNotNull"]}}
    return panel


def _stat(
    title: str, description: str, targets: list[tuple[str, str]], *, unit: str = "short"
) -> dict[str, Any]:
    """A stat panel: one number (the last value), a quarter of a row wide."""
    return _panel(title, description, targets, unit=unit, kind="stat", width=6, height=5)


def _layout(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ids 1..n and left-to-right rows of Grafana's 24-column grid."""
    x = y = row_height = 0
    for i, panel in enumerate(panels, start=1):
        pos = panel["gridPos"]
        if x + pos["w"] > 24:
            x, y, row_height = 0, y + row_height, 0
        pos.update(x=x, y=y)
        x += pos["w"]
        row_height = max(row_height, pos["h"])
        panel["id"] = i
    return panels


def _dashboard(
    uid: str, title: str, description: str, panels: list[dict[str, Any]], run_var: bool
) -> dict[str, Any]:
    variables = []
    if run_var:
        query = "label_values(fedsd_server_round, run)"
        variables.append(
            {
                "name": "run",
                "label": "run",
                "type": "query",
                "datasource": DATASOURCE,
                "definition": query,
                "query": {"query": query, "refId": "run"},
                "refresh": 2,
                "includeAll": True,
                "multi": True,
                "allValue": ".*",
                "current": {"text": "All", "value": "$__all"},
                "sort": 1,
            }
        )
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["fedsd"],
        "editable": False,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "timezone": "browser",
        "templating": {"list": variables},
        "annotations": {"list": []},
        "panels": _layout(panels),
    }


def _image_quality() -> dict[str, Any]:
    """FID and CLIP score of the last evaluated aggregate; KID (about 0.01, where FID is
    tens) on a right axis of its own."""
    panel = _panel(
        "Image quality",
        "FID pooled over the nodes and KID (mean of the nodes'; both lower is better) of "
        "images generated with the last evaluated aggregate against the nodes' held-out "
        "images, and CLIP score (higher is better), every eval-every rounds (KID: right axis)",
        [
            (f"fedsd_server_fid{RUN}", "FID ({{run}})"),
            (f"fedsd_server_clip_score{RUN}", "CLIP score ({{run}})"),
            (f"fedsd_server_kid{RUN}", "KID ({{run}})"),
        ],
    )
    panel["fieldConfig"]["overrides"].append(
        {
            "matcher": {"id": "byFrameRefID", "options": "C"},
            "properties": [{"id": "custom.axisPlacement", "value": "right"}],
        }
    )
    return panel


def training_health() -> dict[str, Any]:
    """The ``fedsd-training-health`` dashboard."""
    panels = [
        _stat(
            "Round",
            "Last completed round and num-server-rounds of each run",
            [
                (f"max by (run) (fedsd_server_round{RUN})", "round ({{run}})"),
                (f"max by (run) (fedsd_server_rounds_planned{RUN})", "planned ({{run}})"),
            ],
        ),
        _stat(
            "Seconds since progress",
            "Since the run started or last completed a round; alert RoundStalled compares "
            "it with round-timeout",
            [(f"time() - max by (run) (fedsd_server_progress_timestamp_seconds{RUN})", "{{run}}")],
            unit="s",
        ),
        _stat(
            "Node failures",
            "Sampled nodes that did not reply with an update, all rounds",
            [(f"sum by (run) (fedsd_server_node_failures_total{RUN})", "{{run}}")],
        ),
        _stat(
            "Validation loss rising",
            "Consecutive rounds in which the validation loss rose (alert ValLossRising at 3)",
            [(f"max by (run) (fedsd_server_val_loss_rising_rounds{RUN})", "{{run}}")],
        ),
        _panel(
            "Loss per round",
            "Images-weighted train loss of the last round and validation loss of the last "
            "aggregate (fixed timesteps and noise: comparable across rounds)",
            [
                (f"fedsd_server_train_loss{RUN}", "train ({{run}})"),
                (f"fedsd_server_val_loss{RUN}", "validation ({{run}})"),
            ],
        ),
        _image_quality(),
        _panel(
            "Loss per node",
            "Each node's local train loss and validation loss of the adapter it received",
            [
                (f"fedsd_node_train_loss{RUN}", "train {{instance}}"),
                (f"fedsd_node_val_loss{RUN}", "validation {{instance}}"),
            ],
        ),
        _panel(
            "Nodes per round",
            "Nodes sampled for the last round and nodes that replied with an update",
            [
                (f"fedsd_server_nodes_sampled{RUN}", "sampled ({{run}})"),
                (f"fedsd_server_nodes_replied{RUN}", "replied ({{run}})"),
            ],
        ),
        _panel(
            "Round time",
            "Duration of the last completed round (train, aggregate, checkpoint)",
            [(f"fedsd_server_last_round_seconds{RUN}", "{{run}}")],
            unit="s",
        ),
        _panel(
            "Images per second per node",
            "Training throughput of each node's last round",
            [(f"fedsd_node_images_per_second{RUN}", "{{instance}}")],
        ),
        _panel(
            "Step time per node",
            "Mean seconds per optimizer step since the exporter started",
            [
                (
                    f"fedsd_node_step_seconds_sum{RUN} / fedsd_node_step_seconds_count{RUN}",
                    "{{instance}}",
                )
            ],
            unit="s",
        ),
        _panel(
            "Epsilon vs budget",
            "Cumulative DP epsilon each node has spent, and the budget (dp-target-epsilon); "
            "alert EpsilonOverBudget fires above it",
            [
                (f"fedsd_node_epsilon{RUN}", "{{instance}} {{mechanism}}"),
                (
                    f"max by (run, mechanism) (fedsd_node_epsilon_budget{RUN})",
                    "budget {{mechanism}} ({{run}})",
                ),
            ],
        ),
        _panel(
            "Peak memory per node",
            "Peak of each node's last train message: GPU memory allocated (kind=gpu, CUDA "
            "nodes) and the ClientApp process's resident set (kind=rss)",
            [(f"fedsd_node_peak_memory_bytes{RUN}", "{{instance}} {{kind}}")],
            unit="bytes",
        ),
        _panel(
            "Payload bytes",
            "Adapter bytes the server sent and update bytes it received, all rounds",
            [
                (f"sum by (run) (fedsd_server_sent_bytes_total{RUN})", "sent ({{run}})"),
                (f"sum by (run) (fedsd_server_received_bytes_total{RUN})", "received ({{run}})"),
            ],
            unit="bytes",
            stepped=False,
        ),
        _panel(
            "Last round per node",
            "Last round each node trained in (a node falling behind stops rising)",
            [(f"fedsd_node_last_round{RUN}", "{{instance}}")],
        ),
        _panel(
            "Rejected updates",
            "Train replies the server's validation dropped, all rounds, by reason (alert "
            "UpdatesRejected); the ServerApp log names each node",
            [
                (
                    f"sum by (run, reason) (fedsd_server_rejected_updates_total{RUN})",
                    "{{reason}} ({{run}})",
                )
            ],
        ),
        _panel(
            "Node refusals",
            "Runs a node refused: app-not-trusted (app pinning) or the privacy-policy rule "
            "(node-config key) the run breaks",
            [
                (
                    f"sum by (run, reason) (fedsd_server_node_refusals_total{RUN})",
                    "{{reason}} ({{run}})",
                )
            ],
        ),
        _panel(
            "Service restarts",
            "Services that fedsd up --local restarted after they died, by service (0 when "
            "none was; compose and Kubernetes count their own restarts)",
            [
                (
                    "sum by (service) (fedsd_service_restarts_total) or on() vector(0)",
                    "{{service}}",
                )
            ],
        ),
    ]
    return _dashboard(
        "fedsd-training-health",
        "fedsd / training health",
        "One federation's learning, per round and per node (fedsd/observability/dashboards.py)",
        panels,
        run_var=True,
    )


def fleet() -> dict[str, Any]:
    """The ``fedsd-fleet`` dashboard."""
    panels = [
        _stat(
            "SuperLink up",
            "1: GET /health answered 200 at the SuperLink exporter's last probe",
            [("fedsd_superlink_up", "{{instance}}")],
        ),
        _stat(
            "Nodes online",
            "Nodes the SuperLink lists as online",
            [('sum(fedsd_superlink_nodes{status="online"})', "online")],
        ),
        _stat(
            "Runs running",
            "Runs the SuperLink lists as running",
            [('sum(fedsd_superlink_runs{status="running"})', "running")],
        ),
        _stat(
            "Runs failed",
            "Runs that finished as failed",
            [('sum(fedsd_superlink_runs{status="failed"})', "failed")],
        ),
        _panel(
            "Nodes by status",
            "Nodes known to the SuperLink (flwr supernode list), by status",
            [("fedsd_superlink_nodes", "{{status}}")],
        ),
        _panel(
            "Node online",
            "Per node id: 1 online, 0 registered or offline (alert SuperNodeOffline)",
            [("fedsd_superlink_node_online", "node {{node_id}}")],
        ),
        _panel(
            "Runs by status",
            "Runs known to the SuperLink (flwr ls), by status",
            [("fedsd_superlink_runs", "{{status}}")],
        ),
        _panel(
            "Exporters up",
            "Prometheus reached the service's exporter (alerts SuperNodeDown, ExporterDown)",
            [('up{job=~"superlink|serverapp|supernode"}', "{{instance}}")],
        ),
        _panel(
            "SuperLink probe time",
            "Seconds the last probe took (health, node list, run list)",
            [("fedsd_superlink_scrape_seconds", "{{instance}}")],
            unit="s",
            stepped=False,
        ),
        _panel(
            "SuperLink probe errors",
            "Probes in which a check failed, by check",
            [("fedsd_superlink_scrape_errors_total", "{{check}}")],
        ),
        _panel(
            "Messages per node",
            "Messages each SuperNode's ClientApps handled, by type",
            [("sum by (instance, type) (fedsd_node_messages_total)", "{{instance}} {{type}}")],
            stepped=False,
        ),
        _panel(
            "Payload bytes per node",
            "Bytes each node received (adapters) and sent (updates)",
            [
                ("sum by (instance) (fedsd_node_received_bytes_total)", "received {{instance}}"),
                ("sum by (instance) (fedsd_node_sent_bytes_total)", "sent {{instance}}"),
            ],
            unit="bytes",
            stepped=False,
        ),
    ]
    return _dashboard(
        "fedsd-fleet",
        "fedsd / fleet",
        "The SuperLink's view of nodes and runs, and the exporters "
        "(fedsd/observability/dashboards.py)",
        panels,
        run_var=False,
    )


DASHBOARDS = {"training-health.json": training_health, "fleet.json": fleet}


def render(dashboard: dict[str, Any]) -> str:
    """The JSON text of a dashboard, as committed."""
    return json.dumps(dashboard, indent=2) + "\n"


def queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """``(panel title, refId, expr)`` of every target of every panel."""
    for panel in dashboard.get("panels", []):
        for target in panel.get("targets", []):
            yield panel["title"], target["refId"], target["expr"]


_VARIABLES = re.compile(r"\$(\{)?(__rate_interval|__interval|__range|run)(?(1)\})")


def expand(expr: str, *, run: str = ".*", interval: str = "1m") -> str:
    """``expr`` with Grafana's variables replaced, as Grafana would send it."""
    values = {"run": run, "__rate_interval": interval, "__interval": interval}
    values["__range"] = interval
    return _VARIABLES.sub(lambda m: values[m.group(2)], expr)
