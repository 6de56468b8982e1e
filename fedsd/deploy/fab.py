"""The FAB of a Flower app directory, as ``flwr run`` builds it, without walking what the
app's ``.gitignore`` leaves out.

Flower's builder (``flwr.cli.build.build_fab_from_disk``) walks every file under the app
directory and only then drops what ``.gitignore`` and its include rules leave out. fedsd's
app directory is the repository root, so a virtualenv inside it (``.venv``, as ``make``
creates one) is walked at every build: 13 s per build on a CI clone here, at every
``fedsd up`` (the nodes' ``self`` pin) and again at every ``flwr run``. Here a directory the
``.gitignore`` excludes is never entered; Flower's own filters then pick the files, so the
FAB is the same bytes (``tests/unit/deploy/test_pinning.py`` compares it with Flower's).
``stage_app`` copies those files to a directory that ``flwr run`` packs into that FAB.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

GITIGNORE = ".gitignore"


def app_files(app_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Relative POSIX path -> file, for every file Flower would consider, minus the
    directories the app's ``.gitignore`` excludes (none of whose files Flower packs)."""
    from flwr.cli.utils import build_pathspec, load_gitignore_patterns

    root = Path(app_dir).expanduser().resolve()
    ignore = root / GITIGNORE
    patterns = list(load_gitignore_patterns(ignore.read_bytes() if ignore.is_file() else b""))
    spec = build_pathspec(patterns)
    # A negated pattern may re-include a file below an excluded directory: such a
    # directory is walked after all, and Flower's filter decides.
    negated = [p[1:].lstrip("/") for p in patterns if p.startswith("!")]
    files: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel = Path(dirpath).relative_to(root).as_posix()
        prefix = "" if rel == "." else f"{rel}/"

        def pruned(name: str, prefix: str = prefix) -> bool:
            sub = f"{prefix}{name}/"
            if not spec.match_file(sub):
                return False
            return not any(n.startswith(sub) or n.startswith("*") for n in negated)

        dirnames[:] = [d for d in dirnames if not pruned(d)]
        for name in filenames:
            path = Path(dirpath) / name
            if not path.is_symlink():  # as Flower: symlinks are never packed
                files[f"{prefix}{name}"] = path
    return files


def fab_bytes(app_dir: str | os.PathLike[str]) -> bytes:
    """The FAB ``flwr run``/``flwr build`` make from ``app_dir``."""
    from flwr.cli.build import build_fab_from_files

    return build_fab_from_files(app_files(app_dir))[0]


def fab_hash(app_dir: str | os.PathLike[str]) -> str:
    """SHA-256 of ``fab_bytes(app_dir)``."""
    return hashlib.sha256(fab_bytes(app_dir)).hexdigest()


def stage_app(app_dir: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Path:
    """Copy the files of ``app_dir`` that its FAB can hold to ``dest`` (replaced), and
    return ``dest``: ``flwr run dest`` builds the same FAB as ``flwr run app_dir``."""
    from flwr.cli.utils import filter_paths_for_publish

    files = filter_paths_for_publish(app_files(app_dir))
    out = Path(dest)
    if out.exists():
        shutil.rmtree(out)
    for rel, src in files.items():
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
    return out
