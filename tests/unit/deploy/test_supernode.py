"""fedsd's paced SuperNode: the waits it replaces are where Flower 1.41 has them, and
the paced waits follow the run."""

from __future__ import annotations

import importlib
import importlib.util
import sys

import flwr
import pytest

from fedsd.deploy import supernode
from fedsd.deploy.supernode import (
    SUPEREXEC_MARKERS,
    SUPERNODE_MARKERS,
    PacedWaits,
    flower_moved,
    patch_superexec,
    patch_supernode,
)


def _fresh(name: str):
    """A private copy of a Flower module (patching it leaves Flower's own untouched)."""
    spec = importlib.util.find_spec(name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flower_still_has_the_waits_fedsd_paces():
    """Fails loudly on a Flower upgrade that moves them: fedsd.deploy.supernode must then
    be checked against the new loop (at run time it falls back to Flower's own waits)."""
    assert flwr.__version__ == "1.41.0"
    sn = importlib.import_module("flwr.supernode.start_client_internal")
    se = importlib.import_module("flwr.supercore.superexec.run_superexec")
    assert flower_moved(sn, SUPERNODE_MARKERS) == []
    assert flower_moved(se, SUPEREXEC_MARKERS) == []


def test_idle_wait_is_a_quarter_of_the_time_since_the_last_reply():
    now = [100.0]
    slept = []
    waits = PacedWaits(3, 0.1, 3.0, {0.5: 0.05}, clock=lambda: now[0], sleep=slept.append)
    waits.sleep(3)  # nothing yet: Flower's 3 s
    waits.active()
    for dt in (0.0, 0.2, 2.0, 8.0, 60.0):
        now[0] = 100.0 + dt
        waits.sleep(3)
    waits.sleep(0.5)  # the reply wait
    waits.sleep(1.25)  # any other wait: unchanged
    assert slept == [3.0, 0.1, 0.1, 0.5, 2.0, 3.0, 0.05, 1.25]
    assert waits.monotonic is not None  # the rest is time's


def test_bad_settings_are_refused(monkeypatch):
    monkeypatch.setenv("FEDSD_SUPERNODE_POLL_MIN", "0")
    with pytest.raises(ValueError, match="FEDSD_SUPERNODE_POLL_MIN='0'"):
        patch_supernode(_fresh("flwr.supernode.start_client_internal"))
    with pytest.raises(ValueError, match="poll min 5"):
        PacedWaits(3, 5.0, 3.0)


def test_the_supernode_module_is_paced_and_its_superexec_too(monkeypatch):
    module = _fresh("flwr.supernode.start_client_internal")
    assert patch_supernode(module) == []
    assert isinstance(module.time, PacedWaits) and module.time.paced == 3
    assert module.time.fixed == {0.5: 0.05}
    started = []
    monkeypatch.setattr("subprocess.Popen", lambda cmd, *a, **k: started.append(cmd))
    module.subprocess.Popen(["flower-superexec", "--runtime-api-address", "x:1"])
    module.subprocess.Popen(["other", "y"])
    assert started == [
        [sys.executable, "-m", "fedsd.deploy.supernode", "superexec"]
        + ["--runtime-api-address", "x:1"],
        ["other", "y"],
    ]
    # a reply sent marks the node active, even when pushing fails
    before = module.time.last_active
    calls = []

    def push(*args, **kwargs):
        calls.append(args)
        raise OSError("link down")

    module._push_messages = supernode._mark_after(module.time, push)
    with pytest.raises(OSError):
        module._push_messages(1)
    assert calls == [(1,)] and module.time.last_active > before


def test_the_superexec_is_paced_from_005_s_to_its_interval(monkeypatch):
    monkeypatch.setenv("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.5")
    module = _fresh("flwr.supercore.superexec.run_superexec")
    assert patch_superexec(module) == []
    assert (module.time.paced, module.time.poll_min, module.time.poll_max) == (0.5, 0.05, 0.5)


def test_a_moved_loop_is_left_alone():
    module = _fresh("flwr.supernode.start_client_internal")
    module._push_messages = lambda: None  # as if Flower had rewritten it
    moved = patch_supernode(module)
    assert moved == [
        "_push_messages: time.sleep(0.5)",
        "_push_messages: send(message, object_tree, clientapp_runtime)",
    ]
    assert not isinstance(module.time, PacedWaits)


def test_the_reply_to_the_message_just_pulled_is_pushed_not_an_orphan_before_it():
    """Flower's loop pushes whatever reply is ready after a pull. An orphan reply (its
    message dropped when the run ended mid-receipt) must not stand in for the reply to
    the message just pulled: the wrapper pushes until that one has gone."""
    from types import SimpleNamespace

    def msg(mid, reply_to=""):
        meta = SimpleNamespace(message_id=mid, reply_to_message_id=reply_to)
        return SimpleNamespace(metadata=meta)

    class State:  # Flower's NodeState, as far as the loop uses it
        def __init__(self):
            self.replies = [msg("r-old", "m-old")]  # the orphan
            self.stored = []

        def store_message(self, message):
            self.stored.append(message.metadata.message_id)

    state = State()
    waits = []

    def flower_pull(*, state):  # stores the pulled message; its ClientApp runs later
        state.store_message(msg("m-new"))
        return 1

    def flower_push(*, state, send):  # like Flower's: wait for any reply, push all ready
        if not state.replies:
            waits.append("wait")
            state.replies.append(msg("r-new", "m-new"))  # the ClientApp is done
        ready, state.replies = state.replies, []
        for reply in ready:
            send(reply)

    sent = []
    replies = supernode.InOrderReplies()
    pull, push = replies.pull(flower_pull), replies.push(flower_push)
    assert pull(state=state) == 1 and state.stored == ["m-new"]
    push(state=state, send=lambda m: sent.append(m.metadata.message_id))
    assert sent == ["r-old", "r-new"] and waits == ["wait"]
    # The next round: one message, one reply, one push.
    pull(state=state)
    state.replies.append(msg("r-next", "m-new"))
    push(state=state, send=lambda m: sent.append(m.metadata.message_id))
    assert sent == ["r-old", "r-new", "r-next"]
