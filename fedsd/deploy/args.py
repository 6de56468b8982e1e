"""Arguments of ``fedsd up``.

Kept apart from ``fedsd.deploy.local`` and limited to argparse so that building the CLI parser
(``fedsd --help``) never imports cryptography, Flower or torch.
"""

from __future__ import annotations

import argparse


def add_up_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``fedsd up`` options to ``parser``."""
    parser.description = (
        "Run a federation. --local starts a TLS SuperLink with SuperNode authentication, a "
        "ServerApp SuperExec and N SuperNodes on 127.0.0.1, submits the app with "
        "`flwr run --stream`, relays its log and stops every process at the end."
    )
    parser.add_argument(
        "--local",
        action="store_true",
        help="run every Flower service on this machine (the only mode implemented so far)",
    )
    parser.add_argument("--nodes", type=int, default=2, help="number of SuperNodes (default 2)")
    parser.add_argument(
        "--rounds", type=int, default=None, help="num-server-rounds (default: the app's)"
    )
    parser.add_argument(
        "--model",
        default=None,
        help="hub id or local pipeline directory (default: the app's `model`)",
    )
    parser.add_argument(
        "--shards",
        default=None,
        help="directory with shard-0 .. shard-(N-1) written by `fedsd shards` (local mode)",
    )
    parser.add_argument("--out", required=True, help="run output directory (out-dir)")
    parser.add_argument(
        "--privacy",
        default=None,
        metavar="MODE",
        help="privacy mode: none, secagg, dp-sample, dp-output, dp-central, or a combination "
        "such as secagg+dp-sample (sets the `privacy` run-config key; its parameters go in "
        '--run-config, e.g. "dp-target-epsilon=8")',
    )
    parser.add_argument(
        "--run-config",
        action="append",
        default=[],
        metavar="'KEY=VALUE ...'",
        help="run-config overrides as TOML values, e.g. \"lora-rank=4 lora-variant='ffa'\" "
        "(repeatable)",
    )
    parser.add_argument(
        "--node-config",
        action="append",
        default=[],
        metavar="'KEY=VALUE ...'",
        help="node-config pairs for every SuperNode (local mode), e.g. the data owner's "
        "privacy policy \"max-epsilon=8 require-privacy='dp-sample'\" (repeatable)",
    )
    parser.add_argument(
        "--work-dir",
        default=None,
        help="certificates, SuperLink state, Flower home and service logs (default OUT/.deploy)",
    )
    parser.add_argument(
        "--port", type=int, default=None, help="SuperLink HTTPS port (default: a free port)"
    )
    parser.add_argument(
        "--app-dir",
        default=None,
        help="Flower app directory (pyproject.toml with [tool.flwr.app]); default: fedsd's",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=9400,
        metavar="BASE",
        help="Prometheus metrics on 127.0.0.1: the SuperLink exporter on BASE, the ServerApp "
        "on BASE+1, SuperNode i on BASE+10+i (default 9400); the Prometheus configuration "
        "that scrapes them is written to WORK_DIR/prometheus.yml",
    )
    parser.add_argument("--no-metrics", action="store_true", help="start no metrics exporters")
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="give up (and stop everything) after this many seconds (default: no limit)",
    )
    parser.add_argument(
        "--max-restarts",
        type=int,
        default=5,
        metavar="N",
        help="restart a SuperNode, the SuperLink, the SuperExec, a launcher or an exporter "
        "that dies up to N times each (backoff 2 s, doubling, at most 60 s); the run aborts "
        "when one dies once more (default 5; 0: the first death ends the run)",
    )
    parser.add_argument(
        "--max-resubmits",
        type=int,
        default=3,
        metavar="N",
        help="resubmit a run lost to a dead ServerApp or SuperLink up to N times; it resumes "
        "after the last saved round (default 3; a run the app failed is never resubmitted)",
    )
