"""SecAgg+ survives a node killed mid-round: three SuperNodes over TLS, shares 3 and
threshold 2; one SuperNode is killed (SIGKILL) as the masked-vector stage starts."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest

from tests.conftest import node_configs, synthetic_shards

pytestmark = pytest.mark.e2e


def test_round_completes_without_the_killed_node(tiny_model, tmp_path):
    from fedsd.deploy import LocalDeployment, build_run_config, find_app_dir
    from fedsd.model import load_adapter_arrays

    shards = synthetic_shards(tmp_path, 3, 24)
    configs = node_configs(shards, 3, tmp_path)
    killed: list[int] = []
    lines: list[str] = []

    def stream(line: str) -> None:
        lines.append(line)
        if not killed and "round 1: secagg collect-masked-vectors: sent to 3 nodes" in line:
            svc = dep.services.pop("supernode-2")  # not a failure of the deployment
            os.kill(svc.pid, signal.SIGKILL)
            killed.append(svc.pid)

    app = find_app_dir()
    out = tmp_path / "out"
    overrides, _ = build_run_config(
        app,
        {
            "model": str(tiny_model),
            "resolution": 64,
            "num-server-rounds": 1,
            "min-nodes": 2,
            "round-timeout": 25.0,
            "privacy": "secagg",
            "secagg-num-shares": 3,
            "secagg-reconstruction-threshold": 2,
        },
        out=out,
    )
    with LocalDeployment(
        tmp_path / "deploy", 3, node_configs=configs, stream=stream, warm_apps=True
    ) as dep:
        dep.start()
        res = dep.submit(app, overrides, timeout=400)
    assert killed, "the masked-vector stage was never announced:\n" + "\n".join(lines[-60:])
    assert res.exit_code == 0, "\n".join(lines[-60:])
    (r,) = json.loads((out / "history.json").read_text())["rounds"]
    assert r["nodes_sampled"] == 3 and r["nodes_replied"] == 2 and r["nodes_failed"] == 1
    (rec,) = [p for p in r["privacy"] if p["mechanism"] == "secagg+"]
    assert rec["extra"]["aggregated_nodes"] == 2 and rec["extra"]["dropouts_tolerated"] == 1
    adapter = load_adapter_arrays(out / "round-1")
    assert all(np.isfinite(v).all() for v in adapter.values())
    assert any(np.abs(v).max() > 0 for k, v in adapter.items() if ".lora_B." in k)
