"""What the server remembers of each data owner's privacy ledger, across runs and resumes.

Each node's privacy records name its data owner (``owner``: the shard's id, see
``fedsd.privacy.node``) and that ledger's lifetime figures, before (``prior_*``) and after
this message. The server keeps the last lifetime figures per (owner, mechanism) in
``OUT/privacy-ledgers.json`` (``fedsd.common.atomic``) and refuses an update whose ledger went
backwards: its ledger before this round holds fewer steps (DP-SGD steps, output-DP
releases) than the same owner reported last. That is a wiped or restored cache, whose
epsilon would start again from zero; the refused update is not aggregated.

Steps, not epsilon, decide (they only grow, whatever delta or noise a later run uses);
the log line gives both. The file lives in OUT, so it covers resumed runs of one OUT
(a lost SuperLink state included), not unrelated runs in other OUTs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedsd.common.atomic import write_file

FILE = "privacy-ledgers.json"
_FORMAT = "fedsd-owner-ledgers/1"


class OwnerLedgers:
    """``OUT/privacy-ledgers.json``: {owner: {mechanism: last lifetime figures}}."""

    def __init__(
        self,
        out_dir: str | Path,
        guard: Callable[[str, Callable[[], object]], None] = lambda _what, write: write(),
    ) -> None:
        """Read the file (none yet: nothing remembered; unreadable: an error). ``guard``
        runs each save (``RunDir.guard``: a full disk stops the run naming its last good
        round, as a checkpoint write does)."""
        self.path = Path(out_dir) / FILE
        self._guard = guard
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            data = {"format": _FORMAT, "owners": {}}
        if data.get("format") != _FORMAT:
            raise ValueError(f"{self.path}: not a fedsd owner-ledger file")
        self.owners: dict[str, dict[str, dict[str, Any]]] = dict(data["owners"])

    def backwards(self, records: list[dict[str, Any]]) -> str | None:
        """Why these records (one node's reply) show a ledger that went backwards, or None."""
        for rec in records:
            owner, prior = rec.get("owner"), rec.get("prior_steps")
            if owner is None or prior is None:
                continue
            last = self.owners.get(str(owner), {}).get(rec["mechanism"])
            if last is not None and int(prior) < int(last["steps"]):
                return (
                    f"data owner {str(owner)[:12]}'s {rec['mechanism']} ledger went backwards: "
                    f"it held {prior} steps (epsilon {_num(rec.get('prior_epsilon'))}) before "
                    f"this round, but reported {last['steps']} steps (epsilon "
                    f"{_num(last.get('epsilon'))}) in round {last.get('round')} "
                    f"(node {last.get('node_id')}): a wiped privacy cache?"
                )
        return None

    def remember(self, records: list[dict[str, Any]], server_round: int) -> None:
        """Keep the lifetime figures of accepted records, and save."""
        changed = False
        for rec in records:
            owner, steps = rec.get("owner"), rec.get("lifetime_steps")
            if owner is None or steps is None:
                continue
            mechs = self.owners.setdefault(str(owner), {})
            last = mechs.get(rec["mechanism"])
            if last is None or int(steps) >= int(last["steps"]):
                mechs[rec["mechanism"]] = {
                    "steps": int(steps),
                    "epsilon": rec.get("lifetime_epsilon"),
                    "node_id": rec.get("node_id"),
                    "round": server_round,
                }
                changed = True
        if changed:
            text = json.dumps({"format": _FORMAT, "owners": self.owners}, indent=1, default=str)
            self._guard(str(self.path), lambda: write_file(self.path, text))


def _num(x: Any) -> str:
    return "n/a" if x is None else f"{float(x):.4g}"
