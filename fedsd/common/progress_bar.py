"""Progress of long work where a person waits: a tqdm bar on a terminal, plain lines elsewhere.

A terminal gets a bar on stderr. Anywhere else (a node's log, CI, a pipe) a bar would be
noise, so the same calls print a line every ``interval`` seconds and one at the end, each
with the count and the rate, e.g. ``fedsd node: encoding train split: 400/400 img in 12.1 s
(33.1 img/s)``. tqdm is imported only when a bar is shown.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any, TextIO, TypeVar

T = TypeVar("T")


class Progress:
    """Count work done (``update(n)``) and show it; a context manager (``with progress(...)``)."""

    def __init__(
        self,
        desc: str,
        total: int | None = None,
        unit: str = "img",
        *,
        stream: TextIO | None = None,
        interval: float = 10.0,
        bar: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.desc, self.total, self.unit = desc, total, unit
        self.stream = stream if stream is not None else sys.stderr
        self.interval, self.clock = interval, clock
        self.done = 0
        self._shown = -1  # the count the last line showed
        self.start = self.last = clock()
        use_bar = bar if bar is not None else _is_terminal(self.stream)
        self._bar: Any = None
        if use_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, leave=True)

    def update(self, n: int = 1) -> None:
        """Count ``n`` more units done."""
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = self.clock()
        if now - self.last >= self.interval:
            self.last = now
            self._line(now)

    def close(self) -> None:
        """Finish: close the bar, or print the final line."""
        if self._bar is not None:
            self._bar.close()
        elif self._shown != self.done:
            self._line(self.clock())

    def _line(self, now: float) -> None:
        self._shown = self.done
        elapsed = max(now - self.start, 1e-9)
        of = f"/{self.total}" if self.total is not None else ""
        rate = self.done / elapsed
        print(
            f"{self.desc}: {self.done}{of} {self.unit} in {elapsed:.1f} s "
            f"({rate:.1f} {self.unit}/s)",
            file=self.stream,
            flush=True,
        )

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def progress(desc: str, total: int | None = None, unit: str = "img", **kwargs: Any) -> Progress:
    """A ``Progress`` for ``desc`` (see the module docstring)."""
    return Progress(desc, total, unit, **kwargs)


def track(
    items: Iterable[T], desc: str, total: int | None = None, unit: str = "img", **kwargs: Any
) -> Iterator[T]:
    """Yield ``items``, counting each one done as the next is asked for."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(desc, total, unit, **kwargs) as bar:
        for item in items:
            yield item
            bar.update()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
