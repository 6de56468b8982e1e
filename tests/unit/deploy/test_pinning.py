"""App pinning (fedsd.deploy.pinning): the hash check, its fail-closed cases, and the hook into
Flower's ClientApp start. The refusal in a real TLS deployment is in tests/e2e/test_deploy.py
(test_nodes_refuse_an_app_they_did_not_pin)."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from fedsd.config import ConfigError
from fedsd.deploy.pinning import (
    APP_DIR_ENV,
    HOOKED,
    REFUSAL_MARK,
    SELF_HASH_ENV,
    AppRefused,
    TrustedApps,
    check_fab,
    fab_hash_of,
    install_guard,
)
from tests.conftest import changed_app_copy

REPO = Path(__file__).resolve().parents[3]
BARE = REPO / "tests" / "fixtures" / "bare_app"


@pytest.fixture(scope="module")
def bare_fab() -> tuple[bytes, str]:
    """The bare app's FAB as `flwr run` submits it, and its SHA-256."""
    from flwr.cli.build import build_fab_from_disk

    fab = build_fab_from_disk(BARE)
    return fab, hashlib.sha256(fab).hexdigest()


def test_self_is_the_hash_that_flwr_build_prints(tmp_path, bare_fab):
    app = shutil.copytree(BARE, tmp_path / "bare-app")  # flwr build wants a valid app name
    res = subprocess.run(
        [str(Path(sys.executable).parent / "flwr"), "build", "--app", str(app)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    (built,) = tmp_path.glob("*.fab")
    digest = hashlib.sha256(built.read_bytes()).hexdigest()
    assert built.name.endswith(f".{digest[:8]}.fab")  # Flower names it by the same hash
    assert digest == fab_hash_of(app) == bare_fab[1]  # the copy's FAB is the same bytes
    trusted = TrustedApps.from_node_config({}).resolve({APP_DIR_ENV: str(app)})
    assert trusted == {digest: "self"}  # default: self


def test_self_computed_once_at_node_start_is_used_as_given(tmp_path, bare_fab):
    # fedsd up hashes the app once and hands the hash to each node; no app dir is read
    nowhere = str(tmp_path / "no-app-here")
    env = {APP_DIR_ENV: nowhere, SELF_HASH_ENV: bare_fab[1].upper()}
    assert TrustedApps.from_node_config({}).resolve(env) == {bare_fab[1]: "self"}
    with pytest.raises(AppRefused, match="not a SHA-256 hash"):
        TrustedApps.from_node_config({}).resolve({SELF_HASH_ENV: "abc"})
    with pytest.raises(AppRefused, match="holds no Flower app"):  # without it: built, fails
        TrustedApps.from_node_config({}).resolve({APP_DIR_ENV: nowhere})


def test_check_runs_only_the_pinned_apps(tmp_path, bare_fab):
    fab, digest = bare_fab
    other = fab_hash_of(changed_app_copy(BARE, tmp_path / "bare_app"))
    assert other != digest
    env = {APP_DIR_ENV: str(BARE)}
    assert check_fab(fab, digest, {}, env) == (digest, "self")
    assert check_fab(fab, digest, {"trusted-apps": digest.upper()}, env) == (
        digest,
        "trusted-apps",
    )
    assert check_fab(fab, digest, {"trusted-apps": f"{other}, self"}, env) == (digest, "self")
    # Pinned elsewhere: refused, naming the FAB's hash, the rule and what the node runs.
    with pytest.raises(AppRefused) as info:
        check_fab(fab, digest, {"trusted-apps": other}, env, label="fedsd/bare-app 0.1.0")
    said = str(info.value)
    assert said.startswith(f"{REFUSAL_MARK}: ")
    assert f"app fedsd/bare-app 0.1.0 with FAB sha256 {digest} is not one of them" in said
    assert f"node config trusted-apps: {other} (trusted-apps)" in said
    # self is the node's own copy: another app directory is another pin.
    with pytest.raises(AppRefused, match=f"{digest} is not one of them"):
        check_fab(fab, digest, {}, {APP_DIR_ENV: str(tmp_path / "bare_app")})


def test_hash_file_is_read_at_each_check(tmp_path, bare_fab):
    fab, digest = bare_fab
    listed = tmp_path / "trusted.txt"
    listed.write_text(f"# reviewed apps\n\n{'0' * 64}  # old\n{digest}\n")
    cfg = {"trusted-apps": "0" * 64, "trusted-apps-file": str(listed)}
    assert check_fab(fab, digest, cfg, {}) == (digest, "trusted-apps-file")
    listed.write_text("# nothing any more\n")
    with pytest.raises(AppRefused, match="is not one of them"):
        check_fab(fab, digest, cfg, {})


@pytest.mark.parametrize(
    ("config", "env", "said"),
    [
        ({"trusted-apps": "abc123"}, {}, "'abc123' is not a SHA-256 hash"),
        ({"trusted-apps": "self, g" + "0" * 63}, {}, "is not a SHA-256 hash"),
        ({"trusted-apps": 7}, {}, "expected a string"),
        ({"trusted-apps": " "}, {}, "trusted-apps is empty"),
        ({"trusted-apps-file": "/no/such/file"}, {}, "cannot read the node's trusted-apps-file"),
        ({"trusted-apps-file": "DIR"}, {}, "cannot read the node's trusted-apps-file"),
        ({"trusted-apps-file": "BAD"}, {}, "'sha256:0000' is not a SHA-256 hash"),
        ({"trusted-apps": "self"}, {APP_DIR_ENV: "/no/such/app"}, "holds no Flower app"),
    ],
    ids=[
        "short",
        "non-hex",
        "not-a-string",
        "empty",
        "no-file",
        "unreadable",
        "bad-line",
        "no-app",
    ],
)
def test_a_list_the_node_cannot_read_refuses_every_run(tmp_path, bare_fab, config, env, said):
    """Fail closed: even when the FAB's own hash is listed, a list that cannot be read in
    full refuses the run (and says why)."""
    fab, digest = bare_fab
    (tmp_path / "bad.txt").write_text(f"{digest}\nsha256:0000\n")
    paths = {"DIR": str(tmp_path), "BAD": str(tmp_path / "bad.txt")}
    config = {k: paths.get(v, v) if isinstance(v, str) else v for k, v in config.items()}
    if "trusted-apps" not in config:
        config["trusted-apps"] = digest
    elif config["trusted-apps"] == "self":
        config["trusted-apps"] = f"self {digest}"
    with pytest.raises(AppRefused, match=re.escape(said)):
        check_fab(fab, digest, config, env)


def test_a_fab_that_does_not_match_its_hash_is_refused(bare_fab):
    fab, digest = bare_fab
    with pytest.raises(AppRefused, match="corrupt or substituted"):
        check_fab(fab + b"x", digest, {"trusted-apps": digest}, {})


def test_fedsd_up_refuses_a_bad_list_before_starting_anything(tmp_path, bare_app_dir):
    from fedsd.deploy.up import run_local

    for value, said in (("nope", "not a SHA-256 hash"), ("", "trusted-apps is empty")):
        with pytest.raises(ConfigError, match=said):
            run_local(
                2, None, tmp_path / "out", app_dir=bare_app_dir, node_config={"trusted-apps": value}
            )
    missing = {"trusted-apps-file": str(tmp_path / "missing.txt")}
    with pytest.raises(ConfigError, match="cannot read the node's trusted-apps-file"):
        run_local(2, None, tmp_path / "out", app_dir=bare_app_dir, node_config=missing)
    assert not (tmp_path / "out" / ".deploy").exists()


# --------------------------------------------------------------------------- the hook


def test_flower_still_checks_nothing_before_install_and_calls_the_hooked_functions():
    """The guard relies on Flower 1.41's run_clientapp: it pulls the task input (message,
    context, run, FAB), then installs the FAB, then loads the ClientApp; nothing of the
    FAB runs before ``install_from_fab``. A Flower upgrade that moves any of it fails here."""
    from flwr.supernode.runtime import run_clientapp as rc

    source = inspect.getsource(rc.run_clientapp)
    pull = source.index("message, context, run, fab = pull_task_input(client)")
    install = source.index("install_from_fab(fab.content")
    load = source.index("load_client_app_fn(")
    assert pull < install < load
    between = source[pull:install]
    assert "client_app" not in between and "import" not in between, between
    for name in HOOKED:
        assert name in rc.run_clientapp.__code__.co_names  # looked up in the module
        assert callable(getattr(rc, name))
    assert "pull_task_input" in inspect.getsource(rc.pull_task_input)  # defined there
    stub = types.ModuleType("fake_run_clientapp")
    stub.run_clientapp = lambda: None
    with pytest.raises(RuntimeError, match="no ClientApp starts"):
        install_guard(stub)


_HOOK_SCRIPT = r"""
import hashlib, json, sys
from pathlib import Path
from flwr.app import Context, RecordDict
from flwr.supercore.fab import Fab
from flwr.supernode.runtime import run_clientapp as rc

fab_bytes = Path(sys.argv[1]).read_bytes()
digest = hashlib.sha256(fab_bytes).hexdigest()
pins = sys.argv[2]
installs = []

class Run:
    fab_id, fab_version, fab_hash = "fedsd/bare-app", "0.1.0", digest

def fake_pull(client):
    ctx = Context(run_id=1, node_id=1, node_config={"trusted-apps": pins}, state=RecordDict(),
                  run_config={})
    return "message", ctx, Run(), Fab(digest, fab_bytes, {})

def fake_install(fab_file, skip_prompt=False):
    installs.append(len(fab_file))
    return Path("/installed")

rc.pull_task_input, rc.install_from_fab = fake_pull, fake_install
import fedsd.deploy.pinning as pinning
pinning.install_guard(env={})
out = {}
try:
    rc.install_from_fab(fab_bytes, skip_prompt=True)  # before any pull: refused
except pinning.AppRefused as exc:
    out["unpulled"] = str(exc)
message, context, run, fab = rc.pull_task_input(None)
out["pulled"] = message
for what, data in (("other", fab.content + b"x"), ("same", fab.content)):
    try:
        rc.install_from_fab(data, skip_prompt=True)
        out[what] = "installed"
    except pinning.AppRefused as exc:
        out[what] = str(exc)
out["installs"] = installs
out["fedsd_modules"] = sorted(m for m in sys.modules if m.split(".")[0] == "fedsd")
print(json.dumps(out))
"""


def _guarded(tmp_path, fab: bytes, pins: str) -> dict:
    path = tmp_path / "app.fab"
    path.write_bytes(fab)
    res = subprocess.run(
        [sys.executable, "-c", _HOOK_SCRIPT, str(path), pins],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert res.returncode == 0, res.stdout + res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1]) | {"stderr": res.stderr}


def test_the_guard_refuses_in_install_and_installs_only_the_checked_fab(tmp_path, bare_fab):
    """Flower's own functions wrapped in a real process: the check runs on what
    pull_task_input returns; install_from_fab raises the refusal (Flower turns it into the
    error reply) and the real install only ever sees the checked bytes."""
    fab, digest = bare_fab
    trusted = _guarded(tmp_path, fab, digest)
    assert "the check did not run" in trusted["unpulled"]
    assert trusted["pulled"] == "message"  # the task input passes through unchanged
    assert "not the one that was checked" in trusted["other"]
    assert trusted["same"] == "installed" and trusted["installs"] == [len(fab)]
    assert trusted["fedsd_modules"] == []  # the FAB's fedsd, not the node's, comes next
    assert f"(FAB sha256 {digest}) is pinned (trusted-apps)" in trusted["stderr"]

    refused = _guarded(tmp_path, fab, "0" * 64)
    assert refused["installs"] == []
    for what in ("other", "same"):
        assert refused[what].startswith(REFUSAL_MARK), refused
        assert f"FAB sha256 {digest} is not one of them" in refused[what]
    assert f"fedsd node: {REFUSAL_MARK}" in refused["stderr"]


def test_app_hash_command_prints_what_nodes_pin(bare_fab):
    res = subprocess.run(
        [sys.executable, "-m", "fedsd.cli", "app-hash", str(BARE)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [bare_fab[1], str(BARE)]


def test_fedsd_up_hashes_the_app_once(tmp_path, bare_app_dir, monkeypatch):
    """The app submitted is also the nodes' ``self``: ``fedsd up`` builds its FAB once (each
    build walks the whole app directory, seconds with a venv inside)."""
    import fedsd.deploy.local as local
    import fedsd.deploy.pinning as pinning
    import fedsd.deploy.up as up
    from fedsd.common.errors import DeployError

    hashed: list[Path] = []

    def counting(app: Path) -> str:
        hashed.append(Path(app))
        return fab_hash_of(app)

    def start(self: local.LocalDeployment) -> local.LocalDeployment:
        assert self.self_app_hash() == fab_hash_of(bare_app_dir)  # what the nodes get
        raise DeployError("stopped before any service started")

    for module in (up, local, pinning):
        monkeypatch.setattr(module, "fab_hash_of", counting)
    monkeypatch.setattr(local.LocalDeployment, "start", start)
    said: list[str] = []
    code = up.run_local(2, None, tmp_path / "out", app_dir=bare_app_dir, stream=said.append)
    assert code == 1 and "stopped before any service started" in "\n".join(said), said
    assert hashed == [Path(bare_app_dir).resolve()], hashed
