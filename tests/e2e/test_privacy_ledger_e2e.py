"""A data owner's ledger over real `fedsd up --local` deployments on one OUT.

Each `fedsd up` starts a fresh SuperLink state, so Flower hands out new node ids: the
ledger must follow the shards, not the ids. Three ups: 1 DP-SGD round; resumed to 2
rounds (cumulative steps and epsilon per owner = Opacus' RDP figure for all steps;
`fedsd privacy-report` lists each owner once); one node's ledger deleted, resumed to 3
rounds (the server refuses that node's update, and the round aggregates the other's)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port_block, synthetic_shards

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
DP = "dp-noise-multiplier=1.0 batch-size=2 resolution=64 round-timeout=300.0"


def up(
    out: Path, shards: Path, model: Path, rounds: int, extra: str = "", repo: Path = REPO
) -> str:
    """One `fedsd up --local` (2 nodes, DP-SGD); its output. Fails on a non-zero exit."""
    argv = [sys.executable, "-m", "fedsd.cli", "up", "--local", "--nodes", "2"]
    argv += ["--rounds", str(rounds), "--model", str(model), "--shards", str(shards)]
    argv += ["--out", str(out), "--privacy", "dp-sample", "--run-config", f"{DP} {extra}"]
    argv += ["--no-metrics", "--timeout", "500"]
    env = {**os.environ, "PYTHONPATH": str(repo), "PYTHONDONTWRITEBYTECODE": "1"}
    res = subprocess.run(argv, capture_output=True, text=True, cwd=repo, env=env, timeout=560)
    said = res.stdout + res.stderr
    assert res.returncode == 0, said[-6000:]
    return said


def dp_sgd(out: Path, rnd: int) -> list[dict]:
    hist = json.loads((out / "history.json").read_text())
    (r,) = [r for r in hist["rounds"] if r["round"] == rnd]
    return [p for p in r["privacy"] if p["mechanism"] == "dp-sgd"]


def opacus_epsilon(rec: dict, steps: int) -> float:
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(rec["noise_multiplier"], rec["sample_rate"], steps)]
    return acc.get_epsilon(delta=rec["delta"])


@pytest.mark.timeout(1800)
def test_ledger_follows_the_data_across_ups_and_a_wiped_one_is_refused(tiny_model, tmp_path):
    shards, out = synthetic_shards(tmp_path, 2, 16), tmp_path / "out"
    up(out, shards, tiny_model, 1)
    up(out, shards, tiny_model, 2)  # resumed on a fresh SuperLink state: new node ids
    first, second = dp_sgd(out, 1), dp_sgd(out, 2)
    assert {r["node_id"] for r in first}.isdisjoint({r["node_id"] for r in second})
    owners = {r["owner"] for r in first}
    assert len(owners) == 2 and {r["owner"] for r in second} == owners
    by_owner = {r["owner"]: r for r in first}
    for rec in second:
        steps = 2 * by_owner[rec["owner"]]["steps"]
        assert rec["steps"] == rec["lifetime_steps"] == steps > 0
        want = opacus_epsilon(rec, steps)
        assert rec["epsilon"] == pytest.approx(want, rel=1e-6)
        assert rec["lifetime_epsilon"] == pytest.approx(want, rel=1e-6)
        print(
            f"owner {rec['owner']}: {steps} steps, epsilon {rec['epsilon']:.4f} "
            f"(opacus {want:.4f}; round 1: {by_owner[rec['owner']]['epsilon']:.4f})"
        )
    report = subprocess.run(
        [sys.executable, "-m", "fedsd.cli", "privacy-report", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=True,
    ).stdout
    summary = report.split("by the end of the run (cumulative):")[1]
    assert len([ln for ln in summary.splitlines() if ln.strip()]) == 2, report
    for owner in owners:
        assert summary.count(f"data owner {owner} dp-sgd") == 1, report
    remembered = json.loads((out / "privacy-ledgers.json").read_text())["owners"]
    assert {o: m["dp-sgd"]["steps"] for o, m in remembered.items()} == {
        r["owner"]: r["lifetime_steps"] for r in second
    }

    # Node 1's cache loses its ledger (a wiped or replaced disk): its update is refused.
    ledger_dirs = list((out / ".deploy" / "cache" / "node-1" / "privacy").glob("owner-*"))
    assert len(ledger_dirs) == 1
    wiped = ledger_dirs[0].name.removeprefix("owner-")
    shutil.rmtree(ledger_dirs[0])
    said = up(out, shards, tiny_model, 3, "min-nodes=1")
    refused = [ln for ln in said.splitlines() if "update refused" in ln]
    assert len(refused) == 1, said[-6000:]
    assert f"data owner {wiped[:12]}'s dp-sgd ledger went backwards" in refused[0]
    steps = 2 * by_owner[wiped]["steps"]
    assert f"held 0 steps (epsilon 0) before this round, but reported {steps} steps" in refused[0]
    print(refused[0].strip())
    hist = json.loads((out / "history.json").read_text())
    r3 = hist["rounds"][-1]
    assert r3["round"] == 3 and r3["nodes_sampled"] == 2 and r3["nodes_replied"] == 1
    (kept,) = dp_sgd(out, 3)
    assert kept["owner"] != wiped and kept["lifetime_steps"] == 3 * by_owner[kept["owner"]]["steps"]
    assert [n["node_id"] for n in r3["nodes"]] == [kept["node_id"]]
    # the server still remembers the wiped owner's last honest figures
    remembered = json.loads((out / "privacy-ledgers.json").read_text())["owners"]
    assert remembered[wiped]["dp-sgd"]["steps"] == steps


@pytest.mark.timeout(600)
def test_node_policy_refuses_a_weaker_run_before_reading_any_image(tiny_model, tmp_path):
    """`fedsd up --node-config "require-privacy='dp-sample'"` and a privacy=none run: every
    node answers with the rule, the server names it and counts it by rule in
    ``fedsd_server_node_refusals_total``, the run fails, and no node encoded (i.e. read) an
    image."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    from fedsd.fl.validation import NODE_REFUSALS
    from fedsd.observability.scrape import MetricsPorts

    shards, out = synthetic_shards(tmp_path, 2, 16), tmp_path / "out"
    base = free_port_block(MetricsPorts(0).node(2))
    argv = [sys.executable, "-m", "fedsd.cli", "up", "--local", "--nodes", "2"]
    argv += ["--rounds", "1", "--model", str(tiny_model), "--shards", str(shards)]
    argv += ["--out", str(out), "--run-config", "resolution=64 round-timeout=120.0"]
    argv += ["--node-config", "require-privacy='dp-sample'", "--metrics-port", str(base)]
    argv += ["--timeout", "400"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=env, timeout=500)
    said = res.stdout + res.stderr
    assert res.returncode != 0, said[-6000:]
    rule = "node privacy policy refuses this run: require-privacy=dp-sample: "
    assert f"{rule}the run's privacy=none lacks dp-sample" in said, said[-6000:]
    assert said.count("refused the run (require-privacy): ") == 2, said[-6000:]
    stop = "2 refused the run; 0 failed); the run stops without saving round 1"
    assert stop in said, said[-6000:]
    registry = CollectorRegistry()  # what the ServerApp's exporter served
    MultiProcessCollector(registry, path=str(out / ".deploy" / "metrics" / "metrics-serverapp"))
    refusals = {
        s.labels["reason"]: s.value
        for m in registry.collect()
        for s in m.samples
        if s.name == "fedsd_server_node_refusals_total"
    }
    assert refusals == {r: 2.0 if r == "require-privacy" else 0.0 for r in NODE_REFUSALS}, refusals
    caches = out / ".deploy" / "cache"
    assert len(list(caches.iterdir())) == 2
    assert not list(caches.rglob("latents-*")), list(caches.rglob("*"))
    assert not (out / "round-1").exists()
