"""Checkpoints that survive a crash: atomic writes, real SIGKILLs, a real full disk.

The kill test SIGKILLs a real writer process (tests/support/ckpt_writer.py) at random moments
while it saves rounds; the full-disk test fills a real tmpfs (root only, as in CI).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedsd.common import atomic
from fedsd.common.atomic import is_temporary, remove_temporaries, write_dir, write_file
from fedsd.fl.checkpoint import DiskFullError, RunDir
from fedsd.fl.history import HISTORY
from fedsd.ml.model import load_adapter_arrays
from fedsd.privacy.owner_ledgers import OwnerLedgers
from tests.support.ckpt_writer import config, expected

REPO = Path(__file__).resolve().parents[3]
WRITER = Path(__file__).resolve().parents[2] / "support" / "ckpt_writer.py"


def _temporaries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if is_temporary(p.name) or ".tmp" in p.name)


def _assert_equal(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def _check_consistent(out: Path) -> int:
    """Open OUT as a restarted ServerApp does; every recorded round is there and intact."""
    rd = RunDir.open(config(str(out)))  # also: history.json parses
    assert _temporaries(out) == []
    rounds = [int(r["round"]) for r in rd.history["rounds"]]
    assert rounds == list(range(1, len(rounds) + 1))
    for n in rounds:
        _assert_equal(load_adapter_arrays(rd.round_dir(n)), expected(n))
    if rounds:
        _assert_equal(load_adapter_arrays(out / "latest"), expected(rounds[-1]))
    return rd.completed_rounds


# --------------------------------------------------------------------------- helpers


def test_write_file_and_dir_replace_atomically_and_clean_up_on_error(tmp_path, monkeypatch):
    target = write_file(tmp_path / "a.json", '{"v": 1}')
    write_file(target, b'{"v": 2}', mode=0o600)
    assert json.loads(target.read_text()) == {"v": 2}
    assert target.stat().st_mode & 0o777 == 0o600
    d = write_dir(tmp_path / "d", {"x": b"1", "y": b"2"})
    write_dir(d, {"x": b"3"})  # replaced as a whole: y is gone
    assert sorted(p.name for p in d.iterdir()) == ["x"] and (d / "x").read_bytes() == b"3"
    with pytest.raises(ValueError):
        write_dir(d, {"x": b"4", "../evil": b""})
    assert (d / "x").read_bytes() == b"3"
    assert _temporaries(tmp_path) == []
    # where the file system cannot swap two directories, the old one is renamed aside
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    write_dir(d, {"z": b"5"})
    assert sorted(p.name for p in d.iterdir()) == ["z"] and _temporaries(tmp_path) == []
    # what killed writers leave behind, old and new names, is removed; nothing else
    for name in (".history.json.tmp-12-ab", "history.tmp99", "latest.tmp", "latest.old"):
        (tmp_path / name).mkdir() if "latest" in name else (tmp_path / name).write_text("")
    (tmp_path / ".round-3.tmp-7-0f").mkdir()
    assert len(remove_temporaries(tmp_path)) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "d"]


# --------------------------------------------------------------------------- SIGKILL


@pytest.mark.timeout(600)
def test_sigkill_at_any_moment_leaves_a_consistent_checkpoint(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, str(WRITER), str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        bufsize=1,
        cwd=REPO,
        env=env,
    )
    assert proc.stdin is not None and proc.stdout is not None
    rng = random.Random(13)
    kills, with_temps, saved_total, prev = 0, 0, 0, 0
    try:
        assert proc.stdout.readline().strip() == "ready"
        for _ in range(12):
            proc.stdin.write("go\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
            assert line.startswith("pid "), line
            pid = int(line.split()[1])
            time.sleep(rng.uniform(0.0, 0.6))
            os.kill(pid, signal.SIGKILL)
            kills += 1
            saved = []
            while not (line := proc.stdout.readline()).startswith("dead "):
                assert line.startswith("saved "), line
                saved.append(int(line.split()[1]))
            assert os.WIFSIGNALED(int(line.split()[1])), line
            saved_total += len(saved)
            with_temps += bool(_temporaries(out)) if out.exists() else 0
            last = _check_consistent(out)
            # every round the writer finished saving is recorded (history.json is written
            # before save_round returns), and nothing newer than it was
            assert last >= (saved[-1] if saved else prev)
            assert last <= (saved[-1] if saved else prev) + 1
            prev = last
    finally:
        proc.kill()
        proc.wait()
    assert saved_total > 0, "the writer never got to save a round"
    print(
        f"{kills} SIGKILLs, {saved_total} rounds saved in between, {last} recorded; "
        f"{with_temps} kills left temporaries, all removed on open"
    )


# --------------------------------------------------------------------------- full disk


def _mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        pytest.fail(f"mount {' '.join(args)} failed: {done.stderr.strip()}")


@pytest.mark.timeout(300)
def test_full_disk_stops_with_the_last_good_checkpoint_and_resumes(tmp_path):
    if os.geteuid() != 0:
        pytest.fail("this test mounts a small tmpfs and needs root (CI runs as root)")
    out = tmp_path / "disk"
    out.mkdir()
    _mount("-t", "tmpfs", "-o", "size=3m", "tmpfs", str(out))
    try:
        rd = RunDir.open(config(str(out)))
        n = 0
        with pytest.raises(DiskFullError) as err:
            for n in range(1, 20):  # 512 KiB per adapter: round-n/ and latest/
                rd.save_round(n, expected(n), {"round": n})
        good = json.loads((out / HISTORY).read_text())["rounds"][-1]["round"]
        message = str(err.value)
        print(f"round {n}: {message}")
        assert good == n - 1 >= 1
        assert f"disk full writing {out}" in message and f"(out-dir {out})" in message
        assert f"the last good checkpoint is round {good};" in message
        assert "free space and rerun the same command to resume" in message
        assert _temporaries(out) == [], "a failed write left its temporary"
        _assert_equal(load_adapter_arrays(out / f"round-{good}"), expected(good))
        # the server's other file in OUT stops the run the same way, not with an OSError
        filler = out / "filler"
        with filler.open("wb") as fh, pytest.raises(OSError):
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        record = {"mechanism": "dp-sgd", "owner": "o1", "lifetime_steps": 3, "node_id": 5}
        with pytest.raises(DiskFullError) as err:
            OwnerLedgers(out, guard=rd.guard).remember([record], n)
        assert f"disk full writing {out / 'privacy-ledgers.json'}" in str(err.value)
        assert f"the last good checkpoint is round {good};" in str(err.value)
        filler.unlink()
        assert _temporaries(out) == []

        _mount("-o", "remount,size=16m", str(out))  # space is back: the same run resumes
        rd = RunDir.open(config(str(out)))
        assert rd.completed_rounds == good
        _assert_equal(rd.resume_arrays(), expected(good))
        rd.save_round(good + 1, expected(good + 1), {"round": good + 1})
        assert _check_consistent(out) == good + 1
    finally:
        subprocess.run(["umount", str(out)], timeout=60, check=False)
