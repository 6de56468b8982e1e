"""A hung SuperNode (alive, never replying) costs at most the round deadline.

Three SuperNodes over TLS, min-nodes=2, round-timeout=40 s. SuperNode 2 (with its child
processes) is frozen with SIGSTOP as round 1 starts and thawed with SIGCONT once round 1
has closed: round 1 closes at its deadline with two replies and the node counted failed,
round 2 samples it again and it trains.
"""

from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import pytest

from tests.conftest import node_configs, synthetic_shards
from tests.support.fault_runs import signal_tree

pytestmark = pytest.mark.e2e

# Below what the SuperLink needs to declare a frozen node offline (two missed heartbeats:
# 56 s in a run with 60 s), so that the round closes at its own deadline.
ROUND_TIMEOUT = 40.0


def test_hung_node_costs_at_most_the_round_deadline(tiny_model, tmp_path):
    from fedsd.deploy.local import LocalDeployment
    from fedsd.deploy.run_config import build_run_config, find_app_dir
    from fedsd.ml.model import load_adapter_arrays

    shards = synthetic_shards(tmp_path, 3, 16)
    configs = node_configs(shards, 3, tmp_path)
    frozen: list[int] = []
    times: dict[str, float] = {}
    lines: list[str] = []

    def stream(line: str) -> None:
        lines.append(line)
        if not frozen and "LoRA tensors" in line:  # the ServerApp's last line before round 1
            # the SuperNode and its processes: its ClientApps fork from the launcher it
            # shares with the other nodes, and a frozen node starts none
            roots = [dep.services["supernode-2"].pid]
            frozen.extend(signal_tree(roots, signal.SIGSTOP))
            times["stop"] = time.monotonic()
        elif frozen and "cont" not in times and "round 1/2:" in line:
            times["round1"] = time.monotonic()
            for pid in frozen:
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
            times["cont"] = time.monotonic()

    app = find_app_dir()
    out = tmp_path / "out"
    overrides, _ = build_run_config(
        app,
        {
            "model": str(tiny_model),
            "resolution": 64,
            "num-server-rounds": 2,
            "min-nodes": 2,
            "round-timeout": ROUND_TIMEOUT,
        },
        out=out,
    )
    try:
        with LocalDeployment(
            tmp_path / "deploy", 3, node_configs=configs, stream=stream, warm_apps=True
        ) as dep:
            dep.start()
            res = dep.submit(app, overrides, timeout=300)
    finally:
        for pid in frozen:  # never leave a stopped process behind, whatever failed
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    assert frozen, "round 1 never started"
    assert "cont" in times, "round 1 never completed:\n" + "\n".join(lines[-60:])
    assert res.exit_code == 0, "\n".join(lines[-60:])
    print(f"SIGSTOP to round 1 completed: {times['round1'] - times['stop']:.1f}s")

    r1, r2 = json.loads((out / "history.json").read_text())["rounds"]
    # Round 1 closed at its deadline with the two replies it had; the hung node failed.
    assert (r1["nodes_sampled"], r1["nodes_replied"], r1["nodes_failed"]) == (3, 2, 1)
    assert ROUND_TIMEOUT - 1 <= r1["seconds"] <= ROUND_TIMEOUT + 15, r1["seconds"]
    assert times["round1"] - times["stop"] <= ROUND_TIMEOUT + 20
    # Round 2 sampled the thawed node again and it replied.
    replied_1 = {n["node_id"] for n in r1["nodes"]}
    replied_2 = {n["node_id"] for n in r2["nodes"]}
    assert (r2["nodes_sampled"], r2["nodes_replied"], r2["nodes_failed"]) == (3, 3, 0)
    assert len(replied_2 - replied_1) == 1
    assert r2["seconds"] < ROUND_TIMEOUT
    for k in (1, 2):
        adapter = load_adapter_arrays(out / f"round-{k}")
        assert all(np.isfinite(v).all() for v in adapter.values())
