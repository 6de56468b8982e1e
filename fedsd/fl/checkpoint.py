"""The run's output directory: per-round adapters, ``latest/``, ``history.json``, resume.

Layout of ``OUT``::

    round-<n>/pytorch_lora_weights.safetensors   the aggregate after round n
    latest/                                       a copy of the newest round
    history.json                                  run identity and one record per round

Every write is atomic and fsync'd (``fedsd.common.atomic``), in the order round-<n>/, latest/,
``history.json``: ``history.json`` is the commit point, so after a kill at any moment every
round it records has its adapter on disk, and a restarted ServerApp resumes after its last
recorded round from that round's adapter. Opening OUT removes the temporaries a killed
writer left and puts latest/ back to the last recorded round. A full disk stops the run
with ``DiskFullError``, the last good checkpoint untouched.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedsd.common.atomic import is_disk_full, remove_temporaries, write_dir, write_file
from fedsd.config import RunConfig
from fedsd.fl.history import HISTORY, RoundRecord, read_history
from fedsd.fl.validation import non_finite
from fedsd.ml.model import load_adapter_arrays, save_adapter

# Settings that must not change when resuming: they define what the adapter is.
IDENTITY_KEYS = ("model", "lora-rank", "lora-alpha", "lora-targets", "lora-variant", "seed")


class ResumeError(RuntimeError):
    """OUT holds a run that this configuration cannot continue."""


class DiskFullError(RuntimeError):
    """OUT's file system is full: the run stops, its last good checkpoint kept."""


def _identity(cfg: RunConfig) -> dict[str, Any]:
    m = cfg.to_mapping()
    out = {k: m[k] for k in IDENTITY_KEYS}
    out["privacy"] = cfg.privacy.privacy  # a guarantee must not change mid-run
    return out


@dataclass
class RunDir:
    """Reads and writes one run's output directory."""

    root: Path
    cfg: RunConfig
    history: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, cfg: RunConfig) -> RunDir:
        """Open (creating if needed) ``cfg.out_dir``; refuse a foreign run's directory."""
        root = Path(cfg.out_dir).expanduser().resolve()
        root.mkdir(parents=True, exist_ok=True)
        remove_temporaries(root)
        rd = cls(root=root, cfg=cfg)
        path = root / HISTORY
        if path.is_file():
            rd.history = read_history(path)
            theirs = rd.history.get("identity", {})
            ours = _identity(cfg)
            diff = {k: (theirs.get(k), ours[k]) for k in ours if theirs.get(k) != ours[k]}
            if diff and rd.completed_rounds:
                detail = ", ".join(f"{k}: {a!r} there vs {b!r} now" for k, (a, b) in diff.items())
                raise ResumeError(
                    f"{root} holds a run with different settings ({detail}); "
                    "use another out-dir or the same settings to resume it"
                )
        if not rd.history.get("rounds"):
            rd.history = {
                "identity": _identity(cfg),
                "created": time.time(),
                "run_key": secrets.token_hex(8),
                "rounds": [],
            }
        rd.history.setdefault("run_key", secrets.token_hex(8))
        rd.history["config"] = cfg.to_mapping()
        rd._repair_latest()
        return rd

    def _repair_latest(self) -> None:
        """latest/ := round-<last recorded>/ when a kill left it missing or a round ahead."""
        n = self.completed_rounds
        src, latest = self.round_dir(n), self.root / "latest"
        if n == 0 or not src.is_dir():
            return
        files = {p.name: p.read_bytes() for p in sorted(src.iterdir()) if p.is_file()}
        current = (
            {p.name: p.read_bytes() for p in sorted(latest.iterdir()) if p.is_file()}
            if latest.is_dir()
            else None
        )
        if current != files:
            self.guard(f"{latest}", lambda: write_dir(latest, files))

    @property
    def run_key(self) -> str:
        """This run's key: nodes keep their privacy ledgers per run key, so a resumed run
        keeps accumulating epsilon and a new run in a new OUT starts from zero."""
        return str(self.history["run_key"])

    @property
    def completed_rounds(self) -> int:
        """The last round recorded in history.json (0 if none)."""
        rounds = self.history.get("rounds", [])
        return int(rounds[-1]["round"]) if rounds else 0

    def round_dir(self, server_round: int) -> Path:
        """Where round ``server_round``'s adapter lives."""
        return self.root / f"round-{server_round}"

    def resume_arrays(self) -> dict[str, np.ndarray] | None:
        """The adapter of the last completed round, or None for a fresh run."""
        n = self.completed_rounds
        if n == 0:
            return None
        d = self.round_dir(n)
        if not d.is_dir():
            raise ResumeError(f"history.json records round {n} but {d} is missing")
        return load_adapter_arrays(d)

    def save_round(
        self, server_round: int, arrays: dict[str, np.ndarray], record: RoundRecord
    ) -> None:
        """Adapter to round-<n>/ and latest/, then the history record (the commit point).

        Refuses (ValueError, nothing written) an adapter holding NaN or Inf: it would
        become ``latest/`` and the start of every resume.
        """
        bad = non_finite(arrays)
        if bad:
            raise ValueError(
                f"refusing to write round {server_round}'s adapter to {self.root}: "
                f"non-finite values in {', '.join(sorted(bad)[:3])}"
                + (f" and {len(bad) - 3} more tensors" if len(bad) > 3 else "")
            )
        info = {"round": server_round, "model": self.cfg.model, "time": time.time()}
        rdir, latest = self.round_dir(server_round), self.root / "latest"
        self.guard(f"{rdir}", lambda: save_adapter(arrays, rdir, self.cfg, info))
        self.guard(f"{latest}", lambda: save_adapter(arrays, latest, self.cfg, info))
        before = self.history["rounds"]
        self.history["rounds"] = [r for r in before if int(r["round"]) < server_round] + [record]
        try:
            self._write_history()
        except BaseException:
            self.history["rounds"] = before  # memory stays what disk says
            raise

    def val_loss_pending(self, server_round: int) -> bool:
        """Whether round ``server_round`` (0 = initial adapter) still lacks its val loss."""
        if server_round == 0:
            return "baseline_val_loss" not in self.history
        return any(
            int(r["round"]) == server_round and "eval_nodes_replied" not in r
            for r in self.history["rounds"]
        )

    def set_val_loss(self, server_round: int, loss: float | None, nodes: int) -> None:
        """Record the validation loss of round ``server_round``'s aggregate."""
        if server_round == 0:
            self.history["baseline_val_loss"] = loss
            self.history["baseline_eval_nodes"] = nodes
        else:
            for r in self.history["rounds"]:
                if int(r["round"]) == server_round:
                    r["val_loss"] = loss
                    r["eval_nodes_replied"] = nodes
        self._write_history()

    def quality_pending(self, server_round: int) -> bool:
        """Whether round ``server_round``'s aggregate (0 = base model) lacks its quality
        figures (``fedsd.quality``): a run killed between the round and its scoring scores
        it when it resumes."""
        if server_round == 0:
            return "baseline_quality" not in self.history
        return any(
            int(r["round"]) == server_round and "quality" not in r for r in self.history["rounds"]
        )

    def set_quality(self, server_round: int, quality: dict[str, Any]) -> None:
        """Record the quality figures of round ``server_round``'s aggregate (0 = base model)."""
        if server_round == 0:
            self.history["baseline_quality"] = quality
        else:
            for r in self.history["rounds"]:
                if int(r["round"]) == server_round:
                    r["quality"] = quality
        self._write_history()

    def _write_history(self) -> None:
        path = self.root / HISTORY
        # strict JSON: a NaN or Inf (a node's metric) is written as null, never as NaN
        text = json.dumps(_finite(self.history), indent=2, default=_json_default, allow_nan=False)
        text += "\n"
        self.guard(f"{path}", lambda: write_file(path, text))

    def guard(self, what: str, write: Callable[[], object]) -> None:
        """Run ``write`` (anything written to OUT); a full disk becomes a ``DiskFullError``
        that names the last good round and says how to go on."""
        try:
            write()
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            raise DiskFullError(
                f"disk full writing {what} (out-dir {self.root}): {exc.strerror}; the last "
                f"good checkpoint is round {self._committed_round()}; free space and rerun "
                "the same command to resume"
            ) from exc

    def _committed_round(self) -> int:
        """The last round history.json on disk records (memory may be one ahead)."""
        try:
            rounds = read_history(self.root / HISTORY).get("rounds", [])
            return int(rounds[-1]["round"]) if rounds else 0
        except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError):
            return 0


def _finite(x: Any) -> Any:
    """``x`` with every non-finite float (nested in dicts and lists) replaced by None."""
    if isinstance(x, float | np.floating):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x)}")
