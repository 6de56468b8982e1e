"""Shared by the two privacy end-to-end modules: the modes with their settings, one
deployment that runs a list of modes, and the checks of each mechanism's records.

The ten modes are split over two deployments (``test_privacy_e2e_secagg.py`` and
``test_privacy_e2e_dp.py``) so that CI runs them side by side (pytest-xdist, one file per
worker): each deployment is a TLS SuperLink with node authentication, three SuperNodes, a
ServerApp SuperExec and ``flwr run``; tiny model, synthetic shards."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

NODES = 3
GAUSS_OUT = {"dp-output-clip": 0.05, "dp-output-epsilon": 2.0, "dp-output-delta": 1e-5}
LAPLACE_OUT = {
    "dp-output-mechanism": "laplace",
    "dp-output-clip": 5.0,
    "dp-output-epsilon": 4.0,
}
CENTRAL = {"dp-central-noise-multiplier": 0.8, "dp-central-clip": 0.05}
# Small max weight and clipping range: fine quantization, so the SecAgg+ aggregate can be
# compared with the plain one tightly (the updates of the tiny model are ~1e-3).
SECAGG = {"secagg-max-weight": 64.0, "secagg-clipping-range": 0.5}
# With output DP the noised update must fit too: clip 0.05 + 7.5 sigma (0.0997) = 0.80.
SECAGG_NOISY = {**SECAGG, "secagg-clipping-range": 1.0}
# mode: (rounds, run config). Two rounds wherever a check needs cumulative accounting
# (DP-SGD steps, output-DP composition, central-DP rounds); one where only the first
# round is checked (SecAgg+ rounds are the slow ones: four message stages each), or where
# another mode checks the composition (dp-output's is secagg+dp-output's too).
MODES: dict[str, tuple[int, dict[str, Any]]] = {
    "none": (2, {}),
    "secagg": (1, SECAGG),
    "dp-sample": (2, {"dp-target-epsilon": 8.0}),
    "dp-output": (2, GAUSS_OUT),
    "dp-central": (2, CENTRAL),
    "secagg+dp-sample": (2, {**SECAGG, "dp-noise-multiplier": 1.2}),
    "secagg+dp-output": (1, {**SECAGG_NOISY, **GAUSS_OUT}),
    "secagg+dp-central": (1, {**SECAGG, **CENTRAL}),
    # A fixed noise multiplier: dp-sample already plans one for a target epsilon (Opacus'
    # search, ~8 CPU-s on each node), and the ledger's figures are checked the same way.
    "dp-sample+dp-output": (2, {"dp-noise-multiplier": 1.0, **LAPLACE_OUT}),
    "secagg+dp-sample+dp-output": (
        1,
        {**SECAGG_NOISY, "dp-noise-multiplier": 1.2, **GAUSS_OUT},
    ),
}


def run_modes(modes: list[str], tiny_model: Path, root: Path) -> dict[str, tuple]:
    """One deployment; one run per mode, sequentially, each in its own OUT.
    Returns {mode: (RunResult, out dir, the lines streamed during that run)}."""
    from fedsd.deploy.local import LocalDeployment
    from fedsd.deploy.run_config import build_run_config, find_app_dir
    from tests.conftest import synthetic_shards

    shards = synthetic_shards(root, NODES, 30)
    configs = [
        {"partition-id": i, "shard-dir": str(shards / f"shard-{i}"), "cache-dir": str(root / "c")}
        for i in range(NODES)
    ]
    lines: list[str] = []
    app = find_app_dir()
    results = {}
    with LocalDeployment(
        root / "deploy", NODES, node_configs=configs, stream=lines.append, warm_apps=True
    ) as dep:
        dep.start()
        for mode in modes:
            rounds, extra = MODES[mode]
            out = root / "out" / mode.replace("+", "_")
            overrides, _ = build_run_config(
                app,
                {
                    "model": str(tiny_model),
                    "resolution": 64,
                    "learning-rate": 1e-3,
                    "num-server-rounds": rounds,
                    "min-nodes": NODES,
                    "round-timeout": 300.0,
                    "privacy": mode,
                    **extra,
                },
                out=out,
            )
            start = len(lines)
            res = dep.submit(app, overrides, timeout=600)
            results[mode] = (res, out, lines[start:])
    return results


def history(out: Path) -> dict:
    return json.loads((out / "history.json").read_text())


def records(round_record: dict, mechanism: str) -> list[dict]:
    return [p for p in round_record["privacy"] if p["mechanism"] == mechanism]


def check_completes(mode: str, result: tuple) -> None:
    """The run succeeded, every round had every node, the adapter is there, and the
    privacy report of the last round was printed."""
    res, out, lines = result
    rounds = MODES[mode][0]
    assert res.exit_code == 0, "\n".join(lines[-60:])
    hist = history(out)
    assert [r["round"] for r in hist["rounds"]] == list(range(1, rounds + 1))
    for r in hist["rounds"]:
        assert r["nodes_sampled"] == NODES and r["nodes_replied"] == NODES
        assert math.isfinite(r["val_loss"])
    assert (out / "latest" / "pytorch_lora_weights.safetensors").is_file()
    if mode != "none":
        assert any(f"fedsd privacy round {rounds}:" in line for line in lines)


def check_dp_sgd_epsilon(out: Path) -> None:
    """Cumulative over the rounds, and equal to a fresh Opacus accountant's."""
    from opacus.accountants import RDPAccountant

    hist = history(out)
    per_node: dict[int, list[dict]] = {}
    for r in hist["rounds"]:
        for rec in records(r, "dp-sgd"):
            per_node.setdefault(rec["node_id"], []).append(rec)
    assert len(per_node) == NODES
    for recs in per_node.values():
        first, last = recs
        assert last["steps"] == 2 * first["steps"] > 0  # cumulative over the rounds
        assert last["epsilon"] > first["epsilon"] > 0
        acc = RDPAccountant()
        acc.history = [(last["noise_multiplier"], last["sample_rate"], last["steps"])]
        independent = acc.get_epsilon(delta=last["delta"])
        assert last["epsilon"] == pytest.approx(independent, rel=0.01)
        target = last["extra"]["target_epsilon"]
        if target:
            assert last["epsilon"] <= target  # sigma was planned for the whole run


def check_output_gaussian(out: Path, rounds: int) -> None:
    """Sigma from the analytic Gaussian mechanism; epsilon composed over the rounds."""
    from fedsd.privacy import compose_rounds, gaussian_sigma

    hist = history(out)
    recs = [rec for r in hist["rounds"] for rec in records(r, "output-gaussian")]
    assert len(recs) == NODES * rounds
    sigma = gaussian_sigma(GAUSS_OUT["dp-output-clip"], 2.0, 1e-5)
    for rec in recs:
        assert rec["extra"]["sigma"] == pytest.approx(sigma)
        assert rec["noise_multiplier"] == pytest.approx(sigma / GAUSS_OUT["dp-output-clip"])
        want = compose_rounds("gaussian", 2.0, 1e-5, rec["steps"], rec["noise_multiplier"])
        assert rec["epsilon"] == pytest.approx(want.epsilon)
    assert {rec["steps"] for rec in recs} == set(range(1, rounds + 1))


def check_central(out: Path) -> None:
    """Server noise std z*C/m over the m aggregated updates; RDP epsilon per round."""
    from fedsd.privacy import central_dp_epsilon

    hist = history(out)
    for i, r in enumerate(hist["rounds"], start=1):
        (rec,) = records(r, "central-gaussian")
        z, clip = CENTRAL["dp-central-noise-multiplier"], CENTRAL["dp-central-clip"]
        assert rec["extra"]["std"] == pytest.approx(z * clip / NODES)
        assert rec["steps"] == i
        assert rec["epsilon"] == pytest.approx(central_dp_epsilon(z, 1.0, i, 1e-5))
        assert all(n["num-examples"] == 1 for n in r["nodes"])  # unweighted mean
        assert len(records(r, "central-clip")) == NODES
