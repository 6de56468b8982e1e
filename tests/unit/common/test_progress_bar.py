"""fedsd.common.progress_bar: a bar on a terminal, count-and-rate lines everywhere else."""

from __future__ import annotations

import io
import re

from fedsd.common.progress_bar import progress, track


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_lines_off_a_terminal_every_interval_and_at_the_end():
    out, clock = io.StringIO(), Clock()
    with progress("encoding", total=10, stream=out, interval=5.0, clock=clock) as bar:
        for _ in range(10):
            clock.now += 1.0
            bar.update()
    lines = out.getvalue().splitlines()
    # a line at 5 s and at 10 s (interval); the final line would repeat the last one
    assert lines == [
        "encoding: 5/10 img in 5.0 s (1.0 img/s)",
        "encoding: 10/10 img in 10.0 s (1.0 img/s)",
    ]
    with progress("encoding", total=3, stream=out, interval=5.0, clock=clock) as bar:
        clock.now += 1.0
        bar.update(3)
    assert out.getvalue().splitlines()[-1] == "encoding: 3/3 img in 1.0 s (3.0 img/s)"


def test_track_counts_every_item_and_infers_the_total():
    out, clock = io.StringIO(), Clock()
    seen = []
    for item in track(["a", "b", "c"], "decoding shard-0/train", stream=out, clock=clock):
        clock.now += 2.0
        seen.append(item)
    assert seen == ["a", "b", "c"]
    assert out.getvalue() == "decoding shard-0/train: 3/3 img in 6.0 s (0.5 img/s)\n"


def test_a_bar_on_a_terminal():
    out = io.StringIO()
    with progress("generating", total=4, unit="img", stream=out, bar=True) as bar:
        bar.update(4)
    # tqdm's own rendering, not our lines
    assert re.search(r"generating: 100%\|.*\| 4/4", out.getvalue())
    assert "img/s)" not in out.getvalue()


def test_no_bar_when_the_stream_is_not_a_terminal():
    out = io.StringIO()  # isatty() is False
    with progress("x", stream=out) as bar:
        bar.update(2)
    assert out.getvalue().startswith("x: 2 img in ")
