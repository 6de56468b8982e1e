"""Reading a node's reply on the server: metrics, update, validation loss, privacy records.

Everything here is the node's word, so nothing is trusted: a value that is missing, of
the wrong type, NaN or Inf reads as absent (or the reply as undecodable), never as a
crash of the ServerApp or a NaN in ``history.json``. Whether an update may enter the
aggregate is ``fedsd.fl.validation``'s decision; this module only takes replies apart.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedsd.fl.payload import FLAT, read_vector

if TYPE_CHECKING:
    from flwr.app import Message

#: The data owner's ledger figures a privacy record may carry
#: (``fedsd.privacy.owner_ledgers`` compares and stores them).
LEDGER_FIGURES = ("prior_steps", "prior_epsilon", "lifetime_steps", "lifetime_epsilon")


@dataclass(frozen=True)
class Unreadable:
    """An update that could not be decoded, and why: ``check_reply`` rejects it as bad-type."""

    reason: str


def node_records(config: Any, node: int) -> list[dict[str, Any]]:
    """A node's privacy records (JSON in its reply), tagged with its node id."""
    raw = config.get("records", "[]") if config else "[]"
    try:
        records = json.loads(str(raw))
    except ValueError:
        return []
    if not isinstance(records, list):
        return []
    records = [r for r in records if sane_record(r)]  # a node's JSON is untrusted too
    for r in records:
        r["node_id"] = node
    return records


def sane_record(r: Any) -> bool:
    """Whether a node's privacy record has the fields the log lines and metrics read."""

    def number(x: Any) -> bool:  # NaN or Inf would poison the ledgers and history.json
        return x is None or finite_number(x)

    return (
        isinstance(r, dict)
        and isinstance(r.get("mechanism"), str)
        and r["mechanism"] != "secagg+"  # the server writes that record itself
        and all(number(r.get(k)) for k in ("epsilon", "delta", "noise_multiplier", "sample_rate"))
        and (r.get("epsilon") is None or "delta" in r)
        and all(number(r.get(k)) for k in LEDGER_FIGURES)
        and (r.get("owner") is None or isinstance(r["owner"], str))
    )


def finite_number(x: Any) -> bool:
    """An int or float (not a bool) that is a finite float (a node's JSON int may not be)."""
    if not isinstance(x, int | float) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(float(x))
    except OverflowError:
        return False


def num(metrics: Any, key: str, default: float = 0.0) -> float:
    """A scalar metric as float; ``default`` when absent, not a number (a list), NaN or Inf."""
    x = metrics.get(key, default)
    return float(x) if finite_number(x) else default


def metrics_of(reply: Message) -> dict[str, Any] | None:
    """The reply's ``metrics`` record as a dict, None when it has none."""
    records = reply.content.metric_records
    return dict(records["metrics"]) if "metrics" in records else None


def update_of(reply: Message) -> tuple[Any, int]:
    """(the reply's flat update or None, its bytes); ``Unreadable`` if undecodable."""
    records = reply.content.config_records
    if "update" not in records or FLAT not in records["update"]:
        return None, 0
    try:
        flat = read_vector(records["update"])
    except Exception as exc:  # whatever bytes or dtype a node sent: refused, not a crash
        return Unreadable(str(exc)[:200]), 0
    return flat, int(flat.nbytes)


def val_pair(metrics: dict[str, Any] | None) -> tuple[float, float] | None:
    """(val-loss, val-examples) when the reply carries both as numbers."""
    if metrics is None or "val-loss" not in metrics:
        return None
    loss, n = num(metrics, "val-loss", math.nan), num(metrics, "val-examples", math.nan)
    return None if math.isnan(n) else (loss, n)
