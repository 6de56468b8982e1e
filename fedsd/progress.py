"""Live progress of ``fedsd up --local``: round i/N, nodes, losses, epsilon, round time.

The view reads the lines the runner already relays (the ServerApp's ``fedsd round ...``,
``fedsd val_loss ...`` lines and the runner's own ``fedsd up: ...`` lines), so it needs no
metrics, no extra connection and no timer thread: it changes only when a line arrives.

* On a terminal every line is printed as before, and one status line stays at the bottom,
  redrawn in place (``\\r`` and erase-line) after each line.
* Elsewhere (CI, a log file) the lines pass through unchanged and the view adds one
  ``fedsd progress: ...`` line per completed round, and a last one at the end.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

_ROUND = re.compile(
    r"fedsd round (\d+)/(\d+): train_loss=(\S+) nodes=(\d+)/(\d+) failed=(\d+) "
    r"(?:rejected=(\d+) )?time=([0-9.]+)s(?: epsilon=(\S+))?"
)
_VAL = re.compile(r"fedsd val_loss (?:round (\d+)|initial adapter[^:]*): (\S+) \((\d+) nodes\)")
_ONLINE = re.compile(r"fedsd up: (\d+) SuperNode\(s\) online")
_RESUME = re.compile(r"fedsd resuming after round (\d+)")
_DONE = re.compile(r"fedsd done: ")
_END = re.compile(r"fedsd up: run \S+ (finished:\S+|ended as \S+)")


def _num(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:  # "n/a"
        return None


@dataclass
class Progress:
    """What the relayed lines said so far."""

    total: int | None = None
    round: int = 0
    sampled: int = 0
    replied: int = 0
    failed: int = 0
    rejected: int = 0  # replies the server's validation dropped
    train_loss: float | None = None
    val_loss: float | None = None
    val_of: int | None = None  # which round's aggregate val_loss scores (0 = base model)
    epsilon: float | None = None
    round_seconds: float | None = None
    nodes_online: int | None = None
    status: str = "starting"

    def feed(self, line: str) -> str | None:
        """Update from one line; return what happened ("round", "val", ...) or None."""
        if m := _ROUND.search(line):
            r = int(m.group(1))
            if r == self.round and self.status == "training":
                return None  # the same line again (stdout and the log both carry it)
            self.round, self.total = r, int(m.group(2))
            self.train_loss = _num(m.group(3))
            self.replied, self.sampled = int(m.group(4)), int(m.group(5))
            self.failed = int(m.group(6))
            self.rejected = int(m.group(7) or 0)
            self.round_seconds = float(m.group(8))
            if m.group(9) is not None:
                self.epsilon = _num(m.group(9))
            self.status = "training"
            return "round"
        if m := _VAL.search(line):
            of = int(m.group(1)) if m.group(1) else 0
            if of == self.val_of:
                return None
            self.val_of, self.val_loss = of, _num(m.group(2))
            return "val"
        if m := _ONLINE.search(line):
            self.nodes_online = int(m.group(1))
            self.status = "waiting for round 1"
            return "online"
        if m := _RESUME.search(line):
            self.round = int(m.group(1))
            self.status = "resumed"
            return "resume"
        if _DONE.search(line):
            self.status = "done"
            return "done"
        if m := _END.search(line):
            self.status = m.group(1).replace("ended as ", "").rstrip(":")
            return "end"
        return None

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
        if self.epsilon is not None:
            parts.append(f"eps {self.epsilon:.3g}" + (f"/{budget:g}" if budget else ""))
        if self.round_seconds is not None:
            parts.append(f"{self.round_seconds:.1f}s/round")
        if elapsed is not None:
            minutes, seconds = divmod(int(elapsed), 60)
            parts.append(f"{minutes}:{seconds:02d} elapsed")
        return " | ".join(parts)


class ProgressView:
    """Relays lines to ``out`` and shows :class:`Progress` (see the module docstring)."""

    def __init__(
        self,
        out: TextIO,
        *,
        tty: bool | None = None,
        total: int | None = None,
        budget: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.out = out
        self.tty = out.isatty() if tty is None else tty
        self.progress = Progress(total=total)
        self.budget = budget
        self.clock = clock
        self.start = clock()
        self._shown = False  # a status line is on screen (TTY)
        self._printed_round = 0

    def status(self) -> str:
        """The status line as it would be shown now."""
        return self.progress.render(self.budget, self.clock() - self.start)

    def __call__(self, line: str) -> None:
        """Relay ``line``, then update the view."""
        event = self.progress.feed(line)
        if self.tty:
            if "fedsd round" in line:
                line = f"\033[1m{line}\033[0m"
            self.out.write(f"\r\033[K{line}\n\033[7m{self.status()}\033[0m")
            self._shown = True
        else:
            self.out.write(line + "\n")
            if event == "round" and self.progress.round > self._printed_round:
                self._printed_round = self.progress.round
                self.out.write(f"fedsd progress: {self.status()}\n")
        self.out.flush()

    def close(self) -> None:
        """Leave the final state on its own line."""
        if self.tty:
            if self._shown:
                self.out.write(f"\r\033[K{self.status()}\n")
        elif self.progress.round or self.progress.val_of is not None:
            self.out.write(f"fedsd progress: {self.status()}\n")
        self.out.flush()
