"""fedsd's SuperNode: Flower's ``flower-supernode``, with waits that follow the run.

Flower 1.41's SuperNode loop (``flwr.supernode.start_client_internal``) pulls a message
from the SuperLink, hands it to its ClientApp, then waits for the reply in 0.5 s steps;
when a pull finds nothing it sleeps a hard-coded 3 s. A reply thus waits up to 0.5 s
after its ClientApp ends, and the next round's message up to 3 s after the server sent
it: most of a short round, and four times per SecAgg+ round.

Its SuperExec (started by the SuperNode) asks the node every 1 s whether a message waits
for a ClientApp: up to 1 s more per message.

``python -m fedsd.deploy.supernode ARGS`` (ARGS as for ``flower-supernode``) runs Flower's
own SuperNode with three of these waits replaced, and one fix (``InOrderReplies``: a
reply orphaned by a run that ended mid-receipt no longer shifts every later reply):

* waiting for the ClientApp's reply (a look into the node's own memory, no network):
  ``FEDSD_SUPERNODE_REPLY_WAIT`` seconds (default 0.05) instead of 0.5;
* the idle wait after an empty pull: a quarter of the time since this node last sent a
  reply, between ``FEDSD_SUPERNODE_POLL_MIN`` (default 0.1) and ``FEDSD_SUPERNODE_POLL_MAX``
  (default 3.0, Flower's). Right after a reply the node asks often (the next message of
  the round is near); a node that has been idle for 12 s is back at Flower's 3 s;
* its SuperExec's wait (Flower's ``flower-superexec``, started as ``python -m
  fedsd.deploy.supernode superexec``): a quarter of the time since it last started a
  ClientApp, between 0.05 s and Flower's interval (``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``,
  1 s); these calls stay on the node's own host.

What it costs a SuperLink: an idle node pulls every 3 s as with Flower. After each
reply, a node pulls ~4 times in the first 0.4 s and ~4 ln(30) = 14 times until it is
back at 3 s (after 12 s): about 18 extra pulls per reply, instead of 4. docs/performance.md
has the figures for 1,000 nodes.

The waits are recognised by their values in Flower's source, which a test pins
(``tests/unit/deploy/test_supernode.py``): if a Flower upgrade changes them, that test
fails, and at run time this module says so and runs Flower unchanged.
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

MODULE = "fedsd.deploy.supernode"  # this module as ``python -m`` runs it (not __main__)
#: Flower's waits: the SuperNode's after an empty pull and for a reply; the SuperExec's.
FLOWER_IDLE_WAIT = 3
FLOWER_REPLY_WAIT = 0.5
#: Where those waits are in Flower's source (the test and ``patch_*`` check them), by
#: module attribute -> text.
SUPERNODE_MARKERS = {
    "start_client_internal": (
        "time.sleep(3)",
        'command = ["flower-superexec"]',
        "run_id = _pull_and_store_message(\n                state=state,",
        "_push_messages(\n                state=state,",
        "send=send,",
    ),
    "_pull_and_store_message": ("state.store_message(message)", "except RunNotRunningException"),
    "_push_messages": ("time.sleep(0.5)", "send(message, object_tree, clientapp_runtime)"),
}
SUPEREXEC_MARKERS = {
    "run_superexec": ("time.sleep(task_poll_interval)", "_handle_launch_result("),
    "_handle_launch_result": ("def _handle_launch_result",),
    "_get_task_poll_interval": ("_TASK_POLL_INTERVAL_ENV",),
}


def _seconds(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    try:
        value = float(raw) if raw.strip() else default
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0.01 <= value <= 60):
        raise ValueError(f"{name}={raw!r}: expected seconds in [0.01, 60]")
    return value


class PacedWaits:
    """Stands in for the ``time`` module of one Flower loop: ``sleep(paced)`` waits a
    quarter of the time since the loop was last ``active()``, between ``poll_min`` and
    ``poll_max``; ``sleep`` of a value in ``fixed`` waits what it maps to; everything else
    is ``time``'s."""

    def __init__(
        self,
        paced: float,
        poll_min: float,
        poll_max: float,
        fixed: dict[float, float] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not 0 < poll_min <= poll_max:
            raise ValueError(f"poll min {poll_min} must be > 0 and <= poll max {poll_max}")
        self.paced, self.poll_min, self.poll_max = paced, poll_min, poll_max
        self.fixed = dict(fixed or {})
        self._clock, self._sleep = clock, sleep
        self.last_active = -math.inf  # nothing yet: idle

    def idle_wait(self) -> float:
        """The paced wait now: a quarter of the time since the loop was last active."""
        since = self._clock() - self.last_active
        return min(self.poll_max, max(self.poll_min, since / 4))

    def active(self) -> None:
        """The loop has just done work (a reply sent, a ClientApp started)."""
        self.last_active = self._clock()

    def sleep(self, seconds: float) -> None:
        """``time.sleep``, with the paced and fixed waits replaced."""
        if seconds == self.paced:
            seconds = self.idle_wait()
        else:
            seconds = self.fixed.get(seconds, seconds)
        self._sleep(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def flower_moved(module: Any, markers: dict[str, tuple[str, ...]]) -> list[str]:
    """What of ``markers`` is no longer in ``module``'s source (empty: all is)."""
    moved = []
    for attr, texts in markers.items():
        obj = getattr(module, attr, None)
        source = inspect.getsource(obj) if callable(obj) else ""
        moved += [f"{attr}: {text}" for text in texts if text not in source]
    return moved


def _mark_after(waits: PacedWaits, function: Callable[..., Any]) -> Callable[..., Any]:
    def marked(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        finally:
            waits.active()

    return marked


class InOrderReplies:
    """Push the reply to the message just pulled, not just any reply.

    Flower 1.41's SuperNode stores a pulled message (and its ClientApp starts) before it
    confirms the receipt; when the SuperLink then says the run is no longer running (it
    was restarted, the run resubmitted), Flower drops the message but not the reply its
    ClientApp still writes. Its loop pushes whatever reply is ready after each pull, so
    that orphan goes out in place of the next message's reply, and every later reply one
    message late: the resubmitted run waits for a reply that never leaves (seen in
    ``tests/e2e/test_faults.py``'s SuperLink kill). This pushes until the reply to the
    message just pulled has gone; orphans go too (the SuperLink ignores them)."""

    def __init__(self) -> None:
        self.pulled: str | None = None  # the message the loop pulled last
        self.replied: set[str] = set()  # the messages whose replies were sent since

    def pull(self, function: Callable[..., Any]) -> Callable[..., Any]:
        """Wrap ``_pull_and_store_message``: note the message it stores."""

        def pulled(*args: Any, state: Any, **kwargs: Any) -> Any:
            if not getattr(state, "_fedsd_noted", False):
                store = state.store_message

                def store_message(message: Any) -> Any:
                    if not message.metadata.reply_to_message_id:  # pulled, not a reply
                        self.pulled = message.metadata.message_id
                    return store(message)

                state.store_message = store_message
                state._fedsd_noted = True
            return function(*args, state=state, **kwargs)

        return pulled

    def push(self, function: Callable[..., Any]) -> Callable[..., Any]:
        """Wrap ``_push_messages``: call it until the pulled message's reply was sent."""

        def pushed(*args: Any, send: Callable[..., Any], **kwargs: Any) -> Any:
            def sending(message: Any, *a: Any, **k: Any) -> Any:
                self.replied.add(message.metadata.reply_to_message_id)
                return send(message, *a, **k)

            while True:
                result = function(*args, send=sending, **kwargs)
                if self.pulled is None or self.pulled in self.replied:
                    self.replied.clear()
                    return result
                print(
                    "fedsd supernode: pushed the reply to an earlier message; waiting "
                    f"for the reply to {self.pulled}",
                    file=sys.stderr,
                    flush=True,
                )

        return pushed


class _PacedSuperExec:
    """``subprocess`` for Flower's SuperNode module: its ``flower-superexec`` becomes
    ``python -m fedsd.deploy.supernode superexec`` (the same, paced)."""

    def Popen(self, command: list[str], *args: Any, **kwargs: Any) -> Any:  # noqa: N802
        import subprocess

        if command and command[0] == "flower-superexec":
            command = [sys.executable, "-m", MODULE, "superexec", *command[1:]]
        return subprocess.Popen(command, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        import subprocess

        return getattr(subprocess, name)


def patch_supernode(module: Any) -> list[str]:
    """Pace Flower's SuperNode loop in ``module`` (``flwr.supernode.start_client_internal``)
    as ``FEDSD_SUPERNODE_*`` ask; return what of Flower's source moved (then nothing is
    patched)."""
    moved = flower_moved(module, SUPERNODE_MARKERS)
    if moved:
        return moved
    waits = PacedWaits(
        FLOWER_IDLE_WAIT,
        _seconds("FEDSD_SUPERNODE_POLL_MIN", 0.1),
        _seconds("FEDSD_SUPERNODE_POLL_MAX", float(FLOWER_IDLE_WAIT)),
        {FLOWER_REPLY_WAIT: _seconds("FEDSD_SUPERNODE_REPLY_WAIT", 0.05)},
    )
    module.time = waits
    replies = InOrderReplies()
    module._pull_and_store_message = replies.pull(module._pull_and_store_message)
    module._push_messages = _mark_after(waits, replies.push(module._push_messages))
    module.subprocess = _PacedSuperExec()
    return []


def patch_superexec(module: Any) -> list[str]:
    """Pace Flower's SuperExec loop in ``module`` (``flwr.supercore.superexec.run_superexec``)
    between 0.05 s and its task poll interval."""
    moved = flower_moved(module, SUPEREXEC_MARKERS)
    if moved:
        return moved
    interval = module._get_task_poll_interval()
    waits = PacedWaits(interval, min(0.05, interval), interval)
    module.time = waits
    module._handle_launch_result = _mark_after(waits, module._handle_launch_result)
    return []


def main() -> None:
    """``flower-supernode`` (or, with ``superexec`` first, ``flower-superexec``), paced."""
    if sys.argv[1:2] == ["superexec"]:
        from flwr.supercore.cli.flower_superexec import flower_superexec as flower_main

        module = importlib.import_module("flwr.supercore.superexec.run_superexec")

        del sys.argv[1]
        name, moved = "flower-superexec", patch_superexec(module)
    else:
        from flwr.supernode.cli.flower_supernode import flower_supernode as flower_main

        module = importlib.import_module("flwr.supernode.start_client_internal")

        name, moved = "flower-supernode", patch_supernode(module)
    if moved:
        print(
            f"fedsd supernode: Flower's {name} loop changed ({'; '.join(moved)}): running "
            "it with Flower's own waits",
            file=sys.stderr,
            flush=True,
        )
    sys.argv[0] = name
    flower_main()


if __name__ == "__main__":
    main()
