"""A run's privacy records for people: the ServerApp's line per record as each round ends
(``privacy_lines``), and ``fedsd privacy-report OUT``, per round and node.

``fedsd privacy-report`` reads ``OUT/history.json`` only (no torch, no Flower), so it
works on any machine that has the run's output: one row per record (mechanism, noise
multiplier, clip, sample rate, cumulative steps, cumulative epsilon and delta), then each
data owner's final budget, once per owner and mechanism: this run's epsilon and, beside
it, the lifetime epsilon of everything the owner's shard was trained on
(``fedsd.privacy.node``). Owners are named by their shard's id (16 hex digits); Flower's
node ids change whenever the SuperLink's state does, so they only label the rows.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

COLUMNS = ("round", "who", "mechanism", "noise_mult", "clip", "sample_rate", "steps", "epsilon")


def load_report(out_dir: str | Path) -> dict[str, Any]:
    """The run's privacy mode and settings, every record (tagged with its round), and the
    last record per (data owner, mechanism): the budget spent by the end of the run
    (records without an owner, from older runs or the server, by node id)."""
    path = Path(out_dir) / "history.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {out_dir} a fedsd run directory?")
    hist = json.loads(path.read_text())
    config = hist.get("config", {})
    settings = {
        k: v for k, v in config.items() if k == "privacy" or k.startswith(("dp-", "secagg-"))
    }
    records = []
    for r in hist.get("rounds", []):
        for rec in r.get("privacy", []):
            records.append({**rec, "round": r["round"]})
    final: dict[str, dict[str, Any]] = {}
    for rec in records:
        who = f"data owner {rec['owner']}" if rec.get("owner") else _who(rec)
        final[f"{who} {rec['mechanism']}"] = rec
    return {
        "out": str(Path(out_dir).resolve()),
        "privacy": config.get("privacy", "none"),
        "settings": settings,
        "rounds": len(hist.get("rounds", [])),
        "records": records,
        "final": final,
    }


def _who(rec: dict[str, Any]) -> str:
    node = f"node {rec['node_id']}" if rec.get("node_id") is not None else "server"
    return f"{rec['owner']} ({node})" if rec.get("owner") else node


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.4g}"
    return str(value)


def format_report(report: dict[str, Any]) -> str:
    """A plain-text table for the terminal."""
    lines = [
        f"privacy report for {report['out']}",
        f"mode: {report['privacy']}   rounds: {report['rounds']}",
        "settings: " + ", ".join(f"{k}={v}" for k, v in sorted(report["settings"].items())),
        "",
    ]
    rows = [COLUMNS]
    for rec in report["records"]:
        rows.append(
            (
                str(rec["round"]),
                _who(rec),
                rec["mechanism"],
                _cell(rec.get("noise_multiplier")),
                _cell(rec.get("clip")),
                _cell(rec.get("sample_rate")),
                _cell(rec.get("steps")),
                _cell(rec.get("epsilon"))
                + ("" if rec.get("delta") is None else f" (delta {rec['delta']:.3g})"),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    if not report["records"]:
        lines.append("(no privacy records: the run used privacy=none)")
    lines.append("")
    lines.append("by the end of the run (cumulative):")
    for key, rec in sorted(report["final"].items()):
        if rec.get("epsilon") is not None:
            line = f"  {key}: epsilon {_cell(rec['epsilon'])} at delta {rec['delta']:.3g}"
            if rec.get("lifetime_epsilon") is not None:
                line += (
                    f" this run ({_cell(rec.get('steps'))} steps); lifetime epsilon "
                    f"{_cell(rec['lifetime_epsilon'])} ({_cell(rec.get('lifetime_steps'))} steps)"
                )
            lines.append(line)
    return "\n".join(lines)


def privacy_lines(record: Mapping[str, Any]) -> list[str]:
    """One terminal line per privacy record of a round (a history.json round record)."""
    lines = []
    for p in record.get("privacy", []):
        who = f"node {p['node_id']}" if p.get("node_id") is not None else "server"
        head = f"privacy round {record['round']}: {who} {p['mechanism']}"
        if p["mechanism"] == "secagg+":
            x = p["extra"]
            lines.append(
                f"{head}: {x['aggregated_nodes']} nodes, threshold {x['threshold_shares']} of "
                f"{x['neighbourhood']}, tolerates {x['dropouts_tolerated']} dropout(s)"
            )
            continue
        if p.get("epsilon") is None:
            lines.append(f"{head}: clip {p.get('clip')}")
            continue
        parts = [f"epsilon={p['epsilon']:.4g}", f"delta={p['delta']:.3g}"]
        if p.get("noise_multiplier") is not None:
            parts.append(f"noise_multiplier={p['noise_multiplier']:.4g}")
        parts.append(f"clip={p.get('clip')}")
        if p.get("sample_rate") is not None:
            parts.append(f"sample_rate={p['sample_rate']:.4g}")
        parts.append(f"steps={p.get('steps')}")
        if p.get("lifetime_epsilon") is not None:  # everything the owner's shard spent
            parts.append(
                f"| data owner {p['owner']}: lifetime epsilon={p['lifetime_epsilon']:.4g} "
                f"steps={p['lifetime_steps']}"
            )
        lines.append(f"{head} (cumulative): " + " ".join(parts))
    return lines
