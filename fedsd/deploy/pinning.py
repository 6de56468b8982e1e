"""App pinning: a node runs only the Flower apps (FABs) its operator trusts.

Whoever submits a run chooses the code every node runs, and that code reads the node's
shard. Flower's own check (``flower-supernode --trusted-entities``) only accepts FABs
that a SuperLink signed for Flower Hub, which an open-source SuperLink never does, so
fedsd checks the FAB itself, with code from the node's installation (its image), before
any code of the FAB is installed, imported or run.

The data owner's list is node config, never run config (SuperNode ``--node-config``;
``fedsd up --local --node-config``; ``FEDSD_TRUSTED_APPS`` / ``FEDSD_NODE_CONFIG`` in
compose and Kubernetes):

``trusted-apps``
    entries separated by spaces or commas: a FAB's SHA-256 (64 hex digits, what
    ``fedsd app-hash`` and ``flwr build`` print), or ``self``: the FAB built from the
    node's own copy of the app, ``$FEDSD_APP_DIR`` (``fedsd up --local`` sets it to the
    app it deploys, the images to ``/app``), else the source tree of the installed fedsd.
    Default: ``self``.
``trusted-apps-file``
    a file of more hashes, one per line (``#`` starts a comment), read at every message,
    so a list can change without restarting the node.

FABs are deterministic (Flower builds them with a fixed date and sorted files), so
``self`` is the very hash ``flwr run`` submits from the same sources.

The check fails closed: a list the node cannot read in full (a bad entry, a missing file,
``self`` without an app directory) refuses every run, and so does a FAB whose content
does not hash to the hash it is filed under. A refused message gets an error reply whose
reason starts with ``REFUSAL_MARK`` and names the FAB's hash and the rule.

Where it runs: the node's ``flwr-clientapp`` (the one the SuperNode starts for every
message; the shim of ``fedsd.deploy.warmstart`` and the images' ``/opt/venv/bin/flwr-clientapp``
both lead here) is Flower's, with two of its module functions wrapped:
``pull_task_input`` (the check, on the FAB the SuperNode hands over) and
``install_from_fab`` (raises the refusal, so that Flower answers the message with an
error, before anything of the FAB is extracted). ``tests/unit/deploy/test_pinning.py`` fails if a
Flower upgrade moves either.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TRUSTED_APPS_KEY = "trusted-apps"
TRUSTED_APPS_FILE_KEY = "trusted-apps-file"
PINNING_KEYS = (TRUSTED_APPS_KEY, TRUSTED_APPS_FILE_KEY)
APP_DIR_ENV = "FEDSD_APP_DIR"
#: ``self``'s hash, computed once when the node starts (``fedsd up --local`` sets it), so
#: that a message does not rebuild the FAB (a walk of the whole app directory).
SELF_HASH_ENV = "FEDSD_SELF_APP_HASH"
SELF = "self"
DEFAULT_TRUSTED_APPS = SELF
#: How a refusal's reason starts (the ServerApp counts refusals by it).
REFUSAL_MARK = "fedsd app pinning"
#: Flower's functions that the guard wraps, in the order ``run_clientapp`` calls them.
HOOKED = ("pull_task_input", "install_from_fab")

_SHA256 = re.compile(r"[0-9a-f]{64}")
_SEPARATORS = re.compile(r"[\s,]+")


class AppRefused(Exception):
    """This node does not run the FAB (or cannot tell whether it may)."""

    def __init__(self, message: str) -> None:
        super().__init__(f"{REFUSAL_MARK}: {message}")


@dataclass(frozen=True)
class TrustedApps:
    """The pinning keys of one node's config, validated."""

    hashes: frozenset[str] = frozenset()
    self_pin: bool = True
    file: Path | None = None

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> TrustedApps:
        """Read the keys; a bad value raises ``ValueError`` (never ignored)."""
        raw = node_config.get(TRUSTED_APPS_KEY, DEFAULT_TRUSTED_APPS)
        if not isinstance(raw, str):
            raise ValueError(
                f"node config {TRUSTED_APPS_KEY}={raw!r}: expected a string of SHA-256 "
                f'hashes and/or {SELF!r}, e.g. {TRUSTED_APPS_KEY}="{SELF}"'
            )
        entries = [e for e in _SEPARATORS.split(raw.strip()) if e]
        hashes = _hashes(entries, f"node config {TRUSTED_APPS_KEY}", allow_self=True)
        file = node_config.get(TRUSTED_APPS_FILE_KEY)
        if file is not None and (not isinstance(file, str) or not file.strip()):
            raise ValueError(f"node config {TRUSTED_APPS_FILE_KEY}={file!r}: expected a path")
        if not entries and file is None:
            raise ValueError(
                f"node config {TRUSTED_APPS_KEY} is empty: the node would refuse every run "
                f"(list SHA-256 hashes, {SELF!r}, or set {TRUSTED_APPS_FILE_KEY})"
            )
        return cls(frozenset(hashes), SELF in entries, Path(file) if file else None)

    def resolve(self, env: Mapping[str, str] | None = None) -> dict[str, str]:
        """Every trusted hash, mapped to where it comes from. Raises ``AppRefused`` when
        any part of the list cannot be read (fail closed)."""
        env = os.environ if env is None else env
        trusted = dict.fromkeys(sorted(self.hashes), TRUSTED_APPS_KEY)
        if self.file is not None:
            try:
                text = self.file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise AppRefused(
                    f"cannot read the node's {TRUSTED_APPS_FILE_KEY} {self.file}: {exc}; "
                    "every run is refused until it can"
                ) from None
            lines = [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
            try:
                found = _hashes([ln for ln in lines if ln], str(self.file), allow_self=False)
            except ValueError as exc:
                raise AppRefused(f"{exc}; every run is refused until it is fixed") from None
            for h in found:
                trusted.setdefault(h, TRUSTED_APPS_FILE_KEY)
        if self.self_pin:
            pinned = env.get(SELF_HASH_ENV, "").strip().lower()
            if pinned and not _SHA256.fullmatch(pinned):
                raise AppRefused(
                    f"{SELF_HASH_ENV}={pinned!r} is not a SHA-256 hash; every run is refused"
                )
            trusted.setdefault(pinned or fab_hash_of(self_app_dir(env)), SELF)
        return trusted


def _hashes(entries: list[str], where: str, *, allow_self: bool) -> list[str]:
    out = []
    for entry in entries:
        if allow_self and entry == SELF:
            continue
        if not _SHA256.fullmatch(entry.lower()):
            raise ValueError(
                f"{where}: {entry!r} is not a SHA-256 hash (64 hex digits)"
                + (f" or {SELF!r}" if allow_self else "")
            )
        out.append(entry.lower())
    return out


def source_app_dir() -> Path | None:
    """The fedsd source tree around the imported package (a checkout or an editable
    install), when its ``pyproject.toml`` declares the Flower app; else None."""
    import fedsd

    root = Path(fedsd.__file__).resolve().parent.parent
    return root if has_flwr_app(root / "pyproject.toml") else None


def has_flwr_app(pyproject: Path) -> bool:
    """Whether ``pyproject`` has a ``[tool.flwr.app]`` table."""
    try:
        with pyproject.open("rb") as fh:
            data = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError):
        return False
    return isinstance(data.get("tool", {}).get("flwr", {}).get("app"), dict)


def self_app_dir(env: Mapping[str, str] | None = None) -> Path:
    """The node's own copy of the app: ``$FEDSD_APP_DIR``, else fedsd's source tree."""
    env = os.environ if env is None else env
    raw = env.get(APP_DIR_ENV, "")
    path = Path(raw) if raw else source_app_dir()
    if path is None:
        raise AppRefused(
            f"{TRUSTED_APPS_KEY} has {SELF!r} but the node has no app sources to build it "
            f"from (set {APP_DIR_ENV}, or list the app's hash instead)"
        )
    if not has_flwr_app(path / "pyproject.toml"):
        raise AppRefused(
            f"{TRUSTED_APPS_KEY} has {SELF!r} but {path} holds no Flower app "
            f"(pyproject.toml with [tool.flwr.app]); check {APP_DIR_ENV}"
        )
    return path


def fab_hash_of(app_dir: str | os.PathLike[str]) -> str:
    """SHA-256 of the FAB that ``flwr run``/``flwr build`` make from ``app_dir``
    (``fedsd.deploy.fab``: the same bytes, without walking ignored directories)."""
    from fedsd.deploy.fab import fab_hash

    try:
        return fab_hash(app_dir)
    except Exception as exc:  # whatever stops Flower from building it: cannot check
        raise AppRefused(f"cannot build the FAB of {app_dir}: {exc}") from None


def check_fab(
    content: bytes,
    declared: str,
    node_config: Mapping[str, Any],
    env: Mapping[str, str] | None = None,
    label: str = "",
) -> tuple[str, str]:
    """Return the FAB's SHA-256 and the entry that trusts it (``self``, ``trusted-apps``
    or ``trusted-apps-file``); raise ``AppRefused`` when this node does not run it.

    ``declared``: the hash the FAB comes filed under (the run's, which Flower installs
    and loads it by); ``label``: how to name it in a refusal (e.g. its FAB id).
    """
    digest = hashlib.sha256(content).hexdigest()
    if declared != digest:
        raise AppRefused(
            f"the FAB filed under {declared!r} hashes to {digest} (corrupt or substituted)"
        )
    try:
        pins = TrustedApps.from_node_config(node_config)
    except ValueError as exc:
        raise AppRefused(f"cannot check the app: {exc}") from None
    trusted = pins.resolve(env)
    if digest in trusted:
        return digest, trusted[digest]
    shown = ", ".join(f"{h} ({src})" for h, src in list(trusted.items())[:3])
    more = f" and {len(trusted) - 3} more" if len(trusted) > 3 else ""
    what = f"app {label} " if label else "app "
    raise AppRefused(
        f"this node runs only the apps its operator pinned; {what}with FAB sha256 {digest} "
        f"is not one of them (node config {TRUSTED_APPS_KEY}: {shown}{more})"
    )


# --------------------------------------------------------------------------- the guard


def install_guard(
    module: Any = None,
    env: Mapping[str, str] | None = None,
    log: Callable[[str], None] | None = None,
) -> None:
    """Wrap ``HOOKED`` in Flower's ``run_clientapp`` module (``module``, for tests).

    After the check passed and the FAB is installed, fedsd's own modules are dropped from
    ``sys.modules``: the ClientApp then imports the FAB's copy of fedsd (its directory
    comes first on ``sys.path``), not this installation's.
    """
    if module is None:
        from flwr.supernode.runtime import run_clientapp as module
    say = log if log is not None else _say
    runner = getattr(module, "run_clientapp", None)
    names = runner.__code__.co_names if callable(runner) else ()
    missing = [n for n in HOOKED if not callable(getattr(module, n, None)) or n not in names]
    if missing:
        raise RuntimeError(
            f"{REFUSAL_MARK}: Flower's {module.__name__} no longer calls "
            f"{', '.join(missing)}; the app check cannot run, so no ClientApp starts"
        )
    pull, install = module.pull_task_input, module.install_from_fab
    verdict: dict[str, Any] = {}

    def checked_pull(*args: Any, **kwargs: Any) -> Any:
        message, context, run, fab = pull(*args, **kwargs)
        try:
            label = f"{run.fab_id} {run.fab_version}".strip()
            if run.fab_hash != fab.hash_str:
                raise AppRefused(
                    f"the run's FAB hash {run.fab_hash!r} is not the delivered FAB's "
                    f"{fab.hash_str!r}"
                )
            digest, source = check_fab(fab.content, fab.hash_str, context.node_config, env, label)
            verdict["ok"] = digest
            say(f"fedsd node: app {label} (FAB sha256 {digest}) is pinned ({source})")
        except AppRefused as exc:
            verdict["refused"] = exc
        except Exception as exc:  # a check that breaks refuses, it never lets a FAB in
            verdict["refused"] = AppRefused(f"the app check failed: {exc!r}")
        return message, context, run, fab

    def checked_install(fab_file: Any, *args: Any, **kwargs: Any) -> Any:
        refused = verdict.get("refused")
        if refused is None:
            data = fab_file.read_bytes() if isinstance(fab_file, Path) else fab_file
            if "ok" not in verdict:
                refused = AppRefused("no checked FAB for this task (the check did not run)")
            elif hashlib.sha256(data).hexdigest() != verdict["ok"]:
                refused = AppRefused("the FAB to install is not the one that was checked")
        if refused is not None:
            say(f"fedsd node: {refused}")
            raise refused
        path = install(fab_file, *args, **kwargs)
        forget_fedsd_modules()
        return path

    module.pull_task_input = checked_pull
    module.install_from_fab = checked_install


def forget_fedsd_modules() -> None:
    """Drop ``fedsd`` and its submodules from ``sys.modules`` (see ``install_guard``)."""
    for name in [n for n in sys.modules if n == "fedsd" or n.startswith("fedsd.")]:
        del sys.modules[name]


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def flwr_clientapp() -> None:
    """Flower's ``flwr-clientapp``, with the app check in front of the FAB install."""
    from flwr.supernode.cli import flwr_clientapp as flower_clientapp

    install_guard()
    flower_clientapp()
