"""fedsd.deploy.fab: the FAB of an app directory without walking what .gitignore excludes
is the same bytes as Flower's own build, and a staged copy packs into that FAB too."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from flwr.cli.build import build_fab_from_disk

from fedsd.deploy.fab import app_files, fab_bytes, fab_hash, stage_app

REPO = Path(__file__).resolve().parents[3]
BARE = REPO / "tests" / "fixtures" / "bare_app"


def _app_with_clutter(tmp_path: Path) -> Path:
    """The bare app with what a working copy holds: an ignored virtualenv with Python in it,
    an ignored folder with one file re-included by a negated pattern, caches."""
    app = shutil.copytree(BARE, tmp_path / "bare-app")
    (app / ".gitignore").write_text(".venv/\n__pycache__/\n/out/**\n!/out/keep.md\n")
    venv = app / ".venv" / "lib" / "site-packages" / "pkg"
    venv.mkdir(parents=True)
    (venv / "mod.py").write_text("x = 1\n")
    (app / "out").mkdir()
    (app / "out" / "keep.md").write_text("kept\n")
    (app / "out" / "drop.md").write_text("dropped\n")
    return app


def test_same_fab_as_flower_without_entering_ignored_directories(tmp_path):
    app = _app_with_clutter(tmp_path)
    files = app_files(app)
    assert not any(rel.startswith(".venv/") for rel in files)  # never walked
    assert "out/keep.md" in files  # a negated pattern below an ignored path: walked
    assert fab_bytes(app) == build_fab_from_disk(app)
    assert fab_hash(app) == hashlib.sha256(build_fab_from_disk(app)).hexdigest()
    assert fab_hash(REPO) == hashlib.sha256(build_fab_from_disk(REPO)).hexdigest()


def test_staged_copy_packs_into_the_same_fab_and_replaces_an_old_one(tmp_path):
    app = _app_with_clutter(tmp_path)
    dest = tmp_path / "work" / "app"
    dest.mkdir(parents=True)
    (dest / "stale.py").write_text("from an earlier run\n")
    staged = stage_app(app, dest)
    assert staged == dest and not (dest / "stale.py").exists()
    assert not (dest / ".venv").exists()
    assert build_fab_from_disk(staged) == build_fab_from_disk(app)
