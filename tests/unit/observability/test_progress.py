"""The live view of ``fedsd up --local``: figures from the run's history.json, the runner's
events by call, every relayed line unchanged; one ``fedsd progress:`` line per round off a
terminal, a status line redrawn in place on one."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

from fedsd.common.atomic import write_file
from fedsd.fl.history import round_line
from fedsd.observability.progress import Progress, ProgressView


def _round(n: int, train_loss, replied: int, failed: int, seconds: float, eps: float) -> dict:
    """A history.json round record as the ServerApp writes it (before its val loss)."""
    return {
        "round": n,
        "train_loss": train_loss,
        "val_loss": None,
        "nodes_sampled": 2,
        "nodes_replied": replied,
        "nodes_rejected": 0,
        "nodes_failed": failed,
        "images": 8,
        "bytes_sent": 100,
        "bytes_received": 100,
        "seconds": seconds,
        "max_node_train_seconds": 1.0,
        "nodes": [],
        "privacy": [
            {"mechanism": "dp-sgd", "epsilon": eps, "delta": 1e-5, "node_id": 5, "round": n}
        ],
    }


R1 = _round(1, 0.4, 2, 0, 10.5, 1.5)
R2 = _round(2, None, 1, 1, 8.0, 2.25)


def _evaluated(record: dict, loss: float) -> dict:
    return {**record, "val_loss": loss, "eval_nodes_replied": 2}


def _history(rounds: list[dict], baseline: float | None = None) -> dict:
    hist = {"identity": {}, "run_key": "k", "config": {"num-server-rounds": 2}, "rounds": rounds}
    if baseline is not None:
        hist |= {"baseline_val_loss": baseline, "baseline_eval_nodes": 2}
    return hist


# A run as `fedsd up` sees it: the history.json the ServerApp writes (each before the line
# it prints), the runner's events, and the lines relayed (the ServerApp's lines arrive
# twice: print and log).
ROUND_1 = "round 1/2: train_loss=0.4000 nodes=2/2 failed=0 rejected=0 time=10.5s epsilon=1.5"
ROUND_2 = "round 2/2: train_loss=n/a nodes=1/2 failed=1 rejected=0 time=8.0s epsilon=2.25"
RUN = [
    ("line", "fedsd up: started superlink (pid 1), log /x/superlink.log"),
    ("line", "fedsd up: 2 SuperNode(s) online"),
    ("online", 2),
    ("history", _history([], baseline=0.5)),
    ("line", "fedsd val_loss initial adapter (base model): 0.5000 (2 nodes)"),
    ("history", _history([R1], baseline=0.5)),
    ("line", f"fedsd {ROUND_1}"),
    ("line", f"INFO :      fedsd {ROUND_1}"),
    ("line", "fedsd privacy round 1: node 5 dp-sgd (cumulative): epsilon=1.5 delta=1e-05"),
    ("history", _history([_evaluated(R1, 0.45)], baseline=0.5)),
    ("line", "fedsd val_loss round 1: 0.4500 (2 nodes)"),
    ("history", _history([_evaluated(R1, 0.45), R2], baseline=0.5)),
    ("line", f"fedsd {ROUND_2}"),
    ("history", _history([_evaluated(R1, 0.45), _evaluated(R2, 0.42)], baseline=0.5)),
    ("line", "fedsd val_loss round 2: 0.4200 (2 nodes)"),
    ("line", "fedsd done: adapter in /x/latest"),
    ("ended", "finished:completed"),
    ("line", "fedsd up: run 42 finished:completed in 30.0s"),
]
RUN_LINES = [what for kind, what in RUN if kind == "line"]


def _play(view: ProgressView, history: Path, steps: list, on_line=None) -> None:
    for kind, what in steps:
        if kind == "history":
            write_file(history, json.dumps(what, indent=2) + "\n")
        elif kind == "online":
            view.nodes_online(what)
        elif kind == "ended":
            view.ended(what)
        else:
            if on_line is not None:
                on_line(what)
            view(what)


def test_the_round_lines_are_the_servers_format_of_the_records():
    assert (round_line(R1, 2), round_line(R2, 2)) == (ROUND_1, ROUND_2)


def test_progress_view_prints_one_line_per_round_when_not_a_terminal(tmp_path):
    out = io.StringIO()
    now = [0.0]
    history = tmp_path / "history.json"
    view = ProgressView(out, tty=False, total=2, budget=8.0, clock=lambda: now[0], history=history)

    def tick(line: str) -> None:  # line i arrives i*10 s after the start
        now[0] = 10.0 * RUN_LINES.index(line)

    _play(view, history, RUN, tick)
    view.close()
    lines = out.getvalue().splitlines()
    relayed = [ln for ln in lines if not ln.startswith("fedsd progress: ")]
    assert relayed == RUN_LINES  # every line passes unchanged
    progress = [ln for ln in lines if ln.startswith("fedsd progress: ")]
    assert progress == [
        "fedsd progress: round 1/2 done | nodes 2/2 | train 0.4000 | val 0.5000 (base) "
        "| eps 1.5/8 | 10.5s/round | 0:30 elapsed",
        "fedsd progress: round 2/2 done | nodes 1/2 (1 failed) | val 0.4500 (r1) "
        "| eps 2.25/8 | 8.0s/round | 1:10 elapsed",
        "fedsd progress: round 2/2 (finished:completed) | nodes 1/2 (1 failed) "
        "| val 0.4200 (r2) | eps 2.25/8 | 8.0s/round | 1:40 elapsed",
    ]
    # the progress line follows the round line it summarises
    assert lines.index(progress[0]) == lines.index(RUN_LINES[3]) + 1


def test_progress_view_redraws_a_status_line_on_a_terminal(tmp_path):
    out = io.StringIO()
    history = tmp_path / "history.json"
    view = ProgressView(out, tty=True, total=2, clock=lambda: 0.0, history=history)
    _play(view, history, RUN[:7])  # up to the first round line
    view.close()
    text = out.getvalue()
    # each line: erase the status line, print the line, draw the status line again
    assert text.count("\r\033[K") == 5
    assert "\033[1mfedsd round 1/2" in text  # round lines in bold, as before
    screen = _terminal(text)
    assert screen[:4] == [re.sub(r"\033\[[0-9;]*m", "", ln) for ln in RUN_LINES[:4]]
    assert screen[4].startswith("round 1/2 done | nodes 2/2 | train 0.4000 | val 0.5000")
    assert len(screen) == 5  # the status line was redrawn in place, not repeated


def test_the_progress_view_reads_rejections_from_the_round_record():
    p = Progress()
    rec = {**R1, "nodes_replied": 2, "nodes_sampled": 13, "nodes_rejected": 11, "seconds": 3.5}
    assert p.update(_history([rec])) == "round"
    assert (p.replied, p.sampled, p.failed, p.rejected, p.round_seconds) == (2, 13, 0, 11, 3.5)
    assert "nodes 2/13 (11 rejected)" in p.render()
    old = Progress()  # a record without nodes_rejected (an older ServerApp) still reads
    rec = {k: v for k, v in _round(1, None, 1, 1, 8.0, 2).items() if k != "nodes_rejected"}
    assert old.update(_history([rec]))
    assert (old.rejected, old.epsilon) == (0, 2.0)


def test_the_view_waits_for_history_json_and_reads_it_only_when_it_changed(tmp_path):
    history = tmp_path / "history.json"
    view = ProgressView(io.StringIO(), tty=False, total=2, history=history)
    assert view.refresh() is None  # not written yet
    view.nodes_online(3)
    assert view.status().startswith("round 0/2 (waiting for round 1) | nodes online 3")
    write_file(history, json.dumps(_history([R1], baseline=0.5)))
    assert view.refresh() == "round"
    assert view.refresh() is None  # unchanged: not read again
    view.ended("finished:failed")
    assert view.status().startswith("round 1/2 (finished:failed) | nodes 2/2")


def test_rounds_already_in_history_json_are_shown_as_resumed(tmp_path):
    history = tmp_path / "history.json"
    write_file(history, json.dumps(_history([_evaluated(R1, 0.45)], baseline=0.5)))
    view = ProgressView(io.StringIO(), tty=False, total=2, history=history)
    view.nodes_online(2)  # a resumed run is not waiting for round 1
    assert view.progress.status == "resumed"
    assert view.status().startswith("round 1/2 done | nodes 2/2 | train 0.4000 | val 0.4500 (r1)")


def _terminal(text: str) -> list[str]:
    """What a terminal shows: apply carriage return + erase-line, drop colours."""
    text = re.sub(r"\033\[[0-9;]*m", "", text)
    screen, current = [], ""
    i = 0
    while i < len(text):
        if text.startswith("\r\033[K", i):
            current, i = "", i + 4
        elif text[i] == "\n":
            screen.append(current)
            current, i = "", i + 1
        else:
            current, i = current + text[i], i + 1
    if current:
        screen.append(current)
    return screen


def test_flowers_debug_lines_stay_in_the_log_not_on_the_terminal(tmp_path):
    for tty in (False, True):
        out = io.StringIO()
        view = ProgressView(out, tty=tty, total=1, history=tmp_path / "history.json")
        view("12/02/2026 13:31:28:DEBUG:ServerApp finished running.")
        view("12/02/2026 13:31:28:INFO:Start `flwr-serverapp` process")
        view("fedsd up: run 1 finished:completed in 1.0s")
        shown = out.getvalue()
        assert "DEBUG" not in shown
        assert "INFO:Start" in shown and "fedsd up: run 1" in shown


def _quality(fid, clip, nodes: int = 2) -> dict:
    """A QualityRecord as the ServerApp stores it (None: not computed)."""
    return {
        "fid": fid,
        "kid": None if fid is None else 0.01,
        "clip_score": clip,
        "real_images": 16,
        "generated_images": 16,
        "clip_images": 0 if clip is None else 16,
        "nodes": nodes,
        "nodes_refused": 0,
        "nodes_failed": 0,
        "nodes_rejected": 0,
        "seconds": 3.0,
        "extractors": "inception",
    }


def test_the_view_shows_the_latest_image_quality_only_when_there_is_one():
    p = Progress(total=2)
    p.update(_history([_evaluated(R1, 0.45)], baseline=0.5))
    assert "fid" not in p.render() and "clip" not in p.render()
    hist = _history([_evaluated(R1, 0.45)], baseline=0.5) | {
        "baseline_quality": _quality(120.04, 20.96)
    }
    assert p.update(hist) == "quality"
    assert "| val 0.4500 (r1) | fid 120.0 clip 21.0 (base) | eps 1.5" in p.render()
    rounds = [_evaluated(R1, 0.45) | {"quality": _quality(80.26, None)}, R2]
    assert p.update(hist | {"rounds": rounds}) == "round"
    assert "| fid 80.3 (r1) |" in p.render()  # no CLIP score: only FID
    p.update(hist | {"rounds": [rounds[0], R2 | {"quality": _quality(None, None, 0)}]})
    assert "fid" not in p.render() and "clip" not in p.render()  # nothing computed
