"""Ledgers that survive process restarts: a node's DP-SGD history and its output-DP
releases, each a JSON file written atomically under a lock (every ClientApp message is a
fresh process)."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from fedsd.common.atomic import write_file
from fedsd.privacy.accounting import (
    ComposedBudget,
    compose_releases,
    history_entry,
    history_epsilon,
)
from fedsd.privacy.mechanisms import OutputNoiseReport

_ACCOUNTANT_FORMAT = "fedsd-rdp-accountant/1"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock beside ``path`` (POSIX), so two processes never lose a record."""
    try:
        import fcntl
    except ImportError:  # not POSIX: single writer assumed
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class NodeAccountant:
    """A node's cumulative DP-SGD history, in the shape of Opacus ``RDPAccountant.history``
    (``[(noise_multiplier, sample_rate, steps), ...]``), kept in a JSON file.

    Every ClientApp message is a fresh process, so the history lives on disk and epsilon is
    always recomputed from all of it (cumulative over rounds, not per round). ``record``
    re-reads the file under a lock, appends and saves atomically (temp file + rename), so a
    crash never leaves a half-written file and never forgets spent budget. A missing file is
    an empty history; a corrupt one is an error, never a silent reset.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Read the history stored at ``path`` (empty if there is no file yet)."""
        self.path = Path(path)
        self.history: list[tuple[float, float, int]] = _read_history(self.path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> NodeAccountant:
        """The accountant stored at ``path`` (empty if there is no file yet)."""
        return cls(path)

    @property
    def steps(self) -> int:
        """DP-SGD steps recorded so far."""
        return sum(s for _, _, s in self.history)

    def record(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """Add ``steps`` steps at (noise_multiplier, sample_rate) and save."""
        self.extend([(noise_multiplier, sample_rate, steps)])

    def extend(self, history: Iterable[Any]) -> None:
        """Add entries (e.g. an Opacus accountant's ``history`` for this round) and save."""
        new = [history_entry(h) for h in history]
        with _file_lock(self.path):
            self.history = _read_history(self.path)
            for nm, q, s in new:
                if s == 0:
                    continue
                if self.history and self.history[-1][:2] == (nm, q):
                    self.history[-1] = (nm, q, self.history[-1][2] + s)
                else:
                    self.history.append((nm, q, s))
            self.save()

    def save(self) -> None:
        """Write the history atomically and durably (``fedsd.common.atomic``)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"format": _ACCOUNTANT_FORMAT, "history": [list(h) for h in self.history]}
        write_file(self.path, json.dumps(payload))

    def epsilon(self, delta: float) -> float:
        """Cumulative epsilon at ``delta``, from a fresh Opacus ``RDPAccountant``."""
        return history_epsilon(self.history, delta)

    def budget_spent(
        self,
        target_epsilon: float,
        delta: float,
        next_steps: int,
        noise_multiplier: float,
        sample_rate: float,
    ) -> bool:
        """Whether taking ``next_steps`` more steps would push epsilon above the target."""
        planned = [*self.history, history_entry((noise_multiplier, sample_rate, next_steps))]
        return history_epsilon(planned, delta) > target_epsilon


def _read_history(path: Path) -> list[tuple[float, float, int]]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    try:
        data = json.loads(text)
        if data.get("format") != _ACCOUNTANT_FORMAT:
            raise ValueError(f"format {data.get('format')!r}")
        return [history_entry(h) for h in data["history"]]
    except (ValueError, KeyError, AttributeError, TypeError) as exc:
        raise ValueError(f"{path}: not a readable privacy accountant file ({exc})") from exc


_LEDGER_FORMAT = "fedsd-output-dp-ledger/1"


class OutputLedger:
    """A node's output-DP releases in one run (one per round it sent an update), on disk.

    Like ``NodeAccountant``: every ClientApp is a fresh process, so the per-round releases
    are appended under a lock and composed from the whole ledger each time.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Read the ledger at ``path`` (empty if there is no file yet)."""
        self.path = Path(path)
        self.releases: list[dict[str, Any]] = self._read()

    def _read(self) -> list[dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        except ValueError as exc:
            raise ValueError(f"{self.path}: not a readable output-DP ledger ({exc})") from exc
        if data.get("format") != _LEDGER_FORMAT:
            raise ValueError(f"{self.path}: not a readable output-DP ledger")
        return list(data["releases"])

    def record(self, server_round: int, report: OutputNoiseReport) -> None:
        """Append one release and save atomically."""
        with _file_lock(self.path):
            self.releases = self._read()
            self.releases.append(
                {
                    "round": server_round,
                    "mechanism": report.mechanism,
                    "epsilon": report.epsilon,
                    "delta": report.delta,
                    "noise_multiplier": report.noise_multiplier,
                }
            )
            self.path.parent.mkdir(parents=True, exist_ok=True)
            payload = {"format": _LEDGER_FORMAT, "releases": self.releases}
            write_file(self.path, json.dumps(payload))

    def composed(self) -> ComposedBudget:
        """The cumulative budget of all releases (they share one mechanism and setting)."""
        return compose_releases(self.releases)
