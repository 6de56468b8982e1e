"""One-shot clients of the SuperLink's Control API in a compose deployment.

    launch.py register   register the node public keys (already registered is fine)
    launch.py run        submit the run, stream it, exit with the run's status
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
    FEDSD_APP_DIR         the Flower app to submit [/app]

The values are checked (fedsd.config) before anything is submitted. ``flwr run --stream``
exits 0 even when the ServerApp fails, so the verdict comes from ``flwr ls --run-id``, as
in ``fedsd up`` (both use fedsd.deploy.LocalDeployment for the flwr calls).

Giving up never leaves the run going: on ``FEDSD_TIMEOUT``, or on SIGTERM/SIGINT/SIGHUP
(``docker compose stop``, a deleted Kubernetes Job), the launcher runs ``flwr stop RUN_ID``,
reads the run's status back (``flwr ls``), prints it and exits non-zero unless the run
ended ``finished:completed`` after all (124 on the timeout, 128+N on signal N).
"""

from __future__ import annotations

import json
import os
import re
import signal
import ssl
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import FrameType

from fedsd.certs import NodeKey
from fedsd.config import ConfigError, RunConfig
from fedsd.deploy import (
    CONNECTION,
    EXIT_TIMEOUT,
    DeployError,
    LocalDeployment,
    build_run_config,
    check_privacy_for_nodes,
    format_config_pairs,
    parse_run_config,
)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# What `flwr run` prints once the SuperLink accepted the run (as in fedsd.deploy).
RUN_ID_RE = re.compile(r"Successfully started run (\d+)")


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
    """``flwr stop RUN_ID``, then the status the SuperLink reports for the run (polled for
    up to ``settle`` seconds until it is ``finished:*``). Signals are ignored meanwhile, so
    a second SIGTERM cannot leave the run going half-way through."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
    try:
        log(f"giving up ({why}): stopping run {run_id}")
        try:
            res = deployment.flwr("stop", str(run_id), CONNECTION)
            if res.returncode != 0:
                log(f"`flwr stop {run_id}` exited with {res.returncode}: {res.stdout}{res.stderr}")
        except DeployError as exc:
            log(f"error: {exc}")
        deadline = time.monotonic() + settle
        status: str | None = None
        while True:
            try:
                status, _ = deployment.run_status(run_id)
            except DeployError as exc:
                log(f"error: {exc}")
            if (status and status.startswith("finished")) or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        log(f"run {run_id} stopped: status {status or 'unknown'}")
        return status
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def wait_healthy(address: str, ca: Path, timeout: float) -> None:
    ctx = ssl.create_default_context(cafile=str(ca))
    url = f"https://{address}/health"
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, context=ctx, timeout=3) as resp:  # noqa: S310
                if resp.status == 200:
                    return
                last = f"HTTP {resp.status}"
        except (urllib.error.URLError, OSError) as exc:
            last = exc
        time.sleep(1.0)
    raise DeployError(f"SuperLink not healthy at {url} after {timeout:.0f}s: {last}")


def deployment_for(address: str, ca: Path, nodes: int) -> LocalDeployment:
    """fedsd.deploy's flwr wrapper, pointed at ``address`` through its own FLWR_HOME."""
    work = Path(tempfile.mkdtemp(prefix="fedsd-launch-"))
    deployment = LocalDeployment(work, nodes, stream=print)
    deployment.flwr_home.mkdir(parents=True, exist_ok=True)
    deployment.log_dir.mkdir(parents=True, exist_ok=True)
    (deployment.flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f"address = {json.dumps(address)}\nroot-certificates = {json.dumps(str(ca))}\n",
        encoding="utf-8",
    )
    return deployment


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
        overrides, effective = build_run_config(app, overrides, rounds=rounds, privacy=privacy)
        check_privacy_for_nodes(RunConfig.from_mapping(effective), nodes)
    except ConfigError as exc:
        log(f"error: {exc}")
        return 2
    log(f"submitting {app} with --run-config {format_config_pairs(overrides)}")
    started: list[str] = []
    relay = deployment.stream

    def stream(line: str) -> None:
        if not started and (m := RUN_ID_RE.search(line)):
            started.append(m.group(1))
        relay(line)

    deployment.stream = stream
    previous = {sig: signal.signal(sig, _raise_stopped) for sig in STOP_SIGNALS}
    try:
        result = deployment.submit(app, overrides, timeout=timeout)
    except Stopped as stopped:
        name = signal.Signals(stopped.signum).name
        if not started:
            log(f"{name}: no run was started")
            return 128 + stopped.signum
        status = stop_run(deployment, started[0], name)
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


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ("register", "run"):
        print("usage: launch.py register|run", file=sys.stderr)
        return 2
    env = os.environ
    address = env.get("SUPERLINK_ADDRESS", "superlink:9092")
    certs = Path(env.get("FEDSD_CERTS", "/certs"))
    ca = Path(env.get("FEDSD_CA_CERT", str(certs / "ca.crt")))
    nodes = int(env.get("FEDSD_NUM_NODES", "2"))
    deployment = deployment_for(address, ca, nodes)
    try:
        wait_healthy(address, ca, float(env.get("FEDSD_STARTUP_TIMEOUT", "120")))
        if argv[0] == "register":
            pub_dir = Path(env.get("FEDSD_NODE_PUBKEYS", str(certs / "nodes")))
            return register(deployment, pub_dir, nodes)
        return run(deployment, Path(env.get("FEDSD_APP_DIR", "/app")), nodes)
    except DeployError as exc:
        log(f"error: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
