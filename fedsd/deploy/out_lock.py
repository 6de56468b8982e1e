"""One ``fedsd up`` per OUT: an exclusive lock a second run is refused by, naming the
first one's pid."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from fedsd.common.errors import OutInUse
from fedsd.common.health import poll_until

LOCK_NAME = ".fedsd-up.lock"


@contextlib.contextmanager
def hold_out_lock(*dirs: str | os.PathLike[str]) -> Iterator[None]:
    """One ``fedsd up`` per OUT: an exclusive ``flock`` on ``DIR/.fedsd-up.lock`` (our pid
    written in it) for each of ``dirs``, held until the block ends.

    Taken before anything in OUT is touched, so a second run cannot move the first one's
    state.db aside or rewrite its connection. The kernel drops the lock when the holder
    dies, so a crashed run never blocks the next one.
    """
    fds: list[int] = []
    try:
        for d in dict.fromkeys(Path(x) for x in dirs):  # once each, in order
            d.mkdir(parents=True, exist_ok=True)
            path = d / LOCK_NAME
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            fds.append(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _lock_holder(fd)
                raise OutInUse(
                    f"{d} is in use by another fedsd up (pid {holder}); wait for it to end "
                    f"or stop it (kill {holder}), or use another --out"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        for fd in fds:
            os.close(fd)  # releases the lock; the file stays (unlinking it would race)


def _lock_holder(fd: int) -> str:
    """The pid the holder wrote (it writes it right after locking: wait a moment for it)."""

    def pid() -> str | None:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        return text if text.isdigit() else None

    return poll_until(pid, 1.0, 0.05) or "unknown"
