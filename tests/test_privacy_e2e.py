"""Every privacy mode end to end over one real Flower deployment: a TLS SuperLink with
node authentication, three SuperNodes, a ServerApp SuperExec, ``flwr run``; tiny model,
synthetic shards, two rounds per mode. The runs share the deployment (each in its own
OUT); their histories are then checked against independent computations."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from fedsd.privacy import ALLOWED_MODES

pytestmark = pytest.mark.e2e

NODES = 3
ROUNDS = 2
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
MODES = {
    "none": {},
    "secagg": SECAGG,
    "dp-sample": {"dp-target-epsilon": 8.0},
    "dp-output": GAUSS_OUT,
    "dp-central": CENTRAL,
    "secagg+dp-sample": {**SECAGG, "dp-noise-multiplier": 1.2},
    "secagg+dp-output": {**SECAGG_NOISY, **GAUSS_OUT},
    "secagg+dp-central": {**SECAGG, **CENTRAL},
    "dp-sample+dp-output": {"dp-target-epsilon": 8.0, **LAPLACE_OUT},
    "secagg+dp-sample+dp-output": {**SECAGG_NOISY, "dp-noise-multiplier": 1.2, **GAUSS_OUT},
}


def test_every_allowed_mode_is_exercised():
    assert sorted(MODES) == sorted(ALLOWED_MODES)


@pytest.fixture(scope="module")
def federation(tiny_model, tmp_path_factory):
    """One deployment; one run per mode, sequentially."""
    from fedsd.deploy import LocalDeployment, build_run_config, find_app_dir

    root = tmp_path_factory.mktemp("privacy-e2e")
    shards = root / "shards"
    subprocess.run(
        [sys.executable, "-m", "fedsd.cli", "shards", "--source", "synthetic"]
        + ["--num-shards", str(NODES), "--synthetic-images", "30", "--out", str(shards)],
        check=True,
    )
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
        for mode, extra in MODES.items():
            out = root / "out" / mode.replace("+", "_")
            overrides, _ = build_run_config(
                app,
                {
                    "model": str(tiny_model),
                    "resolution": 64,
                    "learning-rate": 1e-3,
                    "num-server-rounds": ROUNDS,
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
    return results, shards


def _history(out):
    return json.loads((out / "history.json").read_text())


def _records(round_record, mechanism):
    return [p for p in round_record["privacy"] if p["mechanism"] == mechanism]


@pytest.mark.parametrize("mode", list(MODES))
def test_mode_completes_two_rounds_with_every_node(federation, mode):
    results, _ = federation
    res, out, lines = results[mode]
    assert res.exit_code == 0, "\n".join(lines[-60:])
    hist = _history(out)
    assert [r["round"] for r in hist["rounds"]] == [1, 2]
    for r in hist["rounds"]:
        assert r["nodes_sampled"] == NODES and r["nodes_replied"] == NODES
        assert math.isfinite(r["val_loss"])
    assert (out / "latest" / "pytorch_lora_weights.safetensors").is_file()
    # The report is on the terminal too, one line per record.
    if mode != "none":
        assert any(f"fedsd privacy round {ROUNDS}:" in line for line in lines)


def test_secagg_aggregate_equals_plain_weighted_mean_within_quantization(federation):
    """Same seeds, same data: the nodes' updates are identical in both runs, so the SecAgg+
    aggregate must equal the plain weighted mean up to SecAgg+'s quantization error."""
    from fedsd.model import load_adapter_arrays

    results, _ = federation
    plain = load_adapter_arrays(results["none"][1] / "round-1")
    secure = load_adapter_arrays(results["secagg"][1] / "round-1")
    hist = _history(results["secagg"][1])
    (rec,) = _records(hist["rounds"][0], "secagg+")
    bound = rec["extra"]["max_quantization_error"]
    assert rec["extra"]["aggregated_nodes"] == NODES
    # Weighted by images: each node's weight is the images it trained on.
    assert sorted(n["num-examples"] for n in hist["rounds"][0]["nodes"]) == sorted(
        n["num-examples"] for n in _history(results["none"][1])["rounds"][0]["nodes"]
    )
    diff = max(float(np.abs(plain[k] - secure[k]).max()) for k in plain)
    init = load_adapter_arrays(results["none"][1] / "round-2")  # any other adapter
    moved = max(float(np.abs(plain[k] - init[k]).max()) for k in plain)
    assert diff <= bound + 1e-7, (diff, bound)
    assert bound < moved / 10  # the check is tight relative to what training changes


def test_dp_sgd_epsilon_is_cumulative_and_matches_opacus(federation):
    from opacus.accountants import RDPAccountant

    results, _ = federation
    for mode in ("dp-sample", "secagg+dp-sample", "dp-sample+dp-output"):
        hist = _history(results[mode][1])
        per_node = {}
        for r in hist["rounds"]:
            for rec in _records(r, "dp-sgd"):
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


def test_output_dp_reports_calibrated_noise_and_composition(federation):
    from fedsd.privacy import compose_rounds, gaussian_sigma

    results, _ = federation
    for mode in ("dp-output", "secagg+dp-output"):
        hist = _history(results[mode][1])
        recs = [rec for r in hist["rounds"] for rec in _records(r, "output-gaussian")]
        assert len(recs) == NODES * ROUNDS
        sigma = gaussian_sigma(GAUSS_OUT["dp-output-clip"], 2.0, 1e-5)
        for rec in recs:
            assert rec["extra"]["sigma"] == pytest.approx(sigma)
            assert rec["noise_multiplier"] == pytest.approx(sigma / GAUSS_OUT["dp-output-clip"])
            want = compose_rounds("gaussian", 2.0, 1e-5, rec["steps"], rec["noise_multiplier"])
            assert rec["epsilon"] == pytest.approx(want.epsilon)
        assert {rec["steps"] for rec in recs} == {1, 2}
    hist = _history(results["dp-sample+dp-output"][1])
    lap = [rec for r in hist["rounds"] for rec in _records(r, "output-laplace")]
    assert sorted(rec["epsilon"] for rec in lap) == [4.0] * NODES + [8.0] * NODES  # basic


def test_central_dp_noise_and_epsilon(federation):
    from fedsd.privacy import central_dp_epsilon

    results, _ = federation
    for mode in ("dp-central", "secagg+dp-central"):
        hist = _history(results[mode][1])
        for i, r in enumerate(hist["rounds"], start=1):
            (rec,) = _records(r, "central-gaussian")
            z, clip = CENTRAL["dp-central-noise-multiplier"], CENTRAL["dp-central-clip"]
            assert rec["extra"]["std"] == pytest.approx(z * clip / NODES)
            assert rec["steps"] == i
            assert rec["epsilon"] == pytest.approx(central_dp_epsilon(z, 1.0, i, 1e-5))
            assert all(n["num-examples"] == 1 for n in r["nodes"])  # unweighted mean
            assert len(_records(r, "central-clip")) == NODES


def test_privacy_report_command(federation):
    results, _ = federation
    out = results["secagg+dp-sample+dp-output"][1]
    proc = subprocess.run(
        [sys.executable, "-m", "fedsd.cli", "privacy-report", str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "secagg+dp-sample+dp-output" in proc.stdout
    assert proc.stdout.count("dp-sgd") >= NODES * ROUNDS
    assert "output-gaussian" in proc.stdout and "secagg+" in proc.stdout
    data = json.loads(
        subprocess.run(
            [sys.executable, "-m", "fedsd.cli", "privacy-report", str(out), "--json"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert len(data["records"]) == sum(len(r["privacy"]) for r in _history(out)["rounds"])
