"""The C core (proxy/_core.pyx, `FAILPROXY_CORE=1`): it accepts a client connection and hands it
to the Python relay (downstream.ClientConnection.adopt) at its first byte, when its timer fires,
when the client half-closes, or when the worker drains; whatever the moment, the connection is
then served, timed and counted exactly as the relay's own. `make test` also runs the relay's
suites that touch these moments with the core on (Makefile, CORE_TESTS).

Real processes and sockets: a worker started with the core, a raw client.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from support import active_connections, build_request, free_port

EXPECT = os.environ.get("FAILPROXY_EXPECT_BUILD", "")
compiled_only = pytest.mark.skipif(EXPECT != "compiled",
                                   reason="the core exists only in the compiled build")


@pytest.fixture
def core(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAILPROXY_CORE", "1")


def _wait_active(port: int, want: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while (got := active_connections(port)) != want:
        assert time.monotonic() < deadline, f"{got} connections active, not {want}"
        time.sleep(0.02)


@compiled_only
def test_started_says_the_core_runs(core, proxy, backend) -> None:
    fp = proxy([backend("app")])
    started = fp.log.wait_for_event("started")
    assert started["core"] is True
    assert fp.request("GET", "/x").status == 200


def test_without_the_switch_the_relay_serves_alone(proxy, backend, monkeypatch) -> None:
    monkeypatch.delenv("FAILPROXY_CORE", raising=False)
    fp = proxy([backend("app")])
    started = fp.log.wait_for_event("started")
    assert started["core"] is False


def test_the_pure_build_never_runs_the_core() -> None:
    env = dict(os.environ, FAILPROXY_PURE="1", FAILPROXY_CORE="1")
    out = subprocess.run(
        [sys.executable, "-c", "from failproxy.proxy.core import core_class; print(core_class())"],
        capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "None\n"


@compiled_only
def test_a_request_is_handed_over_and_the_connection_kept(core, proxy, backend) -> None:
    app = backend("app")
    fp = proxy([app])
    with fp.connect() as c:
        c.send(build_request("GET", "/one"))
        assert c.read_response().status == 200
        c.send(build_request("GET", "/two"))
        assert c.read_response().status == 200
    assert [r.target for r in app.requests] == ["/one", "/two"]
    assert fp.log.wait_for_event("request", path="/two")["status"] == 200


@compiled_only
def test_a_head_split_at_its_first_byte(core, proxy, backend) -> None:
    """The first read hands over one byte; the relay parses the rest as one head."""
    app = backend("app")
    fp = proxy([app])
    data = build_request("GET", "/split")
    with fp.connect() as c:
        c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.send(data[:1])
        time.sleep(0.05)  # two reads, not one: what is tested is the hand-over between them
        c.send(data[1:])
        assert c.read_response().status == 200
    assert [r.target for r in app.requests] == ["/split"]


@compiled_only
def test_a_silent_connection_keeps_the_head_deadline_from_its_start(core, proxy, backend) -> None:
    """Nothing sent: the core's timer fires at header_timeout from the connection's start and
    the relay answers as it would have (408, or a close)."""
    fp = proxy([backend("app")], server={"header_timeout": 1.0})
    with fp.connect(timeout=5) as c:
        t0 = time.monotonic()
        data = c.wait_closed(4)
        took = time.monotonic() - t0
    assert 0.9 <= took < 2.0, took
    assert data == b"" or data.startswith(b"HTTP/1.1 408 "), data[:100]


@compiled_only
def test_a_late_first_byte_does_not_restart_the_head_deadline(core, proxy, backend) -> None:
    """The first byte at 0.6 s of a 1 s header_timeout: the head still has only what is left."""
    app = backend("app")
    fp = proxy([app], server={"header_timeout": 1.0})
    with fp.connect(timeout=5) as c:
        t0 = time.monotonic()
        time.sleep(0.6)
        c.send(b"GET /late HTTP/1.1\r\n")  # the head is never finished
        data = c.wait_closed(4)
        took = time.monotonic() - t0
    assert data.startswith(b"HTTP/1.1 408 "), data[:100]
    assert 0.9 <= took < 1.5, took
    assert not app.requests


@compiled_only
def test_a_half_close_before_any_byte_closes(core, proxy, backend) -> None:
    admin = free_port()
    fp = proxy([backend("app")], admin={"listen": f"127.0.0.1:{admin}"})
    with fp.connect() as c:
        c.sock.shutdown(socket.SHUT_WR)
        assert c.wait_closed(3) == b""
    _wait_active(admin, 0)


@compiled_only
def test_a_request_and_a_half_close_in_one_go(core, proxy, backend) -> None:
    """The client sends its request and its FIN at once (`nc -q`): answered, then closed."""
    app = backend("app")
    fp = proxy([app])
    with fp.connect() as c:
        c.send(build_request("GET", "/fin"))
        c.sock.shutdown(socket.SHUT_WR)
        assert c.read_response().status == 200
        assert c.wait_closed(3) == b""
    assert [r.target for r in app.requests] == ["/fin"]


@compiled_only
def test_connections_are_counted_once_across_the_hand_over(core, proxy, backend) -> None:
    admin = free_port()
    fp = proxy([backend("app")], admin={"listen": f"127.0.0.1:{admin}"})
    conns = [fp.connect() for _ in range(3)]
    try:
        _wait_active(admin, 3)  # still the core's
        conns[0].send(build_request("GET", "/a"))
        assert conns[0].read_response().status == 200
        _wait_active(admin, 3)  # one of them the relay's now
    finally:
        for c in conns:
            c.close()
    _wait_active(admin, 0)


@compiled_only
def test_a_drained_idle_connection_still_gets_its_request_answered(core, proxy, backend) -> None:
    """SIGQUIT while a connection is the core's and idle: the relay's drain rules apply (its
    grace), so a request sent right then is answered, with Connection: close."""
    app = backend("app")
    fp = proxy([app])
    with fp.connect() as c:
        c.send(build_request("GET", "/warm"))
        assert c.read_response().status == 200
    with fp.connect() as c:
        mark = fp.log.mark()
        fp.send_signal(signal.SIGQUIT)
        fp.log.wait_for_event("worker_stopping", since=mark)  # the worker drains from here
        c.send(build_request("GET", "/during"))
        resp = c.read_response()
        assert resp.status == 200
        assert "close" in resp.connection_tokens
    assert fp.wait_exit(5) == 0
    assert [r.target for r in app.requests] == ["/warm", "/during"]
