"""``fedsd report OUT``: a run's image quality against its privacy spend, per round.

One row per point of ``OUT/history.json``: round 0 (the base model: ``baseline_val_loss``
and ``baseline_quality``), then every round: its validation loss, FID, KID and CLIP score
(its ``quality`` record, written every ``eval-every`` rounds), the largest cumulative
epsilon its privacy records state (``fedsd.fl.history.round_epsilon``) and the
generated/real image counts the figures rest on. A round without a quality record shows
``-`` for those; a figure its record could not compute shows ``n/a``.

Reads ``history.json`` only (stdlib, no torch, no Flower), so it works on any machine
that has the run's output.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fedsd.fl.history import HISTORY, fmt_loss, read_history, round_epsilon

COLUMNS = ("round", "val_loss", "fid", "kid", "clip_score", "epsilon", "generated/real")


def _row(
    round_: int, val_loss: float | None, quality: dict[str, Any] | None, eps: float | None
) -> dict[str, Any]:
    q = quality or {}
    return {
        "round": round_,
        "val_loss": val_loss,
        "evaluated": quality is not None,
        "fid": q.get("fid"),
        "kid": q.get("kid"),
        "clip_score": q.get("clip_score"),
        "epsilon": eps,
        "generated_images": q.get("generated_images"),
        "real_images": q.get("real_images"),
        "clip_images": q.get("clip_images"),
        "nodes": q.get("nodes"),
        "extractors": q.get("extractors"),
    }


def load_quality_report(out_dir: str | Path) -> dict[str, Any]:
    """The rows of ``fedsd report``: round 0 (the base model, when the run evaluated it),
    then each round of ``history.json``, in order."""
    out = Path(out_dir)
    if not out.is_dir():
        raise FileNotFoundError(
            f"{out} not found: run a federation first (`fedsd up --out {out} ...`)"
        )
    path = out / HISTORY
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {out} has no finished round yet; run (or resume) "
            f"`fedsd up --out {out} ...` until a round has ended"
        )
    hist = read_history(path)
    rows = []
    if "baseline_val_loss" in hist or hist.get("baseline_quality") is not None:
        rows.append(_row(0, hist.get("baseline_val_loss"), hist.get("baseline_quality"), None))
    for record in hist.get("rounds", []):
        rows.append(
            _row(
                record["round"],
                record.get("val_loss"),
                record.get("quality"),
                round_epsilon(record),
            )
        )
    return {"out": str(out.resolve()), "rows": rows}


def _num(value: float | None, spec: str) -> str:
    if value is None:
        return "n/a"
    return "inf" if math.isinf(value) else format(value, spec)


def format_quality_report(report: dict[str, Any]) -> str:
    """A plain-text table for the terminal."""
    table = [COLUMNS]
    for row in report["rows"]:
        if row["evaluated"]:
            quality = (
                _num(row["fid"], ".4g"),
                _num(row["kid"], ".4g"),
                _num(row["clip_score"], ".4g"),
            )
            images = f"{row['generated_images'] or 0}/{row['real_images'] or 0}"
        else:
            quality, images = ("-", "-", "-"), "-"
        eps = "-" if row["epsilon"] is None else _num(row["epsilon"], ".4g")
        round_ = "0 (base)" if row["round"] == 0 else str(row["round"])
        table.append((round_, fmt_loss(row["val_loss"]), *quality, eps, images))
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
    lines = [f"quality report for {report['out']}", ""]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table]
    evaluated = [r for r in report["rows"] if r["evaluated"]]
    if not report["rows"]:
        lines.append("(no rounds recorded yet)")
    elif not evaluated:
        lines.append("(no quality records: the run evaluated no image quality)")
    extractors = sorted({r["extractors"] for r in evaluated if r.get("extractors")})
    if extractors:
        lines += ["", "extractors: " + "; ".join(extractors)]
    return "\n".join(lines)
