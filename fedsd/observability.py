"""Where fedsd's metrics are served, and the Prometheus scrape configuration that finds them.

One port scheme for every deployment (``fedsd up --local``, compose, the CI override):

    BASE        the SuperLink exporter (``fedsd superlink-exporter``)
    BASE + 1    the ServerApp exporter (``fedsd metrics-exporter`` next to the SuperExec)
    BASE + 10+i SuperNode i's exporter (``fedsd metrics-exporter`` next to the SuperNode)

with ``BASE = 9400`` by default. The scrape configuration has three jobs (``superlink``,
``serverapp``, ``supernode``) and names each target by its service (``instance``
``supernode-0``, ...), so dashboards and alerts read the same in every deployment.
``docker/prometheus/prometheus.yml`` is :func:`prometheus_config` of
:func:`compose_targets`; ``fedsd up --local`` writes one for its own ports next to its
logs; the test builds one for its free ports from the same function, so none of them can
drift. On Kubernetes (``k8s/``) the SuperLink and ServerApp exporters keep their compose
names and ports (Services ``superlink-exporter`` and ``serverapp``), and the SuperNodes,
one pod each on port 9400, are found through the SRV records of their headless Service:
``k8s/70-monitoring-config.yaml`` holds that configuration, the alert rules and Grafana's
provisioning and dashboards from ``docker/`` as ConfigMaps. ``python -m fedsd.observability
--write`` writes both generated files, ``--check`` says whether they are up to date.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_BASE = 9400
SERVERAPP_OFFSET = 1
NODE_OFFSET = 10
JOBS = ("superlink", "serverapp", "supernode")
REPO = Path(__file__).resolve().parent.parent
COMPOSE_CONFIG = REPO / "docker" / "prometheus" / "prometheus.yml"
ALERTS = REPO / "docker" / "prometheus" / "alerts.yml"
GRAFANA = REPO / "docker" / "grafana"
K8S_CONFIG = REPO / "k8s" / "70-monitoring-config.yaml"
K8S_NAMESPACE = "fedsd"


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
    ``discovered`` finds, one job per kind."""
    lines = [f"# {ln}".rstrip() for ln in header.strip().splitlines()] if header else []
    lines += [
        "global:",
        f"  scrape_interval: {scrape_interval}",
        f"  evaluation_interval: {scrape_interval}",
    ]
    if rule_files:
        lines.append("rule_files:")
        lines += [f"  - {_quote(f)}" for f in rule_files]
    lines.append("scrape_configs:")
    for job in JOBS:
        mine = [t for t in scrape_targets if t.job == job]
        srv = [d for d in discovered if d.job == job]
        if mine and srv:
            raise ValueError(f"job {job}: static targets and SRV discovery at once")
        if mine:
            lines += [f"  - job_name: {job}", "    static_configs:"]
            for t in mine:
                lines += [
                    f"      - targets: [{_quote(t.address)}]",
                    f"        labels: {{instance: {_quote(t.instance)}}}",
                ]
        elif srv:
            lines += [f"  - job_name: {job}", "    dns_sd_configs:"]
            for d in srv:
                lines += [
                    f"      - names: [{_quote(d.name)}]",
                    "        type: SRV",
                    f"        refresh_interval: {d.refresh_interval}",
                ]
            lines += [
                "    relabel_configs:  # instance: the pod name, the SRV target's first label",
                "      - source_labels: [__meta_dns_srv_record_target]",
                "        regex: '([^.]+)\\..*'",
                "        target_label: instance",
            ]
    return "\n".join(lines) + "\n"


def compose_config(nodes: int = 2) -> str:
    """The text of ``docker/prometheus/prometheus.yml``."""
    header = (
        "Generated by `python -m fedsd.observability --write` (fedsd/observability.py):\n"
        "edit the generator, not this file. The compose Prometheus scrapes the SuperLink\n"
        f"exporter, the ServerApp and {nodes} SuperNodes (N nodes: --nodes N).\n"
        "Ports: SuperLink exporter 9400, ServerApp 9401, SuperNode i 9410+i."
    )
    return prometheus_config(compose_targets(nodes), rule_files=("alerts.yml",), header=header)


def k8s_prometheus_config() -> str:
    """The Prometheus configuration of ``k8s/``: the exporters' Services by name, the
    SuperNodes by the SRV records of the headless Service ``supernode``."""
    header = (
        "Generated by `python -m fedsd.observability --write` (fedsd/observability.py).\n"
        "Services superlink-exporter:9400 and serverapp:9401 (the ServerApp pod), and\n"
        "every pod of the headless Service supernode (port metrics, 9400), found by DNS."
    )
    return prometheus_config(
        targets(0),
        discovered=[SrvDiscovery("supernode", "_metrics._tcp.supernode")],
        header=header,
    )


def k8s_configmaps() -> dict[str, dict[str, str]]:
    """ConfigMap name -> {key: file text}: what the k8s Prometheus and Grafana mount.
    Grafana's provisioning files are the compose ones, unchanged (the Service
    ``prometheus`` answers at the same URL)."""
    boards = sorted((GRAFANA / "dashboards").glob("*.json"))
    return {
        "prometheus-config": {
            "prometheus.yml": k8s_prometheus_config(),
            "alerts.yml": ALERTS.read_text(encoding="utf-8"),
        },
        "grafana-provisioning": {
            "datasources.yaml": (
                GRAFANA / "provisioning" / "datasources" / "prometheus.yaml"
            ).read_text(encoding="utf-8"),
            "dashboards.yaml": (GRAFANA / "provisioning" / "dashboards" / "fedsd.yaml").read_text(
                encoding="utf-8"
            ),
        },
        "grafana-dashboards": {p.name: p.read_text(encoding="utf-8") for p in boards},
    }


def k8s_config() -> str:
    """The text of ``k8s/70-monitoring-config.yaml``: one ConfigMap per mounted folder."""
    header = [
        "# Generated by `python -m fedsd.observability --write` (fedsd/observability.py) from",
        "# docker/prometheus/ and docker/grafana/: edit those (or the generator), not this",
        "# file. Mounted by 71-prometheus.yaml and 72-grafana.yaml.",
    ]
    docs = []
    for name, files in k8s_configmaps().items():
        lines = [
            "apiVersion: v1",
            "kind: ConfigMap",
            "metadata:",
            f"  name: {name}",
            f"  namespace: {K8S_NAMESPACE}",
            "  labels:",
            f"    app.kubernetes.io/name: {name.split('-')[0]}",
            "    app.kubernetes.io/instance: fedsd",
            "    app.kubernetes.io/part-of: fedsd",
            "data:",
        ]
        for key, text in files.items():
            lines.append(f"  {key}: |")
            lines += [f"    {line}" if line else "" for line in _literal_lines(key, text)]
        docs.append("\n".join(lines) + "\n")
    return "\n".join(header) + "\n" + "---\n".join(docs)


def _literal_lines(key: str, text: str) -> list[str]:
    """``text`` as the lines of a YAML literal block (``|``), which must read back equal."""
    if not text.endswith("\n") or text.endswith("\n\n") or text[:1].isspace():
        raise ValueError(f"{key}: not representable as a plain literal block")
    if "\t" in text or "\r" in text or any(ln != ln.rstrip() for ln in text.splitlines()):
        raise ValueError(f"{key}: tabs, carriage returns or trailing spaces")
    return text.splitlines()


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def main(argv: list[str] | None = None) -> int:
    """Write or check ``docker/prometheus/prometheus.yml`` and
    ``k8s/70-monitoring-config.yaml`` (without an option: print the compose file)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--nodes", type=int, default=2)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", action="store_true", help="write the files")
    group.add_argument("--check", action="store_true", help="exit 1 if a file differs")
    args = parser.parse_args(argv)
    files = {COMPOSE_CONFIG: compose_config(args.nodes), K8S_CONFIG: k8s_config()}
    if not (args.write or args.check):
        sys.stdout.write(files[COMPOSE_CONFIG])
        return 0
    stale = []
    for path, text in files.items():
        if args.write:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
        elif not path.is_file() or path.read_text(encoding="utf-8") != text:
            stale.append(str(path.relative_to(REPO)))
    if stale:
        print(f"out of date: {', '.join(stale)}; run python -m fedsd.observability --write")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
