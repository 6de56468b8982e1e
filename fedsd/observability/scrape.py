"""Where fedsd's metrics are served, and the Prometheus scrape configuration that finds them.

One port scheme for every deployment (``fedsd up --local``, compose, the CI override):

    BASE        the SuperLink exporter (``fedsd superlink-exporter``)
    BASE + 1    the ServerApp exporter (``fedsd metrics-exporter`` next to the SuperExec)
    BASE + 10+i SuperNode i's exporter (``fedsd metrics-exporter`` next to the SuperNode)

with ``BASE = 9400`` by default. The scrape configuration has three jobs (``superlink``,
``serverapp``, ``supernode``) and names each target by its service (``instance``
``supernode-0``, ...), so dashboards and alerts read the same in every deployment.
``fedsd up --local`` writes :func:`prometheus_config` for its own ports next to its logs,
with the alert rules :data:`ALERTS` (package data); the test builds one for its free ports
from the same function, and ``scripts/monitoring.py`` writes the repository's copies
(``docker/prometheus/``, ``k8s/70-monitoring-config.yaml``) with it, so none of them can
drift. YAML is written by fedsd.common.yaml_dump (PyYAML's safe dumper).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsd.common.yaml_dump import Flow, Quoted, comment, dump_yaml

DEFAULT_BASE = 9400
SERVERAPP_OFFSET = 1
NODE_OFFSET = 10
JOBS = ("superlink", "serverapp", "supernode")
# fedsd's alert rules, shipped with the package (compose and k8s/ get copies of it).
ALERTS = Path(__file__).with_name("alerts.yml")


@dataclass(frozen=True)
class MetricsPorts:
    """The exporter ports of one deployment, from its base port."""

    base: int = DEFAULT_BASE

    @property
    def superlink(self) -> int:
        """Port of the SuperLink exporter."""
        return self.base

    @property
    def serverapp(self) -> int:
        """Port of the ServerApp exporter."""
        return self.base + SERVERAPP_OFFSET

    def node(self, index: int) -> int:
        """Port of SuperNode ``index``'s exporter."""
        return self.base + NODE_OFFSET + index

    def all(self, nodes: int) -> list[int]:
        """Every port a deployment with ``nodes`` SuperNodes uses."""
        return [self.superlink, self.serverapp] + [self.node(i) for i in range(nodes)]


@dataclass(frozen=True)
class Target:
    """One scrape target: its job, the service name shown as ``instance``, host:port."""

    job: str
    instance: str
    address: str


def targets(nodes: int, host: str | None = None, base: int = DEFAULT_BASE) -> list[Target]:
    """The targets of a deployment: every service on ``host`` (``fedsd up --local``), or,
    with ``host=None``, each on its compose service name (the SuperLink exporter runs as
    the ``superlink-exporter`` service)."""
    ports = MetricsPorts(base)

    def at(service: str, port: int) -> str:
        return f"{host or service}:{port}"

    out = [
        Target("superlink", "superlink", at("superlink-exporter", ports.superlink)),
        Target("serverapp", "serverapp", at("serverapp", ports.serverapp)),
    ]
    for i in range(nodes):
        out.append(Target("supernode", f"supernode-{i}", at(f"supernode-{i}", ports.node(i))))
    return out


def compose_targets(nodes: int = 2) -> list[Target]:
    """The targets of ``compose.yaml`` (two SuperNodes unless ``compose_nodes.py`` adds more)."""
    return targets(nodes)


@dataclass(frozen=True)
class SrvDiscovery:
    """Targets of one job from DNS SRV records, e.g. ``_metrics._tcp.supernode``: the named
    port ``metrics`` of the headless Service ``supernode``, one record per pod, whose target
    ``supernode-0.supernode.<namespace>.svc.<domain>`` gives the ``instance`` label
    (``supernode-0``). The name is relative, so the resolver's search path finds the
    Service in Prometheus' own namespace, whatever that is called."""

    job: str
    name: str
    refresh_interval: str = "30s"


def prometheus_config(
    scrape_targets: Sequence[Target],
    *,
    discovered: Sequence[SrvDiscovery] = (),
    scrape_interval: str = "15s",
    rule_files: Sequence[str] = ("alerts.yml",),
    header: str = "",
) -> str:
    """A Prometheus configuration (YAML) scraping ``scrape_targets`` and the targets that
    ``discovered`` finds, one job per kind; ``header`` becomes its leading comment."""
    config: dict[str, Any] = {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval}
    }
    if rule_files:
        config["rule_files"] = [Quoted(f) for f in rule_files]
    jobs: list[dict[str, Any]] = []
    for job in JOBS:
        mine = [t for t in scrape_targets if t.job == job]
        srv = [d for d in discovered if d.job == job]
        if mine and srv:
            raise ValueError(f"job {job}: static targets and SRV discovery at once")
        if mine:
            static = [
                {
                    "targets": Flow([Quoted(t.address)]),
                    "labels": Flow({"instance": Quoted(t.instance)}),
                }
                for t in mine
            ]
            jobs.append({"job_name": job, "static_configs": static})
        elif srv:
            sd = [
                {
                    "names": Flow([Quoted(d.name)]),
                    "type": "SRV",
                    "refresh_interval": d.refresh_interval,
                }
                for d in srv
            ]
            # instance: the pod name, the SRV target's first label
            relabel = {
                "source_labels": Flow(["__meta_dns_srv_record_target"]),
                "regex": r"([^.]+)\..*",
                "target_label": "instance",
            }
            jobs.append({"job_name": job, "dns_sd_configs": sd, "relabel_configs": [relabel]})
    config["scrape_configs"] = jobs
    return comment(header) + dump_yaml(config)
