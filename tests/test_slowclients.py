"""Slow clients (issue 9 item 3), black box over real sockets.

- 1 000 slowloris connections (a byte of a request head every 2 s, from a process of their own)
  against one worker leave normal traffic's p99 latency within 2x of its baseline, measured in
  the same test just before, with no error; and the worker still holds all 1 000 of them.
- `header_timeout` bounds the whole request head, however the bytes trickle in: 408.
- `body_timeout` bounds each pause in a request body, not the whole body: 408.
- `max_connections`: past it the worker stops accepting; what a client sees then.
"""

from __future__ import annotations

import json
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from backends import HTTPBackend, Reply
from strict_backend import StrictBackend
from support import (
    REPO,
    IncompleteResponse,
    Proxy,
    RawConn,
    active_connections,
    build_request,
    free_port,
)

pytestmark = pytest.mark.timeout(90)

SLOWLORIS = Path(__file__).with_name("slowloris.py")


def _raise_nofile(want: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))


def _p(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def _normal_traffic(fp: Proxy, seconds: float, max_requests: int = 20000) -> tuple[
        list[float], list[str]]:
    """Closed-loop keep-alive GETs from two client threads for `seconds`: (latencies, errors)."""
    lat: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client(k: int) -> None:
        n = 0
        conn = fp.connect(timeout=5)
        try:
            while time.monotonic() < deadline and n < max_requests // 2:
                t0 = time.perf_counter()
                try:
                    conn.send(build_request("GET", f"/normal/{k}/{n}"))
                    resp = conn.read_response(timeout=5)
                    ok = resp.status == 200 and resp.body.startswith(b"seen ")
                except (OSError, AssertionError) as e:
                    ok = False
                    resp = None  # type: ignore[assignment]
                    with lock:
                        errors.append(repr(e))
                    conn.close()
                    conn = fp.connect(timeout=5)
                dt = time.perf_counter() - t0
                if ok and "close" in resp.connection_tokens:  # keepalive_requests reached
                    conn.close()
                    conn = fp.connect(timeout=5)
                with lock:
                    lat.append(dt)
                    if not ok and resp is not None:
                        errors.append(f"{resp.status} {resp.body[:80]!r}")
                n += 1
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 15)
    return lat, errors


@pytest.fixture
def strict_app():
    app = StrictBackend()  # answers in one write with TCP_NODELAY: no Nagle in the figures
    yield app
    app.stop()


def test_slowloris_does_not_slow_normal_traffic(proxy, strict_app) -> None:
    n_slow = 1000
    _raise_nofile(n_slow + 512)
    app = strict_app
    admin = free_port()
    fp = proxy([app.address], server={"header_timeout": 60.0, "workers": 1},
               admin={"listen": f"127.0.0.1:{admin}"}, log={"level": "warning"})
    _normal_traffic(fp, 0.5)  # warm up the pool and the code paths
    base, base_err = _normal_traffic(fp, 3.0)
    assert not base_err, base_err[:5]

    loris = subprocess.Popen(
        [sys.executable, str(SLOWLORIS), "--port", str(fp.port), "--conns", str(n_slow),
         "--interval", "2", "--duration", "40"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert loris.stdout is not None and loris.stdin is not None
        ready = json.loads(loris.stdout.readline() or "{}")
        assert ready.get("connected") == n_slow, ready
        held, deadline = 0, time.monotonic() + 10
        while held < n_slow and time.monotonic() < deadline:  # accepted from the backlog yet?
            held = active_connections(admin)
            time.sleep(0.05)
        assert held >= n_slow, f"the worker holds {held} connections, not the {n_slow} slow ones"
        time.sleep(2.0)  # a full trickle round: every slow connection has sent another byte
        loaded, loaded_err = _normal_traffic(fp, 3.0)
        held_after = active_connections(admin)
        loris.stdin.close()
        done = json.loads(loris.stdout.readline() or "{}")
    finally:
        if loris.poll() is None:
            loris.kill()
        loris.wait(10)
    assert not loaded_err, loaded_err[:5]
    assert done.get("open") == n_slow and not done.get("answered"), \
        f"slow connections were closed or answered before header_timeout: {done}"
    assert held_after >= n_slow, held_after
    p99_base, p99_loaded = _p(base, 0.99), _p(loaded, 0.99)
    ratio = p99_loaded / p99_base
    print(f"normal traffic: baseline {len(base)} requests p50 {_p(base, 0.5) * 1e3:.3f} ms "
          f"p99 {p99_base * 1e3:.3f} ms; with {n_slow} slowloris connections {len(loaded)} "
          f"requests p50 {_p(loaded, 0.5) * 1e3:.3f} ms p99 {p99_loaded * 1e3:.3f} ms; "
          f"p99 ratio {ratio:.2f}; slowloris {done}")
    assert len(base) > 500 and len(loaded) > 500, (len(base), len(loaded))
    assert ratio <= 2.0, f"p99 {p99_base * 1e3:.2f} ms -> {p99_loaded * 1e3:.2f} ms ({ratio:.2f}x)"
    assert not [r for r in app.requests if r.target == b"/slowloris"]


# ---- header_timeout -------------------------------------------------------------------------

@pytest.fixture
def short(proxy, backend) -> tuple[Proxy, HTTPBackend]:
    app = backend("app")
    return proxy([app], server={"header_timeout": 1.0, "body_timeout": 0.5}), app


def _trickle_until_answer(c: RawConn, data: bytes, pause: float, limit: float) -> tuple[
        bytes, float, int]:
    """Send `data` a byte at a time every `pause` s until something comes back (or `limit`):
    (what came back, seconds since the first byte, bytes sent)."""
    c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t0 = time.monotonic()
    sent = 0
    while time.monotonic() - t0 < limit:
        if sent < len(data):
            try:
                c.sock.send(data[sent:sent + 1])
                sent += 1
            except OSError:
                break
        c.sock.settimeout(pause)
        try:
            got = c.sock.recv(65536)
        except TimeoutError:
            continue
        return got, time.monotonic() - t0, sent
    return b"", time.monotonic() - t0, sent


HEAD = b"GET /trickle HTTP/1.1\r\nHost: t\r\n" + b"X-Pad: " + b"p" * 200 + b"\r\n\r\n"


def test_header_timeout_bounds_the_whole_head(short) -> None:
    """A byte every 0.1 s keeps the connection busy but does not extend header_timeout."""
    fp, app = short
    with fp.connect(timeout=5) as c:
        got, took, sent = _trickle_until_answer(c, HEAD, 0.1, 5.0)
        assert got.startswith(b"HTTP/1.1 408 "), got[:100]
        assert 0.9 <= took < 1.8, took
        assert 5 < sent < len(HEAD), sent
        c.wait_closed(3)
    assert not app.seen(path="/trickle")
    assert fp.log.wait_for_event("client_error", status=408)


def test_header_timeout_for_a_later_request_on_a_kept_alive_connection(short) -> None:
    """The second head has header_timeout from its first byte, not from the connection's start,
    and the idle time before it does not count."""
    fp, app = short
    with fp.connect(timeout=5) as c:
        c.send(build_request("GET", "/first"))
        assert c.read_response().status == 200
        time.sleep(1.2)  # idle longer than header_timeout: keepalive_timeout applies, not it
        got, took, _ = _trickle_until_answer(c, HEAD, 0.1, 5.0)
        assert got.startswith(b"HTTP/1.1 408 "), got[:100]
        assert 0.9 <= took < 1.8, took
    assert [r.target for r in app.requests] == ["/first"]


def test_header_timeout_many_slow_connections(short) -> None:
    """200 slowloris connections at once: every one gets its 408 in time, nothing reaches the
    upstream, and a normal request is served meanwhile."""
    fp, app = short
    conns = [fp.connect(timeout=5) for _ in range(200)]
    t0 = time.monotonic()
    try:
        for c in conns:
            c.sock.sendall(HEAD[:10])
        time.sleep(0.4)
        for c in conns:
            c.sock.sendall(HEAD[10:20])
        assert fp.request("GET", "/meanwhile", timeout=3).status == 200
        for c in conns:
            resp = c.read_response(timeout=4)
            assert resp.status == 408
        took = time.monotonic() - t0
        assert took < 2.5, took
    finally:
        for c in conns:
            c.close()
    assert [r.target for r in app.requests] == ["/meanwhile"]


def test_silent_connection_closed_after_header_timeout(short) -> None:
    fp, _ = short
    with fp.connect(timeout=5) as c:
        t0 = time.monotonic()
        data = c.wait_closed(4)
        assert 0.9 <= time.monotonic() - t0 < 2.0
        assert data == b"" or data.startswith(b"HTTP/1.1 408 "), data[:100]


# ---- body_timeout ---------------------------------------------------------------------------

def test_body_timeout_bounds_each_pause_not_the_body(proxy, backend) -> None:
    """Pauses of 0.2 s (a fifth of body_timeout 1 s, so a loaded machine's late wake-up does not
    make one a timeout) over 2 s (twice body_timeout) are fine."""
    app = backend("app")
    fp = proxy([app], server={"header_timeout": 1.0, "body_timeout": 1.0})
    body = b"0123456789" * 4
    with fp.connect(timeout=5) as c:
        c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.send(b"POST /patient HTTP/1.1\r\nHost: t\r\nContent-Length: 40\r\n\r\n")
        t0 = time.monotonic()
        for i in range(0, len(body), 4):
            time.sleep(0.2)
            c.send(body[i:i + 4])
        resp = c.read_response(timeout=3)
        assert resp.status == 200, resp
        assert time.monotonic() - t0 >= 2.0
    (req,) = app.seen("POST", "/patient")
    assert req.complete and req.body == body


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_body_timeout_408_on_a_stalled_body(short, framing) -> None:
    fp, app = short
    if framing == "chunked":
        head = b"POST /stalled HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        part = b"a\r\n0123456789\r\n"
    else:
        head = b"POST /stalled HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n"
        part = b"0123456789"
    with fp.connect(timeout=5) as c:
        c.send(head + part)
        t0 = time.monotonic()
        time.sleep(0.3)
        c.send(part)  # one more piece within body_timeout: the clock restarts
        resp = c.read_response(timeout=4)
        took = time.monotonic() - t0
        assert resp.status == 408, resp
        assert 0.7 <= took < 1.6, took
        c.wait_closed(3)
    time.sleep(0.1)
    assert not [r for r in app.seen(path="/stalled") if r.complete], \
        "the upstream never receives a complete request"
    assert fp.log.wait_for_event("client_error", status=408)


# ---- max_connections ------------------------------------------------------------------------

def test_max_connections_accept_waits_then_connects_time_out(proxy, backend) -> None:
    """`max_connections = 3`, `backlog = 2`: past 3 connections the worker stops accepting. The
    kernel still completes handshakes into the listen queue (backlog + 1 = 3 of them): those
    clients connect at once and their requests wait, unanswered, until a connection closes.
    Once that queue is full too, new SYNs are dropped: connect() itself hangs (the client
    retransmits its SYN) and a client with a 1 s connect timeout gets a timeout."""
    app = backend("app", handler=lambda r: Reply(200, body=r.target.encode()))
    fp = proxy([app], server={"max_connections": 3, "backlog": 2})
    held = [fp.connect(timeout=3) for _ in range(3)]
    queued: list[RawConn] = []
    try:
        for i, c in enumerate(held):
            c.send(build_request("GET", f"/held{i}"))
            assert c.read_response().body == f"/held{i}".encode()
        for i in range(3):
            c = fp.connect(timeout=1.0)  # completes: the kernel's listen queue has room
            queued.append(c)
            c.send(build_request("GET", f"/queued{i}"))
        for c in queued:
            with pytest.raises(IncompleteResponse):
                c.read_response(timeout=0.3)  # waiting: not refused, not answered
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            socket.create_connection(fp.address, timeout=1.0)  # SYN dropped: connect hangs
        assert time.monotonic() - t0 >= 0.9
        assert not app.seen(path="/queued0")
        held[0].close()  # a slot frees: the first queued connection is accepted and served
        assert queued[0].read_response(timeout=3).body == b"/queued0"
        with pytest.raises(IncompleteResponse):
            queued[1].read_response(timeout=0.3)  # the worker is at max_connections again
        queued[0].close()
        assert queued[1].read_response(timeout=3).body == b"/queued1"
    finally:
        for c in held + queued:
            c.close()
