"""Live progress of ``fedsd up --local``: round i/N, nodes, losses, epsilon, round time.

The figures come from the run's ``OUT/history.json`` (``fedsd.fl.history``), the record
the ServerApp writes before it prints a round's line; the runner tells the view its own
events (nodes online, the run's end) by calling it. The view needs no metrics, no extra
connection and no timer thread: it looks at history.json (a stat, read only when it
changed) whenever the runner relays a line, and changes only then.

* On a terminal every line is printed as before, and one status line stays at the bottom,
  redrawn in place (``\\r`` and erase-line) after each line.
* Elsewhere (CI, a log file) the lines pass through unchanged and the view adds one
  ``fedsd progress: ...`` line per completed round, right after that round's line, and a
  last one at the end.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from fedsd.fl.history import read_history, round_epsilon, round_head

# A line of Flower's own logger at DEBUG, as `flwr run --stream` relays the ServerApp's
# log: "12/02/2026 13:31:28:DEBUG:ServerApp finished running."
FLOWER_DEBUG = re.compile(r"\d\d/\d\d/\d{4} \d\d:\d\d:\d\d:DEBUG:")


@dataclass
class Progress:
    """What history.json and the runner said so far."""

    total: int | None = None
    round: int = 0
    sampled: int = 0
    replied: int = 0
    failed: int = 0
    rejected: int = 0  # replies the server's validation dropped
    train_loss: float | None = None
    val_loss: float | None = None
    val_of: int | None = None  # which round's aggregate val_loss scores (0 = base model)
    fid: float | None = None
    clip_score: float | None = None
    quality_of: int | None = None  # which round's aggregate fid/clip_score score (0 = base)
    epsilon: float | None = None
    round_seconds: float | None = None
    nodes_online: int | None = None
    status: str = "starting"
    # history.json was read before (the rounds a first read finds are resumed ones)
    read: bool = field(default=False, repr=False)

    def update(self, history: Mapping[str, Any]) -> str | None:
        """Take the figures from ``history`` (history.json's content); return what
        happened ("round": a round completed, "val": a validation loss arrived,
        "quality": image-quality figures arrived) or None."""
        first, self.read = not self.read, True
        if self.total is None and history.get("config", {}).get("num-server-rounds"):
            self.total = int(history["config"]["num-server-rounds"])
        rounds = history.get("rounds", [])
        event = None
        last = rounds[-1] if rounds else None
        if last is not None and int(last["round"]) != self.round:
            self.round = int(last["round"])
            self.train_loss = last.get("train_loss")
            self.replied, self.sampled = last["nodes_replied"], last["nodes_sampled"]
            self.failed, self.rejected = last["nodes_failed"], last.get("nodes_rejected", 0)
            self.round_seconds = last["seconds"]
            eps = (round_epsilon(r) for r in reversed(rounds))
            self.epsilon = next((e for e in eps if e is not None), self.epsilon)
            self.status = "resumed" if first else "training"
            event = "round"
        val_of, val_loss = _last_val(history)
        if val_of is not None and val_of != self.val_of:
            self.val_of, self.val_loss = val_of, val_loss
            event = event or "val"
        quality_of, quality = _last_quality(history)
        if quality_of is not None and quality_of != self.quality_of:
            self.quality_of = quality_of
            self.fid, self.clip_score = quality.get("fid"), quality.get("clip_score")
            event = event or "quality"
        if (
            last is not None
            and self.status == "training"
            and self.round == self.total
            and "eval_nodes_replied" in last
        ):
            self.status = "done"  # the ServerApp evaluated the last round: it is finishing
        return event

    def render(self, budget: float | None = None, elapsed: float | None = None) -> str:
        """One compact line: ``round 2/3 | nodes 2/2 | train 0.1234 | ...``."""
        total = self.total if self.total is not None else "?"
        parts = [f"round {self.round}/{total}"]
        if self.round and self.status in ("training", "resumed"):
            parts[0] += " done"
        elif self.status not in ("training", "resumed"):
            parts[0] += f" ({self.status})"
        if self.sampled:
            parts.append(f"nodes {self.replied}/{self.sampled}")
            if self.failed:
                parts[-1] += f" ({self.failed} failed)"
            if self.rejected:
                parts[-1] += f" ({self.rejected} rejected)"
        elif self.nodes_online is not None:
            parts.append(f"nodes online {self.nodes_online}")
        if self.train_loss is not None:
            parts.append(f"train {self.train_loss:.4f}")
        if self.val_of is not None:
            val = "n/a" if self.val_loss is None else f"{self.val_loss:.4f}"
            parts.append(f"val {val} ({'base' if self.val_of == 0 else f'r{self.val_of}'})")
        figures = [
            f"{name} {value:.1f}"
            for name, value in (("fid", self.fid), ("clip", self.clip_score))
            if value is not None
        ]
        if figures and self.quality_of is not None:
            of = "base" if self.quality_of == 0 else f"r{self.quality_of}"
            parts.append(" ".join(figures) + f" ({of})")
        if self.epsilon is not None:
            parts.append(f"eps {self.epsilon:.3g}" + (f"/{budget:g}" if budget else ""))
        if self.round_seconds is not None:
            parts.append(f"{self.round_seconds:.1f}s/round")
        if elapsed is not None:
            minutes, seconds = divmod(int(elapsed), 60)
            parts.append(f"{minutes}:{seconds:02d} elapsed")
        return " | ".join(parts)


def _last_val(history: Mapping[str, Any]) -> tuple[int | None, float | None]:
    """(which aggregate, its validation loss): the newest evaluated round's, else the
    initial adapter's (0), else (None, None)."""
    for r in reversed(history.get("rounds", [])):
        if "eval_nodes_replied" in r:
            return int(r["round"]), r.get("val_loss")
    if "baseline_val_loss" in history:
        return 0, history["baseline_val_loss"]
    return None, None


def _last_quality(history: Mapping[str, Any]) -> tuple[int | None, Mapping[str, Any]]:
    """(which aggregate, its QualityRecord): the newest round with image-quality figures,
    else the base model's (0), else (None, {})."""
    for r in reversed(history.get("rounds", [])):
        if r.get("quality"):
            return int(r["round"]), r["quality"]
    if history.get("baseline_quality"):
        return 0, history["baseline_quality"]
    return None, {}


class ProgressView:
    """Relays lines to ``out`` and shows :class:`Progress` (see the module docstring).

    ``history``: the run's history.json (it may not exist yet); the runner calls
    ``nodes_online`` and ``ended`` for its own events.
    """

    def __init__(
        self,
        out: TextIO,
        *,
        tty: bool | None = None,
        total: int | None = None,
        budget: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        history: str | Path | None = None,
    ) -> None:
        self.out = out
        self.tty = out.isatty() if tty is None else tty
        self.progress = Progress(total=total)
        self.budget = budget
        self.clock = clock
        self.start = clock()
        self.history = Path(history) if history is not None else None
        self._stamp: tuple[int, int, int] | None = None  # history.json as last read
        self._shown = False  # a status line is on screen (TTY)
        self._printed_round = 0

    def status(self) -> str:
        """The status line as it would be shown now."""
        return self.progress.render(self.budget, self.clock() - self.start)

    def refresh(self) -> str | None:
        """Re-read history.json if it changed since the last read (it is replaced
        atomically, so a changed file is a whole new one); return ``Progress.update``'s
        event."""
        if self.history is None:
            return None
        try:
            st = self.history.stat()
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            if stamp == self._stamp:
                return None
            history = read_history(self.history)
        except (OSError, ValueError):  # not written yet
            return None
        self._stamp = stamp
        return self.progress.update(history)

    def nodes_online(self, count: int) -> None:
        """The runner's event: ``count`` SuperNodes are online (shown until a round ends)."""
        self.refresh()
        self.progress.nodes_online = count
        if self.progress.status == "starting":
            self.progress.status = "waiting for round 1"

    def ended(self, status: str | None) -> None:
        """The runner's event: the run ended with Flower's ``status`` (finished:completed...)."""
        self.refresh()
        self.progress.status = str(status)

    def __call__(self, line: str) -> None:
        """Relay ``line``, then update the view. Flower's DEBUG lines are not relayed: the
        runner keeps every line in its log (``flwr-run.log``), the terminal is for people."""
        self.refresh()
        if FLOWER_DEBUG.match(line):
            return
        if self.tty:
            if "fedsd round" in line:
                line = f"\033[1m{line}\033[0m"
            self.out.write(f"\r\033[K{line}\n\033[7m{self.status()}\033[0m")
            self._shown = True
        else:
            self.out.write(line + "\n")
            if self._is_new_round_line(line):
                self.out.write(f"fedsd progress: {self.status()}\n")
        self.out.flush()

    def _is_new_round_line(self, line: str) -> bool:
        """Whether ``line`` is the ServerApp's line of a completed round not summarised
        yet: the progress line follows the round line (history.json may be ahead of the
        relayed lines)."""
        total = self.progress.total
        if total is None:  # history.json always has it with its rounds
            return False
        for r in range(self._printed_round + 1, self.progress.round + 1):
            if f"fedsd {round_head(r, total)}" in line:
                self._printed_round = r
                return True
        return False

    def close(self) -> None:
        """Leave the final state on its own line."""
        self.refresh()
        if self.tty:
            if self._shown:
                self.out.write(f"\r\033[K{self.status()}\n")
        elif self.progress.round or {self.progress.val_of, self.progress.quality_of} != {None}:
            self.out.write(f"fedsd progress: {self.status()}\n")
        self.out.flush()
