"""``fedsd report OUT``: quality against privacy, per round, from history.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedsd.cli import main


def _quality(fid: float | None, kid: float | None, clip: float | None) -> dict[str, Any]:
    return {
        "fid": fid,
        "kid": kid,
        "clip_score": clip,
        "real_images": 128,
        "generated_images": 64,
        "clip_images": 64,
        "nodes": 2,
        "nodes_refused": 0,
        "nodes_failed": 0,
        "nodes_rejected": 0,
        "seconds": 12.5,
        "extractors": "inception-v3 / clip-vit-b32",
    }


def _round(n: int, val_loss: float | None, privacy: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "round": n,
        "train_loss": 0.5,
        "val_loss": val_loss,
        "nodes_sampled": 2,
        "nodes_replied": 2,
        "nodes_rejected": 0,
        "nodes_failed": 0,
        "images": 10,
        "bytes_sent": 1,
        "bytes_received": 1,
        "seconds": 1.0,
        "max_node_train_seconds": 1.0,
        "nodes": [],
        "privacy": privacy,
    }


def _write_run(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    r1 = _round(1, 0.25, [])
    r1["quality"] = _quality(80.5, 0.0123, 30.25)
    r2 = _round(
        2,
        0.2,
        [
            {"mechanism": "dp-sgd", "node_id": 1, "epsilon": 1.5, "delta": 1e-5},
            {"mechanism": "dp-sgd", "node_id": 2, "epsilon": 2.25, "delta": 1e-5},
            {"mechanism": "secagg+", "node_id": None, "epsilon": None},
        ],
    )
    r3 = _round(3, None, [{"mechanism": "dp-sgd", "node_id": 1, "epsilon": 3.0, "delta": 1e-5}])
    r3["quality"] = _quality(70.0, None, 31.0)
    history = {
        "config": {},
        "baseline_val_loss": 0.3,
        "baseline_quality": _quality(100.0, 0.05, 29.0),
        "rounds": [r1, r2, r3],
    }
    (out / "history.json").write_text(json.dumps(history))
    return out


def _cells(line: str) -> list[str]:
    return line.replace("0 (base)", "0").split()


def test_report_table(tmp_path: Path, capsys) -> None:
    out = _write_run(tmp_path)
    assert main(["report", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"quality report for {out.resolve()}"
    header = lines.index(next(line for line in lines if line.startswith("round")))
    assert _cells(lines[header]) == [
        "round",
        "val_loss",
        "fid",
        "kid",
        "clip_score",
        "epsilon",
        "generated/real",
    ]
    rows = [_cells(line) for line in lines[header + 1 : header + 5]]
    assert rows == [
        ["0", "0.3000", "100", "0.05", "29", "-", "64/128"],
        ["1", "0.2500", "80.5", "0.0123", "30.25", "-", "64/128"],
        ["2", "0.2000", "-", "-", "-", "2.25", "-"],
        ["3", "n/a", "70", "n/a", "31", "3", "64/128"],
    ]
    assert "extractors: inception-v3 / clip-vit-b32" in lines


def test_report_json(tmp_path: Path, capsys) -> None:
    out = _write_run(tmp_path)
    assert main(["report", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["out"] == str(out.resolve())
    rows = report["rows"]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert [r["val_loss"] for r in rows] == [0.3, 0.25, 0.2, None]
    assert [r["fid"] for r in rows] == [100.0, 80.5, None, 70.0]
    assert [r["kid"] for r in rows] == [0.05, 0.0123, None, None]
    assert [r["clip_score"] for r in rows] == [29.0, 30.25, None, 31.0]
    assert [r["epsilon"] for r in rows] == [None, None, 2.25, 3.0]
    assert [r["evaluated"] for r in rows] == [True, True, False, True]
    assert [r["generated_images"] for r in rows] == [64, 64, None, 64]
    assert [r["real_images"] for r in rows] == [128, 128, None, 128]


def test_report_without_quality_or_baseline(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    history = {"config": {}, "rounds": [_round(1, 0.4, [])]}
    (out / "history.json").write_text(json.dumps(history))
    assert main(["report", str(out)]) == 0
    text = capsys.readouterr().out
    assert "(no quality records" in text
    assert any(
        _cells(line) == ["1", "0.4000", "-", "-", "-", "-", "-"] for line in text.splitlines()
    )


def test_report_missing_directory(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nope"
    assert main(["report", str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err
    assert "fedsd up" in err


def test_report_missing_history(tmp_path: Path, capsys) -> None:
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "history.json not found" in err
    assert "fedsd up" in err
