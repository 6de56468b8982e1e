"""The ``fedsd`` command line: one entry point, one sub-command per job.

Each sub-command imports its heavy dependencies only when it runs, so ``fedsd --help``
and the light sub-commands stay fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _cmd_tiny_model(args: argparse.Namespace) -> int:
    from fedsd.ml.model import write_tiny_pipeline
    from fedsd.quality.extractors import MODEL_SUBDIR, write_tiny_extractors

    path = write_tiny_pipeline(args.out, seed=args.seed)
    print(f"wrote a tiny RANDOM pipeline to {path}: NOT a real model, for smoke runs and tests")
    extractors = write_tiny_extractors(path / MODEL_SUBDIR, seed=args.seed)
    print(
        f"wrote tiny RANDOM feature extractors to {extractors}: NOT real metrics (FID/CLIP "
        "figures of a run on this model measure nothing)"
    )
    return 0


def _cmd_fetch_extractors(args: argparse.Namespace) -> int:
    from fedsd.quality.extractors import CLIP_MODEL, default_dir, fetch_extractors

    out = fetch_extractors(args.out or default_dir(), clip_model=args.clip_model or CLIP_MODEL)
    print(f"wrote the Inception and CLIP feature extractors to {out}")
    return 0


def _cmd_shards(args: argparse.Namespace) -> int:
    from fedsd.ml.data import write_shards

    manifest = write_shards(
        source=args.source,
        num_shards=args.num_shards,
        partitioner=args.partitioner,
        alpha=args.alpha,
        val_fraction=args.val_fraction,
        seed=args.seed,
        out=args.out,
        image_size=args.image_size,
        synthetic_images=args.synthetic_images,
    )
    for shard in manifest["shards"]:
        print(
            f"{shard['name']}: train={shard['train']['images']} val={shard['val']['images']}"
            f" skipped={shard['train']['skipped'] + shard['val']['skipped']}"
        )
    print(f"manifest: {args.out}/manifest.json")
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    from fedsd.deploy.up import run_local_from_args

    return run_local_from_args(args)


def _cmd_generate(args: argparse.Namespace) -> int:
    from fedsd.ml.generate import generate_grid

    path = generate_grid(
        model=args.model,
        adapter=args.adapter,
        prompts=args.prompt,
        seeds=args.seed,
        out=args.out,
        steps=args.steps,
        resolution=args.resolution,
        guidance_scale=args.guidance_scale,
    )
    print(f"wrote {path}")
    return 0


def _cmd_certs(args: argparse.Namespace) -> int:
    from fedsd.deploy.certs import ensure_certs

    material = ensure_certs(args.out, hosts=args.host, nodes=args.nodes)
    print(f"CA: {material.ca_cert}\nSuperLink certificate: {material.server_cert}")
    for key in material.node_keys:
        print(f"node key: {key.private_key} (public: {key.public_key})")
    print(f"SuperExec auth secret: {material.superexec_secret}")
    return 0


def _cmd_app_launcher(args: argparse.Namespace) -> int:
    from fedsd.deploy.warmstart import DEFAULT_PRELOAD, serve

    serve(args.socket, args.preload or DEFAULT_PRELOAD)
    return 0


def _cmd_app_hash(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fedsd.deploy.pinning import AppRefused, fab_hash_of, has_flwr_app, source_app_dir

    app = Path(args.app_dir).resolve() if args.app_dir else source_app_dir()
    if app is None or not has_flwr_app(app / "pyproject.toml"):
        where = app or "this fedsd installation (no source tree)"
        print(f"fedsd app-hash: error: no Flower app in {where}", file=sys.stderr)
        return 2
    try:
        print(f"{fab_hash_of(app)}  {app}")
    except AppRefused as exc:
        print(f"fedsd app-hash: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _cmd_privacy_report(args: argparse.Namespace) -> int:
    import json

    from fedsd.privacy.report import format_report, load_report

    report = load_report(args.out)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    import json

    from fedsd.quality.report import format_quality_report, load_quality_report

    report = load_quality_report(args.out)
    print(json.dumps(report, indent=2) if args.json else format_quality_report(report))
    return 0


def _cmd_metrics_exporter(args: argparse.Namespace) -> int:
    from fedsd.observability.metrics import serve_exporter

    serve_exporter(args.port, args.multiproc_dir, args.host)
    return 0


def _cmd_superlink_exporter(args: argparse.Namespace) -> int:
    from fedsd.observability.superlink_exporter import serve

    serve(
        args.port,
        args.host,
        connection=args.connection,
        flwr_home=args.flwr_home,
        address=args.address,
        root_certificates=args.root_certificates,
        interval=args.interval,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(
        prog="fedsd", description="Federated LoRA fine-tuning of diffusion models on Flower."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "tiny-model", help="write a tiny random diffusers pipeline (not a real model)"
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_tiny_model)

    p = sub.add_parser(
        "fetch-extractors",
        help="download the feature extractors of the quality figures (Inception, CLIP)",
        description="Download NVIDIA's FID Inception (TorchScript) and a CLIP model from the "
        "hub into one directory, which a node finds in its cache directory (the default "
        "here) or through its node config quality-extractors=DIR (docs/quality.md).",
    )
    p.add_argument("--out", default=None, help="directory (default: ~/.cache/fedsd/...)")
    p.add_argument("--clip-model", default=None, help="hub id of the CLIP model")
    p.set_defaults(func=_cmd_fetch_extractors)

    p = sub.add_parser("shards", help="partition a dataset into per-node shards")
    p.add_argument(
        "--source",
        default="nkirschi/oxford-flowers",
        help="hub dataset id, a local image folder, or 'synthetic'",
    )
    p.add_argument("--num-shards", type=int, required=True)
    p.add_argument("--partitioner", choices=["iid", "dirichlet"], default="iid")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--image-size", type=int, default=None, help="resize images (square) on write")
    p.add_argument(
        "--synthetic-images", type=int, default=64, help="images in the synthetic source"
    )
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_shards)

    p = sub.add_parser("up", help="run a federation")
    from fedsd.deploy.args import add_up_arguments

    add_up_arguments(p)
    p.set_defaults(func=_cmd_up)

    p = sub.add_parser("generate", help="base vs adapted images from the same seeds")
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", default=None, help="LoRA adapter directory (e.g. OUT/latest)")
    p.add_argument("--prompt", action="append", required=True, help="repeatable")
    p.add_argument("--seed", type=int, action="append", default=None, help="repeatable")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--out", required=True, help="output PNG")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser(
        "certs", help="create the CA, SuperLink certificate, node keys, SuperExec secret"
    )
    p.add_argument("--out", required=True)
    p.add_argument("--host", action="append", default=[], help="extra SAN (repeatable)")
    p.add_argument("--nodes", type=int, default=2)
    p.set_defaults(func=_cmd_certs)

    p = sub.add_parser(
        "app-hash",
        help="the SHA-256 of an app's FAB, for a node's trusted-apps",
        description="Build the FAB of APP_DIR as `flwr run` does (default: fedsd's own "
        "sources) and print its SHA-256: what a data owner lists in the node config "
        "trusted-apps to let its node run that app (docs/privacy.md, Trust model).",
    )
    p.add_argument("app_dir", nargs="?", default=None, help="the app (default: fedsd's)")
    p.set_defaults(func=_cmd_app_hash)

    p = sub.add_parser(
        "privacy-report",
        help="per-round, per-node privacy records of a run (from OUT/history.json)",
    )
    p.add_argument("out", help="the run's output directory")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_privacy_report)

    p = sub.add_parser(
        "report",
        help="image quality (FID, KID, CLIP score) against epsilon, per round of a run",
        description="One row per round of OUT/history.json (round 0: the base model): "
        "validation loss, FID, KID, CLIP score, the largest cumulative epsilon of the "
        "round's privacy records and the generated/real image counts; '-' where the round "
        "has no quality record (or no epsilon), 'n/a' where a figure could not be computed.",
    )
    p.add_argument("out", help="the run's output directory")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser(
        "metrics-exporter",
        help="serve the Prometheus metrics that fedsd's app processes write",
        description="Aggregate prometheus-client multiprocess files (written by ClientApps "
        "or ServerApps started with PROMETHEUS_MULTIPROC_DIR=DIR) and serve them on /metrics.",
    )
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--multiproc-dir", required=True, help="the apps' PROMETHEUS_MULTIPROC_DIR")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 in containers)")
    p.set_defaults(func=_cmd_metrics_exporter)

    p = sub.add_parser(
        "superlink-exporter",
        help="serve Prometheus metrics about a SuperLink: health, nodes, runs",
        description="Probe a SuperLink every --interval seconds (GET /health over TLS; nodes "
        "and runs through its Control API, as `flwr supernode list` and `flwr ls` list them) "
        "and serve the last probe on /metrics. The SuperLink is a connection of "
        "$FLWR_HOME/config.toml (--flwr-home, --connection) or --address with "
        "--root-certificates.",
    )
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 in containers)")
    p.add_argument("--flwr-home", default=None, help="Flower home with config.toml")
    p.add_argument("--connection", default=None, help="connection name (default: its default)")
    p.add_argument("--address", default=None, help="SuperLink host:port (instead of a config)")
    p.add_argument("--root-certificates", default=None, help="CA of the SuperLink (with --address)")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between probes")
    p.set_defaults(func=_cmd_superlink_exporter)

    p = sub.add_parser(
        "app-launcher",
        help="fork flwr-clientapp/flwr-serverapp processes from one with torch imported",
        description="Import torch, diffusers, peft and opacus once, then fork a "
        "flwr-clientapp or flwr-serverapp per request on SOCKET. A SuperNode (SuperExec) uses "
        "it when the shim written by fedsd.deploy.warmstart.install_shim is first on its PATH and "
        "FEDSD_LAUNCHER_SOCKET=SOCKET.",
    )
    p.add_argument("--socket", required=True, help="unix socket path to listen on")
    p.add_argument(
        "--preload", nargs="*", default=None, help="modules to import first (default: fedsd's)"
    )
    p.set_defaults(func=_cmd_app_launcher)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedsd`` console script."""
    args = build_parser().parse_args(argv)
    from fedsd.common.errors import ConfigError

    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"fedsd: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
