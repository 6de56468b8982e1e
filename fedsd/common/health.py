"""One health probe for a Flower SuperLink (``GET /health``) and one poll-until loop.

``poll_until`` is every wait of fedsd's own (services up, nodes online, a run's verdict,
processes gone). ``fedsd up`` waits for its SuperLink with them, the launchers watch a
SuperLink elsewhere for outages, the SuperLink exporter reports its health, and the
containers' health check (``fedsd.deploy.containers.healthcheck``) probes its URLs with
:func:`probe_url`. Standard library only: the SuperLink image runs that health check
without fedsd's dependencies.
"""

from __future__ import annotations

import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import TypeVar

from fedsd.common.errors import DeployError

T = TypeVar("T")


def health_url(address: str, *, insecure: bool = False) -> str:
    """``https://ADDRESS/health`` (``http`` without TLS)."""
    return f"{'http' if insecure else 'https'}://{address}/health"


def probe_health(
    address: str, ca_cert: str | None, *, insecure: bool = False, timeout: float = 5.0
) -> str | None:
    """None when ``GET /health`` answers 200, else why not. ``refused: ...`` means nothing
    serves the address (connection refused, or the name does not resolve)."""
    return probe_url(health_url(address, insecure=insecure), ca_cert, timeout=timeout)


def probe_url(url: str, ca_cert: str | None = None, *, timeout: float = 5.0) -> str | None:
    """None when ``GET url`` answers 200, else why not (as :func:`probe_health`). An
    ``https`` URL's certificate is verified against ``ca_cert`` (None: the system's CAs)."""
    ctx = ssl.create_default_context(cafile=ca_cert) if url.startswith("https:") else None
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=timeout) as resp:
            return None if resp.status == 200 else f"HTTP {resp.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, ConnectionRefusedError | socket.gaierror):
            return f"refused: {reason}"
        return str(reason) or type(reason).__name__


def poll_until(
    check: Callable[[], T | None],
    timeout: float | None,
    interval: float,
    *,
    max_interval: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> T | None:
    """Call ``check`` every ``interval`` s until it returns something other than None
    (returned), or until ``timeout`` s have passed (None; ``check`` ran at least once).
    ``timeout=None``: no time limit (``check`` alone decides when the wait ends). A check
    that needs to say why it gave up keeps its last finding itself (a closure).
    ``max_interval``: the wait doubles after each check, from ``interval`` up to it (fast
    while an answer is likely near, sparing the other side a long wait's many calls)."""
    deadline = None if timeout is None else clock() + timeout
    wait = interval
    while True:
        got = check()
        if got is not None or (deadline is not None and clock() >= deadline):
            return got
        sleep(wait)
        if max_interval is not None:
            wait = min(max_interval, wait * 2)


def wait_healthy(
    address: str, probe: Callable[[], str | None], timeout: float, interval: float
) -> None:
    """Poll ``probe`` (None: healthy, else why not) until the SuperLink at ``address`` is
    healthy; after ``timeout`` s, ``DeployError`` with the last reason. ``probe`` may raise
    to end the wait early (e.g. the SuperLink process exited)."""
    why: list[str | None] = []

    def healthy() -> bool | None:
        why.append(probe())
        return True if why[-1] is None else None

    if poll_until(healthy, timeout, interval) is None:
        raise DeployError(
            f"SuperLink not healthy at {health_url(address)} after {timeout:.0f}s: {why[-1]}"
        )
