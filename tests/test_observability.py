"""Observability (issue 5): the SuperLink exporter, the metrics port scheme, the progress
view, the Prometheus configuration and alert rules, the Grafana dashboards, and a real
Prometheus scraping a real ``fedsd up --local`` run: those two tests live in test_e2e.py,
next to the other tests of that run (one deployment, one pytest-xdist worker).

Never skipped: without ``prometheus``/``promtool`` the tests that need them fail and say
how to install them (``bash docker/ci-observability.sh``).
"""

from __future__ import annotations

import io
import json
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

from fedsd import dashboards, observability
from fedsd.progress import ProgressView

REPO = Path(__file__).resolve().parent.parent
PROM_DIR = REPO / "docker" / "prometheus"
GRAFANA_DIR = REPO / "docker" / "grafana"
HINT = "install Prometheus and promtool with: bash docker/ci-observability.sh (as root)"


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail(f"promtool not found; {HINT}")
    return found


def _alert_rules() -> list[dict]:
    groups = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


# --------------------------------------------------------------------------- static checks


def test_metrics_port_scheme():
    ports = observability.MetricsPorts(9400)
    assert (ports.superlink, ports.serverapp, ports.node(0), ports.node(3)) == (
        9400,
        9401,
        9410,
        9413,
    )
    assert ports.all(2) == [9400, 9401, 9410, 9411]
    names = [(t.job, t.instance, t.address) for t in observability.targets(2, "127.0.0.1", 100)]
    assert names == [
        ("superlink", "superlink", "127.0.0.1:100"),
        ("serverapp", "serverapp", "127.0.0.1:101"),
        ("supernode", "supernode-0", "127.0.0.1:110"),
        ("supernode", "supernode-1", "127.0.0.1:111"),
    ]


def test_fedsd_up_serves_metrics_by_default_and_refuses_busy_ports(tmp_path):
    from fedsd.cli import build_parser
    from fedsd.deploy import DeployError, LocalDeployment

    args = build_parser().parse_args(["up", "--local", "--out", "o"])
    assert args.metrics_port == observability.DEFAULT_BASE and not args.no_metrics
    assert build_parser().parse_args(["up", "--out", "o", "--no-metrics"]).no_metrics

    from tests.conftest import free_port_block

    base = free_port_block(12)
    dep = LocalDeployment(tmp_path, nodes=2, metrics_port=base, stream=lambda _: None)
    dep.check_metrics_ports()  # all free
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", base + 11))  # SuperNode 1's port
        busy.listen()
        with pytest.raises(DeployError, match=rf"{base + 11}.*--metrics-port BASE"):
            dep.check_metrics_ports()
    LocalDeployment(tmp_path, nodes=2, stream=lambda _: None).check_metrics_ports()  # off


def test_prometheus_config_is_generated_and_valid(capsys):
    assert (PROM_DIR / "prometheus.yml").read_text() == observability.compose_config(), (
        "docker/prometheus/prometheus.yml is stale: python -m fedsd.observability --write"
    )
    # Both generated files (compose, and the ConfigMaps of k8s/) are current.
    assert observability.main(["--check"]) == 0, capsys.readouterr().out
    assert observability.K8S_CONFIG.read_text() == observability.k8s_config()
    cfg = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j["static_configs"] for j in cfg["scrape_configs"]}
    assert set(jobs) == set(observability.JOBS)
    res = subprocess.run(
        [_promtool(), "check", "config", str(PROM_DIR / "prometheus.yml")],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout + res.stderr  # also checks alerts.yml
    res = subprocess.run(
        [_promtool(), "check", "rules", str(PROM_DIR / "alerts.yml")],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_alert_fires_in_promtool_unit_tests():
    """alerts.test.yml feeds made-up histories to the rules; each alert must be expected
    to fire in at least one case (and cases check that some do not)."""
    res = subprocess.run(
        [_promtool(), "test", "rules", "alerts.test.yml"],
        capture_output=True,
        text=True,
        cwd=PROM_DIR,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    cases = yaml.safe_load((PROM_DIR / "alerts.test.yml").read_text())["tests"]
    fired = {t["alertname"] for case in cases for t in case["alert_rule_test"] if t["exp_alerts"]}
    silent = {
        t["alertname"] for case in cases for t in case["alert_rule_test"] if not t["exp_alerts"]
    }
    names = {rule["alert"] for rule in _alert_rules()}
    assert names - fired == set(), "alerts never shown to fire"
    assert names - silent == set(), "alerts never shown to stay silent"


def test_dashboards_are_generated_and_use_the_provisioned_datasource():
    datasources = yaml.safe_load(
        (GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yaml").read_text()
    )["datasources"]
    assert [d["uid"] for d in datasources] == [dashboards.DATASOURCE_UID]
    assert datasources[0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load(
        (GRAFANA_DIR / "provisioning" / "dashboards" / "fedsd.yaml").read_text()
    )["providers"][0]
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert any(
        m["source"].endswith("docker/grafana/dashboards")
        and m["target"] == provider["options"]["path"]
        for m in mounts
    )

    uids = []
    for name, build in dashboards.DASHBOARDS.items():
        text = (GRAFANA_DIR / "dashboards" / name).read_text()
        assert text == dashboards.render(build()), f"{name} is stale: python -m fedsd.dashboards"
        board = json.loads(text)
        uids.append(board["uid"])
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), name
        for panel in board["panels"]:
            where = f"{name}: panel {panel['title']!r}"
            assert panel["datasource"]["uid"] == dashboards.DATASOURCE_UID, where
            assert panel["targets"], where
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == dashboards.DATASOURCE_UID, where
            pos = panel["gridPos"]
            assert pos["x"] + pos["w"] <= 24, where
        for var in board["templating"]["list"]:
            assert var["datasource"]["uid"] == dashboards.DATASOURCE_UID, name
    assert sorted(uids) == ["fedsd-fleet", "fedsd-training-health"]


def test_superlink_collector_serves_the_last_probe():
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from fedsd.superlink_exporter import Snapshot, SuperLinkCollector

    probes = iter(
        [
            Snapshot(
                up=True,
                nodes=[("11", "online"), ("12", "offline"), ("13", "unregistered")],
                runs=["running", "completed", "completed", "failed"],
                seconds=0.25,
                timestamp=1000.0,
            ),
            Snapshot(up=False, errors={"health": "connection refused"}, timestamp=2000.0),
        ]
    )
    collector = SuperLinkCollector(lambda: next(probes), interval=3600)
    registry = CollectorRegistry()
    registry.register(collector)

    def scrape() -> dict:
        text = generate_latest(registry).decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
        }

    collector.refresh()
    got = scrape()
    assert got[("fedsd_superlink_up", ())] == 1
    assert got[("fedsd_superlink_nodes", (("status", "online"),))] == 1
    assert got[("fedsd_superlink_nodes", (("status", "registered"),))] == 0
    assert got[("fedsd_superlink_node_online", (("node_id", "11"),))] == 1
    assert got[("fedsd_superlink_node_online", (("node_id", "12"),))] == 0
    assert ("fedsd_superlink_node_online", (("node_id", "13"),)) not in got  # unregistered
    assert got[("fedsd_superlink_runs", (("status", "completed"),))] == 2
    assert got[("fedsd_superlink_runs", (("status", "pending"),))] == 0
    assert got[("fedsd_superlink_scrape_seconds", ())] == 0.25
    collector.refresh()  # the SuperLink went away: no node or run series, not zeros
    got = scrape()
    assert got[("fedsd_superlink_up", ())] == 0
    assert got[("fedsd_superlink_scrape_errors_total", (("check", "health"),))] == 1
    assert not any(name in ("fedsd_superlink_nodes", "fedsd_superlink_runs") for name, _ in got)


# Lines as `fedsd up` relays them (the ServerApp's lines arrive twice: print and log).
RUN_LINES = [
    "fedsd up: started superlink (pid 1), log /x/superlink.log",
    "fedsd up: 2 SuperNode(s) online",
    "fedsd val_loss initial adapter (base model): 0.5000 (2 nodes)",
    "fedsd round 1/2: train_loss=0.4000 nodes=2/2 failed=0 time=10.5s epsilon=1.5",
    "INFO :      fedsd round 1/2: train_loss=0.4000 nodes=2/2 failed=0 time=10.5s epsilon=1.5",
    "fedsd privacy round 1: node 5 dp-sgd (cumulative): epsilon=1.5 delta=1e-05",
    "fedsd val_loss round 1: 0.4500 (2 nodes)",
    "fedsd round 2/2: train_loss=n/a nodes=1/2 failed=1 time=8.0s epsilon=2.25",
    "fedsd val_loss round 2: 0.4200 (2 nodes)",
    "fedsd done: adapter in /x/latest",
    "fedsd up: run 42 finished:completed in 30.0s",
]


def test_progress_view_prints_one_line_per_round_when_not_a_terminal():
    out = io.StringIO()
    now = [0.0]
    view = ProgressView(out, tty=False, total=2, budget=8.0, clock=lambda: now[0])
    for i, line in enumerate(RUN_LINES):
        now[0] = 10.0 * i  # line i arrives i*10 s after the start
        view(line)
    view.close()
    lines = out.getvalue().splitlines()
    relayed = [ln for ln in lines if not ln.startswith("fedsd progress: ")]
    assert relayed == RUN_LINES  # every line passes unchanged
    progress = [ln for ln in lines if ln.startswith("fedsd progress: ")]
    assert progress == [
        "fedsd progress: round 1/2 done | nodes 2/2 | train 0.4000 | val 0.5000 (base) "
        "| eps 1.5/8 | 10.5s/round | 0:30 elapsed",
        "fedsd progress: round 2/2 done | nodes 1/2 (1 failed) | val 0.4500 (r1) "
        "| eps 2.25/8 | 8.0s/round | 1:10 elapsed",
        "fedsd progress: round 2/2 (finished:completed) | nodes 1/2 (1 failed) "
        "| val 0.4200 (r2) | eps 2.25/8 | 8.0s/round | 1:40 elapsed",
    ]
    # the progress line follows the round line it summarises
    assert lines.index(progress[0]) == lines.index(RUN_LINES[3]) + 1


def test_progress_view_redraws_a_status_line_on_a_terminal():
    out = io.StringIO()
    view = ProgressView(out, tty=True, total=2, clock=lambda: 0.0)
    for line in RUN_LINES[:4]:
        view(line)
    view.close()
    text = out.getvalue()
    # each line: erase the status line, print the line, draw the status line again
    assert text.count("\r\033[K") == 5
    assert "\033[1mfedsd round 1/2" in text  # round lines in bold, as before
    screen = _terminal(text)
    assert screen[:4] == [re.sub(r"\033\[[0-9;]*m", "", ln) for ln in RUN_LINES[:4]]
    assert screen[4].startswith("round 1/2 done | nodes 2/2 | train 0.4000 | val 0.5000")
    assert len(screen) == 5  # the status line was redrawn in place, not repeated


def _terminal(text: str) -> list[str]:
    """What a terminal shows: apply carriage return + erase-line, drop colours."""
    text = re.sub(r"\033\[[0-9;]*m", "", text)
    screen, current = [], ""
    i = 0
    while i < len(text):
        if text.startswith("\r\033[K", i):
            current, i = "", i + 4
        elif text[i] == "\n":
            screen.append(current)
            current, i = "", i + 1
        else:
            current, i = current + text[i], i + 1
    if current:
        screen.append(current)
    return screen
