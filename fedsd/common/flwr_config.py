"""Flower's ``$FLWR_HOME/config.toml``, written once here (with tomli-w, as Flower does):
the connection that ``flwr run``/``flwr ls`` and the SuperLink exporter use."""

from __future__ import annotations

from pathlib import Path

import tomli_w

from fedsd.common.atomic import write_file


def write_connection(
    flwr_home: Path, name: str, address: str, ca: str | None, *, header: str = ""
) -> Path:
    """``flwr_home/config.toml`` with one connection ``name``, the default: TLS verified
    against ``ca``, or ``insecure = true`` without one."""
    conn: dict[str, object] = {"address": address}
    if ca:
        conn["root-certificates"] = ca
    else:
        conn["insecure"] = True
    body = tomli_w.dumps({"superlink": {"default": name, name: conn}})
    flwr_home.mkdir(parents=True, exist_ok=True)
    text = "".join(f"# {line}\n" for line in header.splitlines()) + body
    return write_file(flwr_home / "config.toml", text)
