"""End to end over a real Flower deployment: TLS SuperLink with node authentication,
two SuperNodes, a ServerApp SuperExec, ``flwr run``; tiny model, synthetic shards, DP-SGD.
The run is the ``e2e_run`` fixture of conftest.py, watched by a real Prometheus whose data
the observability checks at the end of this file read (one deployment, one xdist worker)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsd.observability import dashboards
from tests.conftest import E2E_NODES, fedsd_up_argv, run_fedsd_up
from tests.e2e.test_observability import _alert_rules

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.e2e


def test_run_succeeds_and_shows_progress(e2e_run):
    assert e2e_run.returncode == 0, e2e_run.stdout[-6000:]
    assert "fedsd round 1/2" in e2e_run.stdout and "fedsd round 2/2" in e2e_run.stdout
    # Not a terminal: the progress view adds one line per round, and one at the end.
    progress = [ln for ln in e2e_run.stdout.splitlines() if ln.startswith("fedsd progress: ")]
    assert len(progress) == 3, progress
    assert progress[0].startswith("fedsd progress: round 1/2 done | nodes 2/2 | train ")
    assert "val " in progress[1] and "(r1)" in progress[1] and "eps " in progress[1]
    assert "/1000 " in progress[1]  # epsilon against dp-target-epsilon
    assert progress[2].startswith("fedsd progress: round 2/2 (finished:completed)")
    assert "(r2)" in progress[2]


def test_nodes_ran_only_the_fab_of_their_own_sources(e2e_run):
    """The default pin (``self``): each node accepted every message's FAB, and that FAB
    is the one built from the sources the nodes run (the hash computed node-side equals
    the one the SuperLink delivered and Flower installed the app under)."""
    from fedsd.deploy.pinning import fab_hash_of
    from fedsd.deploy.run_config import find_app_dir

    digest = fab_hash_of(find_app_dir())
    assert f"the nodes run only these apps (FAB sha256): {digest} (self)" in e2e_run.stdout
    work = e2e_run.out / ".deploy"
    for i in range(E2E_NODES):
        log = (work / "logs" / f"supernode-{i}.log").read_text()
        accepted = re.findall(
            r"fedsd node: app fedsd/fedsd 0\.1\.0 \(FAB sha256 (\w+)\) is pinned \((\w+)\)", log
        )
        # one ClientApp per message: 2 rounds (train) and the final evaluation
        assert len(accepted) >= 3 and set(accepted) == {(digest, "self")}, log[-3000:]
        assert "fedsd app pinning" not in log
        installed = [p.name for p in (work / "node-home" / f"node-{i}" / "apps").iterdir()]
        assert installed == [f"fedsd.fedsd.0.1.0.{digest[:8]}"]


def test_history_records_every_round(e2e_run):
    out = e2e_run.out
    hist = json.loads((out / "history.json").read_text())
    rounds = hist["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["nodes_sampled"] == 2 and r["nodes_replied"] == 2 and r["nodes_failed"] == 0
        assert r["eval_nodes_replied"] == 2
        assert np.isfinite(r["val_loss"]) and np.isfinite(r["train_loss"])
        assert r["bytes_sent"] > 0 and r["bytes_received"] > 0 and r["seconds"] > 0
    # Round 2's nodes loaded the cached latents instead of re-encoding their shards.
    assert all(n["cache-hits"] >= 1 for n in rounds[1]["nodes"])


def test_history_has_the_quality_of_the_base_model_and_every_round(e2e_run):
    """eval-every=1: the base model and each round's aggregate scored by both nodes (FID
    pooled from their statistics, KID and CLIP score), in history.json and on the terminal."""
    hist = json.loads((e2e_run.out / "history.json").read_text())
    scored = [hist["baseline_quality"]] + [r["quality"] for r in hist["rounds"]]
    for q in scored:
        assert q["nodes"] == 2 and q["nodes_failed"] == 0 and q["nodes_rejected"] == 0, q
        assert q["fid"] >= 0 and q["kid"] is not None and q["clip_score"] >= 0, q
        assert q["generated_images"] >= 4 and q["real_images"] >= 4, q
        assert q["clip_images"] == q["generated_images"], q
        assert "NOT real metrics" in q["extractors"], q
    for what in ("base model", "round 1", "round 2"):
        assert f"fedsd quality {what}: fid=" in e2e_run.stdout


def test_metrics_of_every_service_match_the_history(e2e_run):
    """``--metrics-port BASE``: the SuperLink, each SuperNode and the ServerApp got an
    exporter on the documented port; what their app processes recorded agrees with
    history.json."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    out, base = e2e_run.out, e2e_run.metrics_base
    hist = json.loads((out / "history.json").read_text())
    logs = out / ".deploy" / "logs"
    assert f"127.0.0.1:{base}/metrics" in (logs / "metrics-superlink.log").read_text()
    assert f"127.0.0.1:{base + 1}/metrics" in (logs / "metrics-serverapp.log").read_text()
    assert f"127.0.0.1:{base + 11}/metrics" in (logs / "metrics-node-1.log").read_text()
    prometheus_yml = (out / ".deploy" / "prometheus.yml").read_text()
    assert f'"127.0.0.1:{base + 10}"' in prometheus_yml and "alerts.yml" in prometheus_yml

    def samples(name):
        reg = CollectorRegistry()
        MultiProcessCollector(reg, path=str(out / ".deploy" / "metrics" / name))
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in reg.collect()
            for s in fam.samples
        }

    def total(got, name):
        return sum(v for (n, _), v in got.items() if n == name)

    server = samples("metrics-serverapp")
    assert total(server, "fedsd_server_rounds_completed_total") == 2
    assert total(server, "fedsd_server_quality_round") == 2
    assert total(server, "fedsd_server_fid") == pytest.approx(hist["rounds"][-1]["quality"]["fid"])
    clip = hist["rounds"][-1]["quality"]["clip_score"]
    assert total(server, "fedsd_server_clip_score") == pytest.approx(clip)
    assert total(server, "fedsd_server_rounds_planned") == 2
    steps = sum(n["train-steps"] for r in hist["rounds"] for n in r["nodes"])
    nodes = [samples(f"metrics-node-{i}") for i in range(E2E_NODES)]
    assert sum(total(n, "fedsd_node_train_steps_total") for n in nodes) == steps
    for got in nodes:
        assert total(got, "fedsd_node_epsilon_budget") == 1000
        rss = [v for (n, lab), v in got.items() if n == "fedsd_node_peak_memory_bytes"]
        assert rss and all(v > 50e6 for v in rss)  # a ClientApp with torch imported


def test_adapters_load_in_diffusers_and_change_the_unet(e2e_run, tiny_model):
    from diffusers import StableDiffusionPipeline

    out = e2e_run.out
    for d in ("round-1", "round-2", "latest"):
        assert (out / d / "pytorch_lora_weights.safetensors").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model))
    x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        base = pipe.unet(x, t, c).sample
        pipe.load_lora_weights(str(out / "latest"))
        adapted = pipe.unet(x, t, c).sample
    assert (adapted - base).abs().max() > 1e-6


def test_restart_resumes_after_the_last_round(e2e_run, tiny_model):
    """Same OUT, more rounds: the ServerApp continues from round 2's adapter."""
    out = e2e_run.out
    before = json.loads((out / "history.json").read_text())["rounds"]
    argv = fedsd_up_argv(tiny_model, e2e_run.shards, out, 3, e2e_run.metrics_base)
    code, stdout, _, _ = run_fedsd_up(argv)
    assert code == 0, stdout[-6000:]
    assert "resuming after round 2" in stdout
    assert "fedsd round 1/3" not in stdout and "fedsd round 3/3" in stdout
    after = json.loads((out / "history.json").read_text())["rounds"]
    assert [r["round"] for r in after] == [1, 2, 3]
    assert after[:2] == before  # earlier rounds untouched


# ------------------------------------------- observability of the same run (issue 5)

_METRIC = re.compile(r"\b(fedsd_[a-z0-9_]+|up)\b(\{[^}]*\})?")


def _query_range(url: str, expr: str, start: float, end: float) -> list[dict]:
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": "1s"})
    with urllib.request.urlopen(f"{url}/api/v1/query_range?{params}", timeout=30) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


def _has_data(result: list[dict]) -> bool:
    return any(not math.isnan(float(v)) for series in result for _, v in series["values"])


@pytest.mark.e2e
def test_every_dashboard_query_and_alert_input_has_data_in_a_real_run(e2e_run):
    """A real Prometheus scraped every exporter of a real ``fedsd up --local`` run (2 nodes,
    2 rounds, DP-SGD, scrape and rule evaluation every second, the repository's rules).

    Over the run's window (all nodes online + one SuperLink probe, to the final status):

    * every PromQL target of every dashboard panel returns data (Grafana variables
      expanded as Grafana would: ``$run`` = all runs);
    * for every alert rule, every series its expression reads (each ``fedsd_*``/``up``
      selector in it, with its label matchers) returns data. The rule expressions
      themselves must return *nothing* in a healthy run, so evaluating them would prove
      nothing: this shows they are not blind (a renamed metric or a wrong label fails
      here), promtool's unit tests (test_every_alert_fires_in_promtool_unit_tests) show
      they fire on bad histories;
    * Prometheus evaluated every rule without error, and none fired (``ALERTS``).
    """
    if e2e_run.prometheus is None:
        pytest.fail(e2e_run.prometheus_error or "no Prometheus")
    assert e2e_run.returncode == 0, e2e_run.stdout[-4000:]
    url = e2e_run.prometheus
    assert e2e_run.started > 0, "no 'SuperNode(s) online' line in the output"
    start, end = e2e_run.started + 7.0, e2e_run.finished  # SuperLink probe every 5 s
    assert end - start > 10, (start, end)
    missing = []
    for name, build in dashboards.DASHBOARDS.items():
        for title, ref, expr in dashboards.queries(build()):
            query = dashboards.expand(expr)
            if not _has_data(_query_range(url, query, start, end)):
                missing.append(f"{name} / {title!r} / {ref}: {query}")
    assert not missing, "dashboard queries without data:\n" + "\n".join(missing)

    rules = _alert_rules()
    blind = []
    for rule in rules:
        for m in _METRIC.finditer(rule["expr"]):
            selector = m.group(0)
            if not _has_data(_query_range(url, selector, start, end)):
                blind.append(f"{rule['alert']}: {selector}")
    assert not blind, "alert inputs without data:\n" + "\n".join(blind)

    with urllib.request.urlopen(f"{url}/api/v1/rules", timeout=30) as resp:
        groups = json.loads(resp.read())["data"]["groups"]
    loaded = {r["name"]: r for g in groups for r in g["rules"]}
    assert set(loaded) == {r["alert"] for r in rules}
    assert all(r["health"] == "ok" for r in loaded.values()), loaded
    fired = _query_range(url, 'ALERTS{alertstate="firing"}', start, end)
    assert not fired, [s["metric"] for s in fired]

    # The SuperLink exporter saw what the SuperLink did: both nodes online, the run running.
    def peak(expr: str) -> float:
        values = [float(v) for s in _query_range(url, expr, start, end) for _, v in s["values"]]
        return max(values)

    assert peak('fedsd_superlink_nodes{status="online"}') == 2
    assert peak('fedsd_superlink_runs{status="running"}') == 1
    assert peak("fedsd_superlink_up") == 1
    assert peak("max(fedsd_server_round)") == 2
    assert peak('count(up{job="supernode"} == 1)') == 2


@pytest.mark.e2e
def test_training_health_dashboard_renders_from_the_run(e2e_run, tmp_path):
    """bench/render_dashboard.py draws every panel of training-health.json from the run's
    Prometheus data (the committed docs/training-health.png comes from this script)."""
    if e2e_run.prometheus is None:
        pytest.fail(e2e_run.prometheus_error or "no Prometheus")
    out = tmp_path / "training-health.png"
    res = subprocess.run(
        [sys.executable, str(REPO / "bench" / "render_dashboard.py")]
        + ["--prometheus", e2e_run.prometheus, "--out", str(out)]
        + ["--start", str(e2e_run.started), "--end", str(e2e_run.finished)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["panels"] == len(dashboards.training_health()["panels"])
    assert report["without_data"] == []
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
