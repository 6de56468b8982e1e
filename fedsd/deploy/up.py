"""``fedsd up --local``: one federation on 127.0.0.1, from the command line to its exit status.

The run config and the shards are checked before anything starts; then a
``LocalDeployment`` (``fedsd.deploy.local``) is started under OUT's lock, the run is
submitted (and resubmitted when lost, ``fedsd.deploy.submission``) and everything is
stopped, whatever happened. The live progress view is ``fedsd.observability.progress``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedsd.common.errors import DeployError
from fedsd.config import ConfigError, RunConfig
from fedsd.deploy.local import DEFAULT_STARTUP_TIMEOUT, LocalDeployment
from fedsd.deploy.out_lock import hold_out_lock
from fedsd.deploy.pinning import APP_DIR_ENV, SELF_HASH_ENV, AppRefused, TrustedApps, fab_hash_of
from fedsd.deploy.processes import DEFAULT_GRACE
from fedsd.deploy.run_config import (
    build_run_config,
    check_privacy_for_nodes,
    check_shards,
    find_app_dir,
    is_fedsd_app,
    node_config_pairs,
)
from fedsd.deploy.signals import Interrupted, signals_raise
from fedsd.deploy.submission import DEFAULT_MAX_RESUBMITS, StreamFn, submit_until_done
from fedsd.deploy.supervisor import RestartPolicy
from fedsd.privacy.modes import parse_privacy

if TYPE_CHECKING:
    from fedsd.observability.progress import ProgressView

EXIT_SIGINT = 130


def run_local(
    nodes: int,
    shards: str | os.PathLike[str] | None,
    out: str | os.PathLike[str],
    run_config_overrides: Mapping[str, Any] | str | Sequence[str] | None = None,
    *,
    rounds: int | None = None,
    model: str | None = None,
    work_dir: str | os.PathLike[str] | None = None,
    app_dir: str | os.PathLike[str] | None = None,
    port: int | None = None,
    stream: StreamFn = print,
    timeout: float | None = None,
    validate: bool = True,
    grace: float = DEFAULT_GRACE,
    startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
    extra_env: Mapping[str, str] | None = None,
    privacy: str | None = None,
    warm_apps: bool | None = None,
    metrics_port: int | None = None,
    node_config: Mapping[str, Any] | str | Sequence[str] | None = None,
    restart: RestartPolicy | None = None,
    max_resubmits: int = DEFAULT_MAX_RESUBMITS,
    progress: ProgressView | None = None,
) -> int:
    """Run one federation on 127.0.0.1 and return its exit status (0 = run completed).

    ``node_config`` (``--node-config``): pairs added to every SuperNode's node config, e.g.
    the data owner's privacy policy (``fedsd.privacy.node_policy``) or the apps the nodes run
    (``trusted-apps``, default ``self``: ``app``'s FAB; ``fedsd.deploy.pinning``); checked before
    anything starts.

    Raises ``ConfigError``/``ShardsError`` before any process starts when the run config or
    the shards are wrong. Anything failing later (a service dying, the ServerApp raising, a
    timeout, Ctrl-C/SIGTERM) returns non-zero after every process has been stopped;
    ``shards=None`` skips the shard check and the shard-dir node config (apps without data).
    ``warm_apps`` (default: when the app's ClientApp is fedsd's) forks each ClientApp and
    ServerApp from a launcher with torch and diffusers already imported
    (``fedsd.deploy.warmstart``). ``progress`` (the live view, usually also ``stream``) is
    told when the nodes are online and how the run ended.
    """
    app = Path(app_dir).expanduser().resolve() if app_dir is not None else find_app_dir()
    if nodes < 1:
        raise ConfigError(f"invalid --nodes {nodes}; expected >= 1")
    overrides, effective = build_run_config(
        app,
        run_config_overrides,
        rounds=rounds,
        model=model,
        out=out,
        validate=validate,
        privacy=privacy,
    )
    if validate:
        check_privacy_for_nodes(RunConfig.from_mapping(effective), nodes)
    extra_node = node_config_pairs(node_config)
    app_hash = _announce_pins(extra_node, app, stream)
    shard_root = check_shards(shards, nodes) if shards is not None else None
    out_path = Path(out).expanduser().resolve()
    work = Path(work_dir).expanduser().resolve() if work_dir else out_path / ".deploy"
    node_configs = []
    for i in range(nodes):
        config: dict[str, Any] = {**extra_node, "partition-id": i, "num-partitions": nodes}
        if shard_root is not None:
            config["shard-dir"] = str(shard_root / f"shard-{i}")
        config["cache-dir"] = str(work / "cache" / f"node-{i}")
        node_configs.append(config)

    start = time.monotonic()
    deployment = LocalDeployment(
        work,
        nodes,
        port=port,
        node_configs=node_configs,
        stream=stream,
        grace=grace,
        startup_timeout=startup_timeout,
        extra_env=extra_env,
        warm_apps=is_fedsd_app(app) if warm_apps is None else warm_apps,
        metrics_port=metrics_port,
        restart=restart,
        app_dir=app,
        self_app_hash=app_hash,
    )
    # OUT (and a work dir outside it) locked first: nothing there is touched before
    locked = (out_path,) if work.is_relative_to(out_path) else (out_path, work)
    with hold_out_lock(*locked), signals_raise(), deployment:
        try:
            for cfg in node_configs:
                Path(cfg["cache-dir"]).mkdir(parents=True, exist_ok=True)
            deployment.start()
            if progress is not None:
                progress.nodes_online(deployment.nodes)
            result = submit_until_done(
                deployment, app, overrides, max_resubmits, stream, start, timeout
            )
        except DeployError as exc:
            stream(f"fedsd up: error: {exc}")
            _report_logs(deployment, stream)
            return 1
        except KeyboardInterrupt:
            stream("fedsd up: interrupted (Ctrl-C); stopping all services")
            return EXIT_SIGINT
        except Interrupted as exc:
            stream(f"fedsd up: got signal {exc.signum}; stopping all services")
            return 128 + exc.signum
        if progress is not None:
            progress.ended(result.status)
        if result.exit_code == 0:
            stream(f"fedsd up: run {result.run_id} {result.status} in {result.seconds:.1f}s")
        else:
            why = f": {result.details}" if result.details else ""
            stream(f"fedsd up: run {result.run_id} ended as {result.status}{why}")
            _report_logs(deployment, stream)
        return result.exit_code


def _announce_pins(node_config: Mapping[str, Any], app: Path, stream: StreamFn) -> str:
    """Say which apps the nodes will run (``fedsd.deploy.pinning``), and warn when the app about
    to be submitted is not one of them; a list the nodes could not read is refused here.
    Returns the app's FAB hash (the deployment's ``self_app_hash``: hashed once)."""
    try:
        submitted = fab_hash_of(app)  # also the nodes' self: the same sources, hashed once
        env = {APP_DIR_ENV: str(app), SELF_HASH_ENV: submitted}
        trusted = TrustedApps.from_node_config(node_config).resolve(env)
    except AppRefused as exc:
        raise ConfigError(str(exc)) from None
    pins = ", ".join(f"{h} ({src})" for h, src in trusted.items())
    stream(f"fedsd up: the nodes run only these apps (FAB sha256): {pins}")
    if submitted not in trusted:
        stream(
            f"fedsd up: warning: the app submitted ({app}, FAB sha256 {submitted}) is not "
            "one of them: every node will refuse the run"
        )
    return submitted


def _report_logs(deployment: LocalDeployment, stream: StreamFn) -> None:
    tails = deployment.log_tails()
    if tails:
        stream(tails)
    stream(f"fedsd up: full logs in {deployment.log_dir}")


def run_local_from_args(args: argparse.Namespace) -> int:
    """``fedsd up`` entry point (parser built by ``fedsd.deploy.args.add_up_arguments``)."""
    err = sys.stderr
    if not args.local:
        print(
            "fedsd up: error: only local deployments are implemented: pass --local "
            "(multi-machine deployments use the container images / manifests)",
            file=err,
        )
        return 2
    if args.shards is None:
        print("fedsd up: error: --local needs --shards DIR (see `fedsd shards`)", file=err)
        return 2
    view = _progress_view(args)
    try:
        return run_local(
            args.nodes,
            args.shards,
            args.out,
            args.run_config,
            rounds=args.rounds,
            model=args.model,
            privacy=args.privacy,
            metrics_port=None if args.no_metrics else args.metrics_port,
            work_dir=args.work_dir,
            app_dir=args.app_dir,
            port=args.port,
            stream=view,
            timeout=args.timeout,
            node_config=args.node_config,
            restart=RestartPolicy(max_restarts=args.max_restarts),
            max_resubmits=args.max_resubmits,
            progress=view,
        )
    except (ConfigError, FileNotFoundError, DeployError) as exc:
        print(f"fedsd up: error: {exc}", file=err)
        return 2
    finally:
        view.close()


def _progress_view(args: argparse.Namespace) -> ProgressView:
    """The live view of ``fedsd up``, watching OUT/history.json, told the planned rounds
    and the DP-SGD budget when the run config can be read (run_local reports a config that
    cannot)."""
    from fedsd.fl.history import HISTORY
    from fedsd.observability.progress import ProgressView

    view = ProgressView(sys.stdout, history=Path(args.out).expanduser().resolve() / HISTORY)
    try:
        app = Path(args.app_dir) if args.app_dir else find_app_dir()
        _, effective = build_run_config(
            app, args.run_config, rounds=args.rounds, privacy=args.privacy, validate=False
        )
        view.progress.total = int(effective["num-server-rounds"])
        if "dp-sample" in parse_privacy(str(effective.get("privacy", "none"))):
            view.budget = float(effective.get("dp-target-epsilon") or 0) or None
    except (ConfigError, DeployError, OSError, KeyError, TypeError, ValueError):
        pass
    return view
