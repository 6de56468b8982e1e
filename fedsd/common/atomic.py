"""Crash-safe writes: a file or a directory of files is either the old one or the new one.

A rename alone is not enough: after a power loss or a kill, the renamed file may have no
data yet (the data was never flushed) and the rename itself may be lost (the directory
was never flushed). So: write a temporary in the same directory, fsync it, rename it over
the target, fsync the directory. A writer killed mid-way leaves only a temporary, named
``.<name>.tmp-<pid>-<hex>``, which ``remove_temporaries`` deletes when the directory is
next opened. Standard library only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os
import re
import secrets
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO

# What a temporary of this module is called: ".<target>.tmp-<pid>-<hex>".
_TEMP_RE = re.compile(r"^\..+\.tmp-\d+-[0-9a-f]+$")
# Temporaries of the writers this module replaced (history.tmp123, round-3.tmp, latest.old).
_LEGACY_RE = re.compile(r"^(history\.tmp\d+|.+\.tmp|(latest|round-\d+)\.old)$")

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` says the file system (or the user's quota) has no space left."""
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS


def temp_name(target: str | os.PathLike[str]) -> Path:
    """A fresh temporary's path next to ``target`` (same directory, so the rename is atomic)."""
    p = Path(target)
    return p.with_name(f".{p.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def is_temporary(name: str) -> bool:
    """Whether a directory entry is a temporary a killed writer left behind."""
    return bool(_TEMP_RE.match(name) or _LEGACY_RE.match(name))


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a directory's entries (a rename or a new name in it) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def write_file_with(
    path: str | os.PathLike[str],
    write: Callable[[BinaryIO], None],
    *,
    mode: int | None = None,
) -> Path:
    """Atomically replace ``path`` with what ``write(fh)`` writes to a binary file.

    ``mode`` (exact, never wider while being written) or the default ``0o666 & ~umask``.
    On any error the temporary is removed and the old file is left as it was.
    """
    target = Path(path)
    tmp = temp_name(target)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            if mode is not None:
                os.fchmod(fh.fileno(), mode)
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        _remove(tmp)
        raise
    fsync_dir(target.parent)
    return target


def write_file(path: str | os.PathLike[str], data: bytes | str, *, mode: int | None = None) -> Path:
    """Atomically replace ``path`` with ``data`` (str is written as UTF-8)."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return write_file_with(path, lambda fh: fh.write(raw), mode=mode)


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    name = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(name, use_errno=True), "renameat2", None) if name else None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False  # this file system cannot swap: the caller renames aside instead
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def write_dir(path: str | os.PathLike[str], files: Mapping[str, bytes]) -> Path:
    """Atomically replace the directory ``path`` with one holding exactly ``files``.

    Each file is fsync'd, then the new directory, then it is swapped in for the old one in
    one step where the file system can (Linux), else the old one is renamed aside first; the
    parent is fsync'd last. On any error the temporary is removed and the old one kept.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(target)
    tmp.mkdir()
    try:
        for name, data in files.items():
            if "/" in name or name.startswith("."):
                raise ValueError(f"invalid file name {name!r}")
            fd = os.open(tmp / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(tmp)
        if not target.exists():
            os.rename(tmp, target)
        elif not _exchange(tmp, target):
            aside = temp_name(target)  # a kill now leaves no target: the caller repairs it
            os.rename(target, aside)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(aside, target)
                raise
            tmp = aside
        # tmp now holds the old directory (or nothing)
    except BaseException:
        _remove(tmp)
        raise
    fsync_dir(target.parent)
    _remove(tmp)
    return target


def remove_temporaries(directory: str | os.PathLike[str]) -> list[str]:
    """Delete the temporaries killed writers left in ``directory``; their names, sorted."""
    root = Path(directory)
    removed = []
    for entry in sorted(root.iterdir()):
        if is_temporary(entry.name):
            _remove(entry)
            removed.append(entry.name)
    if removed:
        fsync_dir(root)
    return removed
