"""Prometheus metrics: short-lived app processes write multiprocess files, one exporter
per service serves their aggregate; totals add up across processes (rounds), gauges keep
the latest value."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[3]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> dict[str, list]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text.decode()):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def test_federation_metrics_survive_processes_and_are_served(tiny_model, tmp_path):
    prom_dir = tmp_path / "prom"
    prom_dir.mkdir()
    # Two rounds through the real ServerApp loop and ClientApp handlers, in a separate
    # process (prometheus-client picks its multiprocess mode when it is imported).
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from flwr.supercore.task_identity import TaskIdentity
        for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
            setattr(TaskIdentity, attr, value)
        from pathlib import Path
        from tests.unit.test_server import InProcessGrid, _setup, make_shards
        from fedsd.config import RunConfig
        from fedsd.server_app import Federation
        tmp = Path({str(tmp_path)!r})
        shards = make_shards(tmp)
        rc, contexts = _setup({str(tiny_model)!r}, tmp, shards, privacy="dp-sample",
                              **{{"dp-noise-multiplier": 1.0}})
        Federation(InProcessGrid(contexts), RunConfig.from_mapping(rc)).run()
        """
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(prom_dir)}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=ROOT)
    assert list(prom_dir.glob("*.db"))

    port = _free_port()
    exporter = subprocess.Popen(
        [sys.executable, "-m", "fedsd.cli", "metrics-exporter", "--port", str(port)]
        + ["--multiproc-dir", str(prom_dir)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                got = _scrape(port)
                break
            except OSError:
                assert exporter.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
    finally:
        exporter.terminate()
        exporter.wait(timeout=30)

    def total(name):
        return sum(v for _, v in got.get(name, []))

    assert total("fedsd_server_rounds_completed_total") == 2
    assert max(v for _, v in got["fedsd_server_round"]) == 2
    assert total("fedsd_server_nodes_replied") == 2
    assert total("fedsd_server_round_seconds_count") == 2
    # 2 nodes x 2 rounds: 8 images (2 steps) and 4 images (1 step) per round, DP-SGD's
    # Poisson steps: local-epochs x ceil(n / batch) each.
    assert total("fedsd_node_train_steps_total") == 2 * (2 + 1)
    assert {lab["node"] for lab, _ in got["fedsd_node_train_steps_total"]} == {"101", "102"}
    assert total("fedsd_node_messages_total") >= 4
    eps = {lab["node"]: v for lab, v in got["fedsd_node_epsilon"] if lab["mechanism"] == "dp-sgd"}
    assert set(eps) == {"101", "102"} and all(v > 0 for v in eps.values())
    assert max(v for _, v in got["fedsd_server_max_epsilon"]) == max(eps.values())
    assert all(v > 0 for _, v in got["fedsd_server_val_loss"])
    assert total("fedsd_node_step_seconds_count") == 4  # one observation per round and node
    # every rejection reason is exported from the run's start, at 0 for an honest run
    from fedsd.fl.validation import REASONS

    rejected = got["fedsd_server_rejected_updates_total"]
    assert {lab["reason"] for lab, _ in rejected} == set(REASONS)
    assert total("fedsd_server_rejected_updates_total") == 0
    # and so is every reason a node may refuse the run for (app pinning, privacy policy)
    from fedsd.fl.validation import NODE_REFUSALS

    refusals = got["fedsd_server_node_refusals_total"]
    assert {lab["reason"] for lab, _ in refusals} == set(NODE_REFUSALS)
    assert total("fedsd_server_node_refusals_total") == 0


def _multiprocess_samples(prom_dir: Path) -> dict[str, list]:
    """The aggregate of ``prom_dir``'s multiprocess files, as an exporter would serve it."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(prom_dir))
    out: dict[str, list] = {}
    for fam in registry.collect():
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def test_record_quality_sets_the_image_quality_gauges(tmp_path):
    prom_dir = tmp_path / "prom"
    prom_dir.mkdir()
    # prometheus-client picks its multiprocess mode when it is imported: a fresh process.
    # Round 2's CLIP score is None (no CLIP model): the gauge keeps round 0's.
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from fedsd.observability import metrics
        q = dict(fid=80.5, kid=0.05, clip_score=21.0, real_images=8, generated_images=8,
                 clip_images=8, nodes=2, nodes_refused=0, nodes_failed=0,
                 nodes_rejected=0, seconds=1.0, extractors="inception")
        metrics.record_quality("run-a", 0, q)
        metrics.record_quality("run-a", 2, q | dict(fid=40.25, kid=0.02, clip_score=None))
        """
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(prom_dir)}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=ROOT)
    got = _multiprocess_samples(prom_dir)
    values = {
        name: [(lab["run"], v) for lab, v in got[name]]
        for name in (
            "fedsd_server_fid",
            "fedsd_server_kid",
            "fedsd_server_clip_score",
            "fedsd_server_quality_round",
        )
    }
    assert values == {
        "fedsd_server_fid": [("run-a", 40.25)],
        "fedsd_server_kid": [("run-a", 0.02)],
        "fedsd_server_clip_score": [("run-a", 21.0)],
        "fedsd_server_quality_round": [("run-a", 2.0)],
    }


def test_record_quality_is_a_no_op_without_metrics(monkeypatch):
    from fedsd.observability import metrics

    def no_metrics():
        raise AssertionError("metrics created while disabled")

    monkeypatch.delenv(metrics.ENV, raising=False)
    monkeypatch.setattr(metrics, "_server", no_metrics)
    metrics.record_quality("r", 1, {"fid": 1.0, "kid": None, "clip_score": None})


def _defined_metrics() -> set[str]:
    """Every metric name fedsd's exporters define (with a histogram's series)."""
    import re

    names = set()
    for path in (ROOT / "fedsd" / "observability").glob("*.py"):
        names |= set(re.findall(r'"(fedsd_[a-z0-9_]+)"', path.read_text()))
    return names | {f"{n}_{s}" for n in names for s in ("sum", "count", "bucket")}


def test_the_image_quality_panel_charts_defined_metrics_of_the_selected_run():
    import re

    from fedsd.observability import dashboards

    board = dashboards.training_health()
    panel = next(p for p in board["panels"] if p["title"] == "Image quality")
    assert panel["type"] == "timeseries"
    exprs = [t["expr"] for t in panel["targets"]]
    assert exprs == [
        'fedsd_server_fid{run=~"$run"}',
        'fedsd_server_clip_score{run=~"$run"}',
        'fedsd_server_kid{run=~"$run"}',
    ]
    # the layout stays on Grafana's 24-column grid with unique ids
    ids = [p["id"] for p in board["panels"]]
    assert ids == list(range(1, len(ids) + 1))
    assert all(p["gridPos"]["x"] + p["gridPos"]["w"] <= 24 for p in board["panels"])
    # every query of every dashboard reads only metrics fedsd defines
    defined = _defined_metrics()
    for build in dashboards.DASHBOARDS.values():
        for title, ref, expr in dashboards.queries(build()):
            used = set(re.findall(r"\b(fedsd_[a-z0-9_]+)", expr))
            assert used <= defined, (title, ref, used - defined)
