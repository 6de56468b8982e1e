"""Observability (issue 5): the SuperLink exporter, the metrics port scheme, the Prometheus
configuration and alert rules, the Grafana dashboards, and a real Prometheus scraping a
real ``fedsd up --local`` run: those two tests live in test_e2e.py, next to the other
tests of that run (one deployment, one pytest-xdist worker). The progress view's tests
are in tests/unit/observability/test_progress.py.

Never skipped: without ``prometheus``/``promtool`` the tests that need them fail and say
how to install them (``bash docker/ci-observability.sh``).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

from fedsd.observability import dashboards
from fedsd.observability import scrape as observability
from scripts import monitoring

REPO = Path(__file__).resolve().parents[2]
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
    from fedsd.common.errors import DeployError
    from fedsd.deploy.local import LocalDeployment

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
    assert (PROM_DIR / "prometheus.yml").read_text() == monitoring.compose_config(), (
        "docker/prometheus/prometheus.yml is stale: python scripts/monitoring.py --write"
    )
    # Every generated file (compose, and the ConfigMaps of k8s/) is current.
    assert monitoring.main(["--check"]) == 0, capsys.readouterr().out
    assert monitoring.K8S_CONFIG.read_text() == monitoring.k8s_config()
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
        assert text == dashboards.render(build()), (
            f"{name} is stale: python scripts/monitoring.py --write"
        )
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

    from fedsd.observability.superlink_exporter import Snapshot, SuperLinkCollector

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
