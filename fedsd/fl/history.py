"""The round record of ``OUT/history.json``: its one definition, its reader, its line.

The ServerApp builds one ``RoundRecord`` per round, ``RunDir`` (``fedsd.fl.checkpoint``)
appends it to ``history.json`` (the commit point) and only then the ServerApp prints the
round's ``fedsd round ...`` line, formatted here by ``round_line``. The live view of
``fedsd up --local`` (``fedsd.observability.progress``) reads the same file with
``read_history`` instead of parsing that line back. Stdlib only: the runner imports it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NotRequired, TypedDict

HISTORY = "history.json"


class RoundRecord(TypedDict):
    """One entry of ``history.json``'s ``rounds`` (keys and order as written there)."""

    round: int
    train_loss: float | None  # images-weighted; None when no contributing node reported one
    val_loss: float | None  # of this round's aggregate, filled in by the next exchange
    nodes_sampled: int
    nodes_replied: int  # updates that passed validation
    nodes_rejected: int  # replies the validation dropped
    nodes_failed: int
    images: int
    bytes_sent: int
    bytes_received: int
    seconds: float
    max_node_train_seconds: float
    nodes: list[dict[str, Any]]  # each contributing node's metrics, with its node_id
    privacy: list[dict[str, Any]]  # PrivacyRecord.to_dict() of nodes and server
    secagg_stages: NotRequired[list[dict[str, Any]]]  # SecAgg+ rounds only
    eval_nodes_replied: NotRequired[int]  # set with val_loss: the aggregate was evaluated
    quality: NotRequired[dict[str, Any]]  # FID/KID/CLIP of the aggregate (fedsd.quality)


def read_history(path: str | Path) -> dict[str, Any]:
    """``history.json`` as written by ``RunDir`` (identity, config, run_key, rounds, the
    baseline validation loss)."""
    return json.loads(Path(path).read_text())


def round_epsilon(record: RoundRecord) -> float | None:
    """The largest cumulative epsilon any privacy record of the round states, if any."""
    eps = [float(p["epsilon"]) for p in record["privacy"] if p.get("epsilon") is not None]
    return max(eps) if eps else None


def fmt_loss(x: float | None) -> str:
    """A loss as the terminal lines show it (``n/a`` when there is none)."""
    return "n/a" if x is None else f"{x:.4f}"


def round_head(server_round: int, total: int) -> str:
    """The start of round ``server_round``'s line: ``round 2/3: ``."""
    return f"round {server_round}/{total}: "


def round_line(record: RoundRecord, total: int) -> str:
    """The human line of a round (printed with the ``fedsd `` prefix)."""
    eps = round_epsilon(record)
    return (
        round_head(record["round"], total) + f"train_loss={fmt_loss(record['train_loss'])} "
        f"nodes={record['nodes_replied']}/{record['nodes_sampled']} "
        f"failed={record['nodes_failed']} rejected={record['nodes_rejected']} "
        f"time={record['seconds']:.1f}s" + (f" epsilon={eps:.4g}" if eps is not None else "")
    )


def quality_line(evaluated_round: int, quality: dict[str, Any]) -> str:
    """The human line of one quality evaluation (``fedsd.quality``; 0 = the base model)."""

    def fig(key: str, fmt: str) -> str:
        value = quality.get(key)
        return "n/a" if value is None else format(value, fmt)

    what = "base model" if evaluated_round == 0 else f"round {evaluated_round}"
    line = (
        f"quality {what}: fid={fig('fid', '.4g')} kid={fig('kid', '.4g')} "
        f"clip_score={fig('clip_score', '.4g')} ({quality.get('nodes', 0)} nodes, "
        f"{quality.get('generated_images', 0)} generated / {quality.get('real_images', 0)} "
        f"held-out images, refused={quality.get('nodes_refused', 0)} "
        f"failed={quality.get('nodes_failed', 0)} rejected={quality.get('nodes_rejected', 0)}, "
        f"{quality.get('seconds', 0.0):.1f}s)"
    )
    extractors = str(quality.get("extractors") or "")
    return line + (f" [{extractors}]" if extractors and "NOT real" in extractors else "")
