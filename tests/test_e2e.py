"""End to end over a real Flower deployment: TLS SuperLink with node authentication,
two SuperNodes, a ServerApp SuperExec, ``flwr run``; tiny model, synthetic shards."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.e2e


def _free_port_block(n: int) -> int:
    """A base port with ``n`` free ports after it, below Linux's ephemeral range (32768+):
    fixed ports in that range can be taken by any outgoing connection's source port."""
    import random
    import socket

    for _ in range(50):
        base = random.randrange(20000, 32000 - n)
        socks = []
        try:
            for p in range(base, base + n):
                sk = socket.socket()
                socks.append(sk)
                sk.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for sk in socks:
                sk.close()
    raise RuntimeError("no block of free ports")


METRICS_PORT = _free_port_block(3)


def _up(tiny_model, shards, out, rounds):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "fedsd.cli",
            "up",
            "--local",
            "--nodes",
            "2",
            "--rounds",
            str(rounds),
            "--model",
            str(tiny_model),
            "--shards",
            str(shards),
            "--out",
            str(out),
            "--run-config",
            "resolution=64 learning-rate=0.001",
            "--timeout",
            "600",
            "--metrics-port",
            str(METRICS_PORT),
        ],
        capture_output=True,
        text=True,
        timeout=700,
    )


@pytest.fixture(scope="module")
def federation(tiny_model, tmp_path_factory):
    """Run `fedsd up --local --nodes 2 --rounds 2` once, through the real CLI."""
    root = tmp_path_factory.mktemp("e2e")
    shards = root / "shards"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "fedsd.cli",
            "shards",
            "--source",
            "synthetic",
            "--num-shards",
            "2",
            "--synthetic-images",
            "24",
            "--out",
            str(shards),
        ],
        check=True,
    )
    out = root / "out"
    proc = _up(tiny_model, shards, out, 2)
    return proc, out, shards


def test_run_succeeds_and_shows_progress(federation):
    proc, _, _ = federation
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "fedsd round 1/2" in proc.stdout and "fedsd round 2/2" in proc.stdout


def test_history_records_every_round(federation):
    _, out, _ = federation
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


def test_metrics_of_every_service_match_the_history(federation):
    """``--metrics-port``: each SuperNode and the ServerApp got an exporter; what their app
    processes recorded agrees with history.json."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    _, out, _ = federation
    hist = json.loads((out / "history.json").read_text())
    logs = out / ".deploy" / "logs"
    assert f"127.0.0.1:{METRICS_PORT}/metrics" in (logs / "metrics-serverapp.log").read_text()
    assert f"127.0.0.1:{METRICS_PORT + 2}/metrics" in (logs / "metrics-node-1.log").read_text()

    def samples(name):
        reg = CollectorRegistry()
        MultiProcessCollector(reg, path=str(out / ".deploy" / "metrics" / name))
        return {s.name: s.value for fam in reg.collect() for s in fam.samples}

    server = samples("metrics-serverapp")
    assert server["fedsd_server_rounds_completed_total"] == 2
    steps = sum(n["train-steps"] for r in hist["rounds"] for n in r["nodes"])
    node_steps = sum(samples(f"metrics-node-{i}")["fedsd_node_train_steps_total"] for i in range(2))
    assert node_steps == steps


def test_adapters_load_in_diffusers_and_change_the_unet(federation, tiny_model):
    from diffusers import StableDiffusionPipeline

    _, out, _ = federation
    for d in ("round-1", "round-2", "latest"):
        assert (out / d / "pytorch_lora_weights.safetensors").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model))
    x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        base = pipe.unet(x, t, c).sample
        pipe.load_lora_weights(str(out / "latest"))
        adapted = pipe.unet(x, t, c).sample
    assert (adapted - base).abs().max() > 1e-6


def test_restart_resumes_after_the_last_round(federation, tiny_model):
    """Same OUT, more rounds: the ServerApp continues from round 2's adapter."""
    _, out, shards = federation
    before = json.loads((out / "history.json").read_text())["rounds"]
    proc = _up(tiny_model, shards, out, 3)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resuming after round 2" in proc.stdout
    assert "fedsd round 1/3" not in proc.stdout and "fedsd round 3/3" in proc.stdout
    after = json.loads((out / "history.json").read_text())["rounds"]
    assert [r["round"] for r in after] == [1, 2, 3]
    assert after[:2] == before  # earlier rounds untouched
