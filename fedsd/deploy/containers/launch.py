"""The launcher: one-shot clients of the SuperLink's Control API in a compose or
Kubernetes deployment (serverapp image: ``entrypoint.sh launch register|run``).

    python -m fedsd.deploy.containers.launch register
                         register the node public keys (already registered is fine)
    python -m fedsd.deploy.containers.launch run
                         submit the run, stream it, exit with the run's status
                         (0 only for ``finished:completed``)

Settings (environment; defaults in brackets):

    SUPERLINK_ADDRESS     the SuperLink's Control API, host:port [superlink:9092]
    FEDSD_CERTS           certs folder: ca.crt and nodes/node-<i>.pub [/certs]
    FEDSD_NODE_PUBKEYS    folder of node-<i>.pub instead [$FEDSD_CERTS/nodes]
    FEDSD_NUM_NODES       how many node keys to register; min-nodes defaults to it [2]
    FEDSD_ROUNDS          num-server-rounds [app default]
    FEDSD_PRIVACY         privacy mode, e.g. secagg+dp-sample [app default: none]
    FEDSD_MODEL           model: hub id or a directory as the SuperNodes and the ServerApp
                          see it [app default]
    FEDSD_OUT_DIR         out-dir as the ServerApp container sees it [/out]
    FEDSD_RUN_CONFIG      more run-config pairs, e.g. "resolution=64 local-epochs=2"
    FEDSD_TIMEOUT         seconds before giving up on the run [none]; then the run is stopped
    FEDSD_MAX_RESUBMITS   how many times a lost run is resubmitted [3]; 0: never
    FEDSD_APP_DIR         the Flower app to submit [/app]
    FEDSD_STARTUP_TIMEOUT seconds to wait for the SuperLink to answer /health [120]

The values are checked (fedsd.config) before anything is submitted. ``flwr run --stream``
exits 0 even when the ServerApp fails, so the verdict comes from ``flwr ls --run-id``, as
in ``fedsd up`` (both use fedsd.deploy.control for the flwr calls: here through a
RemoteDeployment).

A lost run is resubmitted, as ``fedsd up --local`` does (fedsd.deploy.submission's
submit_until_done and resubmittable): a run whose ServerApp died (the SuperLink fails it
once the ServerApp missed its heartbeats, within about a minute), or that was in flight
while the SuperLink stopped answering /health (killed, restarted: then the run is stopped
once the SuperLink is back and its ServerApp gets a heartbeat interval, 30 s, to exit).
Each resubmission is logged (``fedsd launch: run N ended as ...; resubmitting (1/3), it
resumes after the last saved round``); the ServerApp resumes after the last round in the
out-dir's history.json. A run the app failed itself (``ServerApp failed with exception``:
bad config, budget spent, too few nodes, full disk), a stopped run and a timeout are not
resubmitted. After FEDSD_MAX_RESUBMITS resubmissions the launcher exits with the last
run's status, like any failed run (1).

Giving up never leaves the run going: on ``FEDSD_TIMEOUT``, or on SIGTERM/SIGINT/SIGHUP
(``docker compose stop``, a deleted Kubernetes Job), the launcher runs ``flwr stop RUN_ID``,
reads the run's status back (``flwr ls``), prints it and exits non-zero unless the run
ended ``finished:completed`` after all (124 on the timeout, 128+N on signal N).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import FrameType

from fedsd.common.errors import DeployError
from fedsd.common.health import poll_until
from fedsd.config import ConfigError, RunConfig
from fedsd.deploy.certs import NodeKey
from fedsd.deploy.local import LocalDeployment
from fedsd.deploy.remote import RemoteDeployment
from fedsd.deploy.run_config import (
    build_run_config,
    check_privacy_for_nodes,
    format_config_pairs,
    parse_run_config,
)
from fedsd.deploy.submission import (
    DEFAULT_MAX_RESUBMITS,
    EXIT_TIMEOUT,
    RUN_ID_RE,
    submit_until_done,
)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def log(message: str) -> None:
    print(f"fedsd launch: {message}", flush=True)


class Stopped(BaseException):
    """Raised from the signal handler so that the launcher stops the run before exiting
    (a BaseException: nothing on the way catches it as an error)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    raise Stopped(signum)


def stop_run(
    deployment: LocalDeployment, run_id: str, why: str, *, settle: float = 30.0
) -> str | None:
    """Stop the run (as ``flwr stop RUN_ID``), then the status the SuperLink reports for it
    (polled for up to ``settle`` seconds until it is ``finished:*``). Signals are ignored
    meanwhile, so a second SIGTERM cannot leave the run going half-way through."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
    try:
        log(f"giving up ({why}): stopping run {run_id}")
        try:
            deployment.control.stop_run(run_id, check=True)
        except DeployError as exc:
            log(f"error: {exc}")
        last: list[str | None] = [None]  # the last status read, finished or not

        def finished() -> str | None:
            try:
                last[0], _ = deployment.run_status(run_id)
            except DeployError as exc:
                log(f"error: {exc}")
            return last[0] if last[0] and last[0].startswith("finished") else None

        status = poll_until(finished, settle, 1.0) or last[0]
        log(f"run {run_id} stopped: status {status or 'unknown'}")
        return status
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def deployment_for(address: str, ca: Path, nodes: int) -> RemoteDeployment:
    """fedsd.deploy.control's flwr wrapper, pointed at ``address`` through its own FLWR_HOME."""
    startup = float(os.environ.get("FEDSD_STARTUP_TIMEOUT", "120"))
    return RemoteDeployment(address, ca, nodes, stream=print, startup_timeout=startup)


def register(deployment: LocalDeployment, pub_dir: Path, nodes: int) -> int:
    keys = [NodeKey(pub_dir / f"node-{i}", pub_dir / f"node-{i}.pub") for i in range(nodes)]
    missing = [str(k.public_key) for k in keys if not k.public_key.is_file()]
    if missing:
        log(f"error: node public key(s) missing: {', '.join(missing)} (run the certs service)")
        return 2
    for key, outcome in deployment.register_nodes(keys).items():
        log(f"{key}: {outcome}")
    return 0


def run(deployment: LocalDeployment, app: Path, nodes: int) -> int:
    env = os.environ
    overrides = parse_run_config(env.get("FEDSD_RUN_CONFIG", ""))
    overrides.setdefault("min-nodes", nodes)
    overrides["out-dir"] = env.get("FEDSD_OUT_DIR", "/out")
    if env.get("FEDSD_MODEL"):
        overrides["model"] = env["FEDSD_MODEL"]
    rounds = int(env["FEDSD_ROUNDS"]) if env.get("FEDSD_ROUNDS") else None
    privacy = env.get("FEDSD_PRIVACY") or None
    timeout = float(env["FEDSD_TIMEOUT"]) if env.get("FEDSD_TIMEOUT") else None
    try:
        max_resubmits = max_resubmits_setting(env)
        overrides, effective = build_run_config(app, overrides, rounds=rounds, privacy=privacy)
        check_privacy_for_nodes(RunConfig.from_mapping(effective), nodes)
    except ConfigError as exc:
        log(f"error: {exc}")
        return 2
    log(f"submitting {app} with --run-config {format_config_pairs(overrides)}")
    started: list[str] = []  # every run submitted (resubmissions too); the last is current
    relay = deployment.stream

    def stream(line: str) -> None:
        if m := RUN_ID_RE.search(line):
            started.append(m.group(1))
        relay(line)

    deployment.stream = stream
    previous = {sig: signal.signal(sig, _raise_stopped) for sig in STOP_SIGNALS}
    try:
        result = submit_until_done(
            deployment,
            app,
            overrides,
            max_resubmits,
            stream,
            time.monotonic(),
            timeout,
            limit="FEDSD_MAX_RESUBMITS",
        )
    except Stopped as stopped:
        name = signal.Signals(stopped.signum).name
        if not started:
            log(f"{name}: no run was started")
            return 128 + stopped.signum
        status = stop_run(deployment, started[-1], name)
        return 0 if status == "finished:completed" else 128 + stopped.signum
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    if result.exit_code == EXIT_TIMEOUT:
        if result.run_id is None:
            log(f"no run started within FEDSD_TIMEOUT={timeout:g}s")
            return EXIT_TIMEOUT
        status = stop_run(deployment, result.run_id, f"FEDSD_TIMEOUT={timeout:g}s")
        return 0 if status == "finished:completed" else EXIT_TIMEOUT
    if result.exit_code == 0:
        log(f"run {result.run_id} {result.status} in {result.seconds:.1f}s")
    else:
        why = f": {result.details}" if result.details else ""
        log(f"run {result.run_id} ended as {result.status}{why}")
    return result.exit_code


def max_resubmits_setting(env: Mapping[str, str]) -> int:
    """FEDSD_MAX_RESUBMITS: an integer >= 0 [3]."""
    raw = env.get("FEDSD_MAX_RESUBMITS", "").strip()
    if not raw:
        return DEFAULT_MAX_RESUBMITS
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ConfigError(
            f"invalid FEDSD_MAX_RESUBMITS={raw!r}; expected an integer >= 0 (0: never resubmit)"
        )
    return value


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ("register", "run"):
        print("usage: python -m fedsd.deploy.containers.launch register|run", file=sys.stderr)
        return 2
    env = os.environ
    address = env.get("SUPERLINK_ADDRESS", "superlink:9092")
    certs = Path(env.get("FEDSD_CERTS", "/certs"))
    ca = Path(env.get("FEDSD_CA_CERT", str(certs / "ca.crt")))
    nodes = int(env.get("FEDSD_NUM_NODES", "2"))
    deployment = deployment_for(address, ca, nodes)
    try:
        deployment.wait_healthy(deployment.startup_timeout)
        if argv[0] == "register":
            pub_dir = Path(env.get("FEDSD_NODE_PUBKEYS", str(certs / "nodes")))
            return register(deployment, pub_dir, nodes)
        return run(deployment, Path(env.get("FEDSD_APP_DIR", "/app")), nodes)
    except DeployError as exc:
        log(f"error: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
