"""The run config of ``fedsd up`` and the launchers: the app's defaults, ``--run-config``
pairs, and what ``flwr run --run-config`` accepts (TOML values on one line)."""

from __future__ import annotations

import json
import math
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedsd.common.errors import DeployError, ShardsError
from fedsd.config import ConfigError, RunConfig
from fedsd.deploy.pinning import TrustedApps, source_app_dir


def find_app_dir() -> Path:
    """The fedsd Flower app: the repository root holding the pyproject with ``[tool.flwr.app]``.

    The one place the package looks outside itself, on purpose: fedsd *is* the Flower app
    (``[tool.flwr.app]`` in its own pyproject.toml names ``fedsd.server_app:app`` and
    ``fedsd.client_app:app``), and ``flwr run`` builds the FAB from a directory holding that
    pyproject.toml and the package, which an installed wheel does not carry. So the app
    exists in a source checkout (an editable install finds it next to the package) or in an
    image that copies it (``/app``, passed as ``FEDSD_APP_DIR`` or ``--app-dir``); anywhere
    else this fails and says so, nothing is guessed.
    """
    root = source_app_dir()
    if root is None:
        import fedsd

        pyproject = Path(fedsd.__file__).resolve().parent.parent / "pyproject.toml"
        raise DeployError(
            f"no Flower app found: {pyproject} is missing or has no [tool.flwr.app] table. "
            "`fedsd up` needs the fedsd source tree (it builds the FAB from it); "
            "pass --app-dir DIR to use another app directory."
        )
    return root


def load_app_config(app_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The app's run-config defaults (``[tool.flwr.app.config]``), flattened like Flower does."""
    pyproject = Path(app_dir) / "pyproject.toml"
    if not pyproject.is_file():
        raise FileNotFoundError(f"no pyproject.toml in the Flower app directory {app_dir}")
    with pyproject.open("rb") as fh:
        data = tomllib.load(fh)
    app = data.get("tool", {}).get("flwr", {}).get("app")
    if not isinstance(app, dict):
        raise DeployError(f"{pyproject} has no [tool.flwr.app] table: not a Flower app")
    return _flatten(app.get("config", {}))


def parse_run_config(items: str | Sequence[str] | None) -> dict[str, Any]:
    """Parse ``"k1=v1 k2=v2"`` strings as ``flwr run --run-config`` does (values are TOML).

    A single item ending in ``.toml`` is read as a TOML file of overrides.
    """
    if items is None:
        return {}
    if isinstance(items, str):
        items = [items]
    items = [i for i in items if i and i.strip()]
    if len(items) == 1 and items[0].strip().endswith(".toml"):
        path = Path(items[0].strip()).expanduser()
        try:
            with path.open("rb") as fh:
                return _flatten(tomllib.load(fh))
        except FileNotFoundError as exc:
            raise ConfigError(f"run-config file not found: {path}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"invalid TOML in run-config file {path}: {exc}") from exc
    out: dict[str, Any] = {}
    for item in items:
        if item.strip().endswith(".toml"):
            raise ConfigError("a run-config TOML file cannot be combined with key=value pairs")
        matches = _PAIR_RE.findall(item)
        leftover = _PAIR_RE.sub("", item).strip()
        if leftover:
            raise ConfigError(
                f"invalid run config {item!r}: could not parse {leftover!r}; expected "
                "space-separated key=value pairs, e.g. 'lora-rank=4 lora-variant=\"ffa\"'"
            )
        try:
            parsed = tomllib.loads("\n".join(f"{k} = {v}" for k, v in matches))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(
                f"invalid run config {item!r}: {exc}; values must be TOML (bool, int, float "
                "or a quoted string)"
            ) from exc
        out.update(_flatten(parsed))
    return out


# Flower's own pattern (flwr.common.config.parse_config_args): unquoted values stop at
# whitespace, quoted ones may contain spaces.
_PAIR_RE = re.compile(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)")


def format_config_pairs(config: Mapping[str, Any]) -> str:
    """The inverse of :func:`parse_run_config`: ``k="v" k2=3`` that Flower parses back."""
    return " ".join(f"{key}={_toml_value(key, value)}" for key, value in config.items())


def build_run_config(
    app_dir: str | os.PathLike[str],
    overrides: Mapping[str, Any] | str | Sequence[str] | None = None,
    *,
    rounds: int | None = None,
    model: str | None = None,
    out: str | os.PathLike[str] | None = None,
    validate: bool = True,
    privacy: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return ``(overrides, effective)`` for a run; refuse bad values before anything starts.

    ``overrides`` are what ``flwr run --run-config`` receives; ``effective`` is the app
    defaults with them applied. ``rounds``/``model`` override ``num-server-rounds``/``model``
    (an existing local model directory becomes absolute, since the services run elsewhere)
    and ``out`` sets ``out-dir`` (absolute) when the app defines that key. Every override key
    must exist in the app's ``[tool.flwr.app.config]`` (the SuperLink would refuse the run
    otherwise). With ``validate`` the result goes through ``RunConfig.from_mapping``.
    """
    defaults = load_app_config(app_dir)
    if isinstance(overrides, Mapping):
        merged: dict[str, Any] = _flatten(dict(overrides))
    else:
        merged = parse_run_config(overrides)
    if rounds is not None:
        merged["num-server-rounds"] = rounds
    if privacy is not None:
        merged["privacy"] = privacy
    if model is not None:
        path = Path(model).expanduser()
        merged["model"] = str(path.resolve()) if path.is_dir() else model
    if out is not None and "out-dir" in defaults:
        merged["out-dir"] = str(Path(out).expanduser().resolve())
    unknown = sorted(set(merged) - set(defaults))
    if unknown:
        raise ConfigError(
            f"invalid run config: unknown key(s) {', '.join(unknown)}; the app "
            f"({Path(app_dir) / 'pyproject.toml'}) defines: {', '.join(sorted(defaults))}"
        )
    for key, value in merged.items():
        _toml_value(key, value)  # refuse what cannot be passed to flwr on the command line
    effective = {**defaults, **merged}
    if validate:
        RunConfig.from_mapping(effective)
    return merged, effective


def check_privacy_for_nodes(cfg: RunConfig, nodes: int) -> None:
    """Refuse, before anything starts, a privacy setting these ``nodes`` cannot run."""
    if "secagg" not in cfg.privacy.components:
        return
    from fedsd.privacy import check_secagg

    if nodes < 2:
        raise ConfigError(f"privacy={cfg.privacy.privacy!r} needs at least 2 nodes, got {nodes}")
    sampled = min(nodes, max(cfg.min_nodes, math.ceil(cfg.fraction_train * nodes)))
    check_secagg(sampled, cfg.privacy)


def check_shards(shards: str | os.PathLike[str], nodes: int) -> Path:
    """Make sure ``shards/shard-<i>/train/metadata.jsonl`` exists for every node."""
    root = Path(shards).expanduser().resolve()
    hint = f"create them with: fedsd shards --num-shards {nodes} --out {root}"
    if not root.is_dir():
        raise ShardsError(f"shard directory {root} does not exist; {hint}")
    for i in range(nodes):
        meta = root / f"shard-{i}" / "train" / "metadata.jsonl"
        if not meta.is_file():
            raise ShardsError(
                f"shard-{i} (for SuperNode {i} of {nodes}) is missing or incomplete: "
                f"{meta} not found; {hint}"
            )
    return root


_RUNNER_NODE_KEYS = ("partition-id", "num-partitions", "shard-dir", "cache-dir")


def node_config_pairs(items: Mapping[str, Any] | str | Sequence[str] | None) -> dict[str, Any]:
    """``--node-config`` for every node: parsed, its privacy policy validated; the keys
    ``fedsd up`` sets per node are refused (they would give every node the same shard)."""
    from fedsd.privacy.node_policy import NodePolicy

    pairs = dict(items) if isinstance(items, Mapping) else parse_run_config(items)
    taken = sorted(set(pairs) & set(_RUNNER_NODE_KEYS))
    if taken:
        raise ConfigError(f"--node-config cannot set {', '.join(taken)}: fedsd up sets them")
    try:
        NodePolicy.from_node_config(pairs)
        TrustedApps.from_node_config(pairs)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return pairs


def is_fedsd_app(app_dir: Path) -> bool:
    """Whether the app's ClientApp is fedsd's (whose handlers import torch and diffusers)."""
    try:
        data = tomllib.loads((Path(app_dir) / "pyproject.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return False
    ref = data.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {})
    return str(ref.get("clientapp", "")).startswith("fedsd.")


def _flatten(raw: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested tables become dotted keys, as Flower's ``flatten_dict`` does."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(_flatten(value, full))
        else:
            out[full] = value
    return out


def _toml_value(key: str, value: Any) -> str:
    """A value as TOML that Flower's key=value regex keeps in one piece."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        if '"' not in value:
            return json.dumps(value, ensure_ascii=False)
        if "'" not in value and "\n" not in value:
            return f"'{value}'"
        raise ConfigError(
            f"invalid run config: {key}={value!r}; a string value cannot contain both ' and \""
        )
    raise ConfigError(f"invalid run config: {key}={value!r}; expected a bool, int, float or string")
