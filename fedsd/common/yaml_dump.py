"""One YAML writer for the files fedsd generates (Prometheus configuration, Kubernetes
ConfigMaps, Compose overrides): PyYAML's safe dumper, keys in their order, lists indented
under their key, as those files are written by hand in their projects' own examples.

Three wrappers say how a value is written where PyYAML's choice would differ:
:class:`Quoted` (a double-quoted string), :class:`Flow` (a short list or mapping on one
line) and :class:`Tagged` (a value under a local tag, e.g. Compose's ``!reset`` and
``!override``). Multi-line strings become literal blocks (``|``).
"""

from __future__ import annotations

from typing import Any

import yaml


class Quoted(str):
    """A string written double-quoted (addresses, names: as Prometheus' own examples)."""


class Flow:
    """A short list or mapping written on one line (``[a, b]``, ``{k: v}``)."""

    def __init__(self, value: list | dict) -> None:
        self.value = value


class Tagged:
    """``value`` (None, a list, a mapping or a :class:`Flow`) under the local tag ``tag``."""

    def __init__(self, tag: str, value: Any) -> None:
        self.tag, self.value = tag, value


class _Dumper(yaml.SafeDumper):
    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)

    def choose_scalar_style(self) -> str:
        # `!reset null`, not `!reset 'null'`: PyYAML quotes every scalar under a tag it
        # does not know, and Compose's documentation writes it plain.
        if self.event.tag and self.event.tag.startswith("!") and self.event.value == "null":
            return ""
        return super().choose_scalar_style()


def _represent_str(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    style = '"' if isinstance(data, Quoted) else ("|" if "\n" in data else None)
    return dumper.represent_scalar("tag:yaml.org,2002:str", str(data), style=style)


def _represent_collection(dumper: yaml.SafeDumper, tag: str | None, value: Any, flow: bool):
    if isinstance(value, list):
        return dumper.represent_sequence(tag or "tag:yaml.org,2002:seq", value, flow_style=flow)
    return dumper.represent_mapping(tag or "tag:yaml.org,2002:map", value, flow_style=flow)


def _represent_flow(dumper: yaml.SafeDumper, data: Flow) -> yaml.Node:
    return _represent_collection(dumper, None, data.value, True)


def _represent_tagged(dumper: yaml.SafeDumper, data: Tagged) -> yaml.Node:
    flow = isinstance(data.value, Flow)
    value = data.value.value if flow else data.value
    if value is None:
        return dumper.represent_scalar(data.tag, "null")
    return _represent_collection(dumper, data.tag, value, flow)


_Dumper.add_representer(str, _represent_str)
_Dumper.add_representer(Quoted, _represent_str)
_Dumper.add_representer(Flow, _represent_flow)
_Dumper.add_representer(Tagged, _represent_tagged)


def dump_yaml(data: Any) -> str:
    """``data`` as YAML, keys in their order (see the module docstring)."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)


def comment(text: str) -> str:
    """``text`` as YAML comment lines (empty for no text)."""
    return "".join(f"# {ln}".rstrip() + "\n" for ln in text.strip().splitlines())
