"""End to end over a real Flower deployment: TLS SuperLink with node authentication,
two SuperNodes, a ServerApp SuperExec, ``flwr run``; tiny model, synthetic shards, DP-SGD.
The run is the ``e2e_run`` fixture of conftest.py (shared with test_observability.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import E2E_NODES, fedsd_up_argv, run_fedsd_up

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
