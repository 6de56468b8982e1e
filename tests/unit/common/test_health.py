"""fedsd.common.health: the one /health probe and the one poll-until loop."""

from __future__ import annotations

import http.server
import socket
import threading

import pytest

from fedsd.common.errors import DeployError
from fedsd.common.health import health_url, poll_until, probe_health, wait_healthy


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def _serve(status: int) -> tuple[http.server.HTTPServer, str]:
    handler = type("H", (_Health,), {"status": status})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"127.0.0.1:{server.server_address[1]}"


def test_probe_answers_none_on_200_and_why_otherwise():
    ok, ok_addr = _serve(200)
    bad, bad_addr = _serve(503)
    try:
        assert probe_health(ok_addr, None, insecure=True) is None
        assert probe_health(bad_addr, None, insecure=True) == "HTTP 503"
    finally:
        ok.shutdown()
        bad.shutdown()


def test_probe_says_refused_when_nothing_listens():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends
    assert probe_health(f"127.0.0.1:{port}", None, insecure=True).startswith("refused: ")
    assert probe_health("no-such-host.invalid:1", None, insecure=True).startswith("refused: ")


def test_health_url():
    assert health_url("h:9092") == "https://h:9092/health"
    assert health_url("h:9092", insecure=True) == "http://h:9092/health"


def test_poll_until_returns_the_first_answer_or_none_at_the_deadline():
    now = [0.0]
    clock = lambda: now[0]  # noqa: E731
    sleep = lambda s: now.__setitem__(0, now[0] + s)  # noqa: E731
    answers = iter([None, None, "up"])
    assert poll_until(lambda: next(answers), 10, 1.0, clock=clock, sleep=sleep) == "up"
    assert now[0] == 2.0
    calls = []
    assert poll_until(lambda: calls.append(1), 3, 1.0, clock=clock, sleep=sleep) is None
    assert len(calls) == 4  # at 0, 1, 2 and 3 s: the deadline is checked after each try


def test_poll_until_without_a_timeout_waits_for_the_answer():
    now = [0.0]
    clock = lambda: now[0]  # noqa: E731
    sleep = lambda s: now.__setitem__(0, now[0] + s)  # noqa: E731
    answers = iter([None] * 1000 + ["done"])
    assert poll_until(lambda: next(answers), None, 5.0, clock=clock, sleep=sleep) == "done"
    assert now[0] == 5000.0  # far past any deadline: only the answer ended the wait


def test_wait_healthy_returns_once_healthy_and_otherwise_names_the_last_reason():
    answers = iter(["refused: a", "HTTP 503", None])
    wait_healthy("127.0.0.1:1", lambda: next(answers), timeout=5, interval=0.01)

    said: list[str] = []

    def probe() -> str:
        said.append(f"refused: attempt {len(said) + 1}")
        return said[-1]

    with pytest.raises(DeployError, match=r"not healthy at https://127.0.0.1:1/health") as err:
        wait_healthy("127.0.0.1:1", probe, timeout=0.05, interval=0.01)
    assert len(said) > 1 and str(err.value).endswith(said[-1])
