"""The C core (proxy/_core.pyx, the compiled build's default; `FAILPROXY_CORE=0` turns it off):
it answers the common request itself and hands the rest to the Python relay
(downstream.ClientConnection.adopt, Exchange.adopt), when its timer fires, when the client
half-closes, or when the worker drains; whatever the moment, the connection is then served,
timed and counted exactly as the relay's own. The whole compiled suite runs with the core on;
`make test` runs the relay's suites again with it off (Makefile, RELAY_TESTS).

Real processes and sockets: a worker started with the core, a raw client.
"""

from __future__ import annotations

import asyncio
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from backends import HANG, RESET, HTTPBackend, Reply, Request
from inprocess import FakeTransport, Harness, request
from support import Proxy, active_connections, build_request, free_port, settled_metric

from failproxy.proxy.corebooks import InFlight
from failproxy.proxy.downstream import ClientConnection
from failproxy.routing.peer import Peer

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


def test_switched_off_the_relay_serves_alone(proxy, backend, monkeypatch) -> None:
    monkeypatch.setenv("FAILPROXY_CORE", "0")
    fp = proxy([backend("app")])
    started = fp.log.wait_for_event("started")
    assert started["core"] is False
    assert fp.request("GET", "/x").status == 200


def test_the_core_is_the_compiled_builds_default(proxy, backend, monkeypatch) -> None:
    """Nothing set: the compiled build runs the core, the others cannot."""
    monkeypatch.delenv("FAILPROXY_CORE", raising=False)
    fp = proxy([backend("app")])
    started = fp.log.wait_for_event("started")
    assert started["core"] is (EXPECT == "compiled")


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
    """The first byte at 1.5 s of a 2 s header_timeout: the head still has only what is left
    (2 s from the accept; a deadline restarted by that byte would be 3.5 s). The margins leave
    a loaded machine a second either way."""
    app = backend("app")
    fp = proxy([app], server={"header_timeout": 2.0})
    with fp.connect(timeout=8) as c:
        t0 = time.monotonic()
        time.sleep(1.5)
        c.send(b"GET /late HTTP/1.1\r\n")  # the head is never finished
        data = c.wait_closed(6)
        took = time.monotonic() - t0
    assert data.startswith(b"HTTP/1.1 408 "), data[:100]
    assert 1.9 <= took < 3.0, took
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


# ---- the core's own answers against the relay's -------------------------------------------------

def _reply(req: Request) -> Reply | str:
    """The upstream's answer for each case below, by target. Each closes its connection, as
    unicorn does: a connection the relay pooled would make the next requests the relay's too
    (CoreBooks.begin leaves a socket with an idle connection to it to the relay)."""
    target = req.target
    if target.startswith("/chunked"):
        return Reply(body=[b"one", b"two"], chunked=True, close=True)
    if target.startswith("/to-close"):
        return Reply(body=b"until the end", close_delimited=True)
    if target.startswith("/204"):
        return Reply(204, no_length=True, close=True)
    if target.startswith("/304"):
        return Reply(304, no_length=True, close=True)
    if target.startswith("/503"):
        return Reply(503, body=b"busy", close=True)
    if target.startswith("/404"):
        return Reply(404, body=b"no such thing", close=True)
    if target.startswith("/interim"):
        return Reply(body=b"after hints", close=True,
                     interim=[b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n"])
    if target.startswith("/reset"):
        return RESET
    if target.startswith("/listed"):
        return Reply(body=b"x", headers=[("Connection", "X-Private"), ("X-Private", "1")],
                     close=True)
    if target.startswith("/big"):
        return Reply(body=b"b" * 300_000, close=True)
    if target.startswith("/split"):
        return Reply(body=[b"first half, ", b"second half"], content_length=23, part_delay=0.05,
                     close=True)
    if target.startswith("/accel"):
        return Reply(body=b"x", headers=[("X-Accel-Buffering", "no")], close=True)
    return Reply(body=b"plain " + target.encode(), headers=[("X-App", "a"), ("Set-Cookie", "c=1")],
                 close=True)


def _get(target: str, *extra: str, version: str = "1.1", host: bool = True,
         method: str = "GET") -> bytes:
    lines = [f"{method} {target} HTTP/{version}"] + (["Host: core.test"] if host else [])
    return ("\r\n".join([*lines, *extra]) + "\r\n\r\n").encode()


# (name, what the client sends, responses it reads, how many of them the core answers)
CASES: list[tuple[str, bytes, list[str], int]] = [
    ("plain", _get("/a?x=1", "User-Agent: t", "Accept: */*"), ["GET"], 1),
    ("head", _get("/a", method="HEAD"), ["HEAD"], 1),
    ("close", _get("/a", "Connection: close"), ["GET"], 1),
    ("spelled", _get("/a", "CONNECTION: Keep-Alive"), ["GET"], 1),
    ("http10-keep", _get("/a", "Connection: keep-alive", version="1.0"), ["GET"], 1),
    ("http10", _get("/a", version="1.0"), ["GET"], 1),
    ("http10-no-host", _get("/a", version="1.0", host=False), ["GET"], 0),
    ("pipelined", _get("/p1") + _get("/p2"), ["GET", "GET"], 2),
    ("dropped", _get("/a", "Keep-Alive: 5", "X_Under: 1", "Proxy-Connection: close"), ["GET"], 1),
    ("204", _get("/204"), ["GET"], 1),
    ("304", _get("/304"), ["GET"], 1),
    ("404", _get("/404"), ["GET"], 1),
    ("split", _get("/split"), ["GET"], 1),
    ("chunked", _get("/chunked"), ["GET"], 1),
    ("chunked-http10", _get("/chunked", version="1.0"), ["GET"], 1),
    ("chunked-head", _get("/chunked", method="HEAD"), ["HEAD"], 1),
    # the relay's, from the request
    ("xff", _get("/a", "X-Forwarded-For: 192.0.2.1"), ["GET"], 0),
    ("request-id", _get("/a", "X-Request-Id: mine"), ["GET"], 0),
    ("body", _get("/a", "Content-Length: 3") + b"abc", ["GET"], 0),
    ("post", _get("/a", "Content-Length: 0", method="POST"), ["POST"], 0),
    ("listed", _get("/a", "Connection: keep-alive, X-Mine", "X-Mine: 1"), ["GET"], 0),
    ("absolute", b"GET http://core.test/a HTTP/1.1\r\nHost: core.test\r\n\r\n", ["GET"], 0),
    ("two-hosts", _get("/a", "Host: other.test"), ["GET"], 0),
    # the relay's, from the answer (handed over in flight)
    ("to-close", _get("/to-close"), ["GET"], 0),
    ("503", _get("/503"), ["GET"], 0),
    ("interim", _get("/interim"), ["GET"], 0),
    ("reset", _get("/reset"), ["GET"], 0),
    ("listed-answer", _get("/listed"), ["GET"], 0),
    ("big", _get("/big"), ["GET"], 0),
    ("accel", _get("/accel"), ["GET"], 0),
]


def _same_across(name: str, value: str) -> str:
    """What differs between the two proxies by design: the request id, and the address the
    client reached (a Host for a request that sent none)."""
    if name.lower() in ("x-request-id", "x-trace"):
        return "<id>"
    if name.lower() == "host" and value.startswith("127.0.0.1:"):
        return "<the proxy>"
    return value


def _seen(app: HTTPBackend, since: int) -> list[tuple[str, str, list[tuple[str, str]]]]:
    return [(r.method, r.target, [(k, _same_across(k, v)) for k, v in r.headers])
            for r in app.requests[since:]]


def _exchange(fp: Proxy, data: bytes, methods: list[str]) -> list[tuple[object, ...]]:
    out: list[tuple[object, ...]] = []
    with fp.connect(timeout=10) as c:
        c.send(data)
        for method in methods:
            r = c.read_response(method)
            out.append((r.status, r.reason, r.version,
                        [(k, _same_across(k, v)) for k, v in r.headers], r.body,
                        [i.status for i in r.interim]))
    return out


def _same_through_both(core: Proxy, relay: Proxy, app: HTTPBackend, name: str, data: bytes,
                       methods: list[str]) -> None:
    """`data` sent through the core, then through the relay: the client reads the same
    answers and the app sees the same requests."""
    mark = len(app.requests)
    got_core = _exchange(core, data, methods)
    seen_core = _seen(app, mark)
    mark = len(app.requests)
    got_relay = _exchange(relay, data, methods)
    seen_relay = _seen(app, mark)
    assert got_core == got_relay, name
    assert seen_core == seen_relay, name


def _core_requests(admin: int, expected: int = 0) -> int:
    """The core's answers, once they reached `expected` (or not, within a few seconds)."""
    return settled_metric(admin, "failproxy_core_requests_total", expected)


def _handovers(admin: int, expected: int) -> int:
    return settled_metric(admin, "failproxy_core_handovers_total", expected)


# The counters a request makes, which the core makes as C calls into the worker's slot
# (WorkerMetrics.core_cells) where the relay calls the metrics' methods.
REQUEST_COUNTERS = ("failproxy_requests_total{", "failproxy_request_duration_seconds_count",
                    "failproxy_upstream_requests_total{",
                    "failproxy_upstream_connect_duration_seconds_count{")


def _counts(admin: int) -> dict[str, float]:
    """The samples of REQUEST_COUNTERS, by name and labels, from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as r:
        lines = r.read().decode().splitlines()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines
            if line.startswith(REQUEST_COUNTERS)}


def _same_counts(one: int, other: int, timeout: float = 5.0) -> tuple[dict[str, float], ...]:
    """Both workers' request counters, once they are equal (a worker publishes them at its
    turn's end) or `timeout` passed: the caller asserts on them."""
    deadline = time.monotonic() + timeout
    while True:
        a, b = _counts(one), _counts(other)
        if a == b or time.monotonic() > deadline:
            return a, b
        time.sleep(0.02)


@compiled_only
def test_the_core_answers_as_the_relay_does(proxy, backend, monkeypatch) -> None:
    """Every case twice, through a worker with the core and one without, to the same upstream
    on a UNIX socket: the client reads the same answers, the upstream sees the same requests,
    and the core answered exactly the common ones (the rest were handed over, before the
    request went upstream or with it in flight)."""
    app = backend("app", unix=True, handler=_reply)
    admin_core, admin_relay = free_port(), free_port()
    monkeypatch.setenv("FAILPROXY_CORE", "1")
    core = proxy([app], admin={"listen": f"127.0.0.1:{admin_core}"})
    monkeypatch.setenv("FAILPROXY_CORE", "0")
    relay = proxy([app], admin={"listen": f"127.0.0.1:{admin_relay}"})
    answered = 0
    for name, data, methods, by_core in CASES:
        _same_through_both(core, relay, app, name, data, methods)
        answered += by_core
        assert _core_requests(admin_core, answered) == answered, name
    assert _core_requests(admin_relay) == 0
    # each case it did not answer, it handed over once (a connection that ends with nothing of
    # a request is not a request handed over)
    handed = sum(1 for case in CASES if not case[3])
    assert _handovers(admin_core, handed) == handed
    # the same counts, by status, by server, and in the connect and duration histograms
    counts_core, counts_relay = _same_counts(admin_core, admin_relay)
    assert counts_core == counts_relay
    assert counts_core[f'failproxy_upstream_requests_total{{upstream="{app.address}"}}'] >= \
        sum(case[3] for case in CASES)
    lines_core = [e for e in core.log.find("request")]
    lines_relay = [e for e in relay.log.find("request")]
    keys = ("method", "path", "status", "bytes_sent", "upstream", "upstreams", "tries",
            "overflowed", "route", "spilled_bytes", "static")
    assert [{k: e.get(k) for k in keys} for e in lines_core] == \
        [{k: e.get(k) for k in keys} for e in lines_relay]
    # the rest (ids, times, pids) differ by value only: the same keys in the same order, each
    # value of the same JSON type (a time in ms a float, or null where the relay's is)
    assert [[(k, type(v)) for k, v in e.items()] for e in lines_core] == \
        [[(k, type(v)) for k, v in e.items()] for e in lines_relay]


# Every header setting away from its default, twice over: the heads the core writes are the
# relay's writers' pieces (`_heads.pxd`) around the fields it forwards.
OTHER_HEADERS = [
    {"x_forwarded_for": "append", "x_forwarded_proto": False, "x_forwarded_host": True,
     "via": False, "request_id": "X-Trace", "upstream_header": True},
    {"x_forwarded_for": "off", "x_forwarded_host": True, "request_id": ""},
]


@compiled_only
@pytest.mark.parametrize("headers", OTHER_HEADERS)
def test_the_core_writes_the_relays_heads_whatever_the_header_settings(
        proxy, backend, monkeypatch, headers: dict[str, Any]) -> None:
    """The common cases through a worker with the core and one without, with the header
    settings changed: the same requests reach the app, the same answers the client, and the
    core answered them."""
    app = backend("app", unix=True, handler=_reply)
    admin = free_port()
    core, relay = _pair(proxy, app, monkeypatch, admin, headers=headers)
    common = [case for case in CASES if case[3]]
    for name, data, methods, _ in common:
        _same_through_both(core, relay, app, name, data, methods)
    answered = sum(case[3] for case in common)
    assert _core_requests(admin, answered) == answered
    named = [any(k.lower() == "x-trace" for k, _ in fields) for _, _, fields in _seen(app, 0)]
    assert named == [bool(headers["request_id"])] * len(app.requests)


_LOGGED = ("method", "path", "status", "bytes_sent", "upstream", "upstreams", "tries",
           "overflowed", "route", "spilled_bytes", "static")


def _pair(proxy: Any, app: HTTPBackend, monkeypatch: pytest.MonkeyPatch, admin: int = 0,
          **kw: Any) -> tuple[Proxy, Proxy]:
    """A worker with the core (its admin endpoint on port `admin`, if any) and one without, in
    front of `app`."""
    monkeypatch.setenv("FAILPROXY_CORE", "1")
    core = proxy([app], admin={"listen": f"127.0.0.1:{admin}"} if admin else {}, **kw)
    monkeypatch.setenv("FAILPROXY_CORE", "0")
    return core, proxy([app], **kw)


@compiled_only
def test_the_cores_request_ids_are_the_workers_and_never_the_relays(proxy, backend,
                                                                    monkeypatch) -> None:
    """The core makes its request ids itself: the worker's prefix and a counter of its own from
    2**63, 32 hex digits as the relay's, sent upstream and logged the same; a request the
    relay answers on the same worker gets one of the relay's (from 2**60), never the same."""
    app = backend("app", unix=True, handler=lambda r: Reply(body=b"ok", close=True))
    monkeypatch.setenv("FAILPROXY_CORE", "1")
    fp = proxy([app])
    for i in range(3):
        assert fp.request("GET", f"/id/{i}").status == 200
    assert fp.request("POST", "/id/relay", body=b"x").status == 200  # a body: the relay's
    ids = [r.header("x-request-id") for r in app.requests]
    assert all(len(rid) == 32 and rid == rid.lower() and int(rid, 16) >= 0 for rid in ids), ids
    assert len({rid[:16] for rid in ids}) == 1, "one prefix a worker"
    counters = [int(rid[16:], 16) for rid in ids]
    assert counters[:3] == [(1 << 63), (1 << 63) + 1, (1 << 63) + 2], "the core's own count"
    assert (1 << 60) <= counters[3] < (1 << 63), "the relay's"
    logged = {e["path"]: e["request_id"] for e in fp.log.wait_for_events("request", 4)}
    assert [logged[f"/id/{i}"] for i in range(3)] + [logged["/id/relay"]] == ids


@compiled_only
def test_a_connect_the_core_cannot_make_leaves_nothing_in_the_books(proxy, backend,
                                                                    monkeypatch) -> None:
    """A full backlog at the local socket: the core's connect fails (EAGAIN), it gives the
    slot and the policy's entry back and hands the request over; the relay connects again and
    logs its failover to the backup, and the local socket counts no request. Once the socket
    takes connections again the core answers there: nothing of the failed attempts stayed in
    the books (each would count as a request in service there, and W is 1)."""
    primary = backend("app", unix=True, backlog=0)
    primary.fill_backlog()
    nxt = backend("peer")
    admin = free_port()
    monkeypatch.setenv("FAILPROXY_CORE", "1")
    fp = proxy([primary, {"address": nxt.address, "backup": True}],
               admin={"listen": f"127.0.0.1:{admin}"})
    for i in range(3):
        path = f"/full/{i}"
        resp = fp.request("GET", path)
        assert resp.status == 200
        assert resp.body == f"{nxt.name} GET {path}".encode()
        ev = fp.log.wait_for_event("failover", path=path)
        assert (ev["reason"], ev["errno"]) == ("overloaded", "EAGAIN")
    assert _handovers(admin, 3) == 3
    assert _core_requests(admin) == 0
    local = f'failproxy_upstream_requests_total{{upstream="{primary.address}"}}'
    assert _counts(admin).get(local, 0.0) == 0.0
    primary.drain()
    for i in range(20):  # bounded: the first that goes home is the core's
        fp.request("GET", f"/again/{i}")
        if primary.requests:
            break
    assert [r.target for r in primary.requests] == [f"/again/{i}"]
    assert _core_requests(admin, 1) == 1


@compiled_only
def test_a_client_gone_with_its_request_in_flight(proxy, backend, monkeypatch) -> None:
    """The client resets while the upstream has not answered: logged 499 as the relay logs it,
    and the slot given back (the next request is the core's again)."""
    app = backend("app", unix=True,
                  handler=lambda r: HANG if r.target == "/hang" else Reply(close=True))
    admin = free_port()
    core, relay = _pair(proxy, app, monkeypatch, admin)
    lines = []
    for fp in (core, relay):
        mark = len(app.requests)
        with fp.connect() as c:
            c.send(_get("/hang"))
            app.wait_requests(mark + 1)
            # a reset: a FIN alone is a half-close, after which the answer is still owed
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        lines.append({k: v for k, v in fp.log.wait_for_event("request", path="/hang").items()
                      if k in _LOGGED})
    assert lines[0] == lines[1]
    assert lines[0]["status"] == 499
    assert core.request("GET", "/after").status == 200
    assert _core_requests(admin, 1) == 1


class _Unread:
    """A UNIX listener whose every connection is closed, once its request arrived, with the
    request unread: a close with bytes in its receive queue, which the other end reads as a
    reset (ECONNRESET), where a close after reading is a plain end."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.address = f"unix:{path}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.closed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                select.select([conn], [], [], 10)  # the request's first bytes, left unread
            self.closed += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@compiled_only
def test_a_reset_before_the_answer_is_logged_as_the_relay_logs_it(proxy, backend, sockdir,
                                                                   monkeypatch) -> None:
    """The upstream resets the connection with the request in flight: the core reads the
    reset (ECONNRESET) and hands the request over; the relay's walk then ends it as it ends a
    reset it read itself, errno and all, not as a plain end of the connection."""
    app = _Unread(str(sockdir / "unread.sock"))
    try:
        nxt = backend("peer")
        servers = [app.address, {"address": nxt.address, "backup": True}]
        monkeypatch.setenv("FAILPROXY_CORE", "1")
        core = proxy(servers)
        monkeypatch.setenv("FAILPROXY_CORE", "0")
        relay = proxy(servers)
        events = []
        for fp in (core, relay):
            resp = fp.request("GET", "/reset")
            assert (resp.status, resp.body) == (200, f"{nxt.name} GET /reset".encode())
            ev = fp.log.wait_for_event("failover", path="/reset")
            events.append({k: ev.get(k) for k in ("from", "to", "reason", "errno", "attempt")})
        assert app.closed == 2
        assert events[0] == events[1]
        assert (events[1]["reason"], events[1]["errno"]) == ("reset", "ECONNRESET")
    finally:
        app.stop()


@compiled_only
def test_the_read_deadline_with_the_request_in_flight(proxy, backend, monkeypatch) -> None:
    """The upstream takes longer than read_timeout: the core hands the request over and the
    relay answers 504, as it would have."""
    app = backend("app", unix=True, handler=lambda r: Reply(body=b"late", delay=1.0, close=True))
    core, relay = _pair(proxy, app, monkeypatch, upstream={"read_timeout": 0.3})
    got = []
    for fp in (core, relay):
        with fp.connect() as c:
            c.send(_get("/slow"))
            r = c.read_response()
            got.append((r.status, r.headers, r.body))
        got.append({k: v for k, v in fp.log.wait_for_event("request", path="/slow").items()
                    if k in _LOGGED})
    assert got[0] == got[2] and got[1] == got[3]
    assert got[0][0] == 504


@compiled_only
def test_a_drain_with_the_request_in_flight_closes_after_its_answer(proxy, backend,
                                                                    monkeypatch) -> None:
    app = backend("app", unix=True,
                  handler=lambda r: Reply(body=b"done", delay=0.5, close=True))
    monkeypatch.setenv("FAILPROXY_CORE", "1")
    fp = proxy([app])
    with fp.connect() as c:
        c.send(_get("/inflight"))
        app.wait_requests(1)
        mark = fp.log.mark()
        fp.send_signal(signal.SIGQUIT)
        fp.log.wait_for_event("worker_stopping", since=mark)
        r = c.read_response()
        assert (r.status, r.body) == (200, b"done")
        assert "close" in r.connection_tokens
        assert c.wait_closed(3) == b""
    assert fp.wait_exit(5) == 0


@compiled_only
def test_the_relay_gives_the_connection_back_between_requests(proxy, backend,
                                                              monkeypatch) -> None:
    """A request that is not the core's is the relay's, and so is the connection until its
    answer; the next common request on it is the core's again."""
    app = backend("app", unix=True, handler=_reply)
    admin = free_port()
    monkeypatch.setenv("FAILPROXY_CORE", "1")
    fp = proxy([app], admin={"listen": f"127.0.0.1:{admin}"})
    with fp.connect() as c:
        for i, data in enumerate((_get("/one"), _get("/two", "Content-Length: 3") + b"abc",
                                  _get("/three"), _get("/chunked", "X-Forwarded-For: 192.0.2.9"),
                                  _get("/four"))):
            c.send(data)
            assert c.read_response().status == 200, i
    assert [r.target for r in app.requests] == ["/one", "/two", "/three", "/chunked", "/four"]
    assert _core_requests(admin, 3) == 3
    assert _handovers(admin, 2) == 2


@compiled_only
def test_behind_an_upstream_that_keeps_connections_the_relay_keeps_the_client(
        proxy, backend, monkeypatch) -> None:
    """The core connects anew for each request and leaves a socket with a pooled connection
    to the relay: the first request is the core's (its upstream connection then pooled), the
    second is handed over, and the relay keeps the client connection from then on instead of
    giving it back to have it handed over again with each request."""
    app = backend("app", unix=True, handler=lambda r: Reply(body=r.target.encode()))
    admin = free_port()
    monkeypatch.setenv("FAILPROXY_CORE", "1")
    fp = proxy([app], admin={"listen": f"127.0.0.1:{admin}"})
    with fp.connect() as c:
        for i in range(5):
            c.send(_get(f"/{i}"))
            r = c.read_response()
            assert (r.status, r.body) == (200, f"/{i}".encode()), i
    assert _core_requests(admin, 1) == 1
    assert _handovers(admin, 1) == 1


# ---- the relay's side of the hand-over, in-process (both builds: it is the relay's code) --------

def _in_flight(tmp_path: Path, data: bytes, answer: bytes,
               then: Callable[[ClientConnection | None, FakeTransport, Peer, socket.socket],
                              Awaitable[None]]) -> None:
    """A request the core sent to a real UNIX listener (`answer`: what the core read of its
    answer), handed to a ClientConnection with `data` as what the client had sent; `then` checks
    what follows, with the upstream's end of the socket (the connection is None when adopt
    raised)."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        path = tmp_path / "up.sock"
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(path))
        listener.listen(4)
        h = Harness(f'[[upstream.server]]\naddress = "unix:{path}"\n', tmp_path / "log", loop)
        peer = h.ctx.order[0]
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(path))
        sock.setblocking(False)
        up, _ = listener.accept()
        peer.acquire()  # what CoreBooks.begin did
        client: ClientConnection | None = ClientConnection(h.ctx, False)
        transport = FakeTransport()
        inflight = InFlight(object(), peer, sock.detach(), answer, loop.time(), 0.1, 0, 0.0,
                            True, "", loop.time() + 5)
        try:
            try:
                client.adopt(transport, data, False, 0.0, loop.time() + 5,  # type: ignore
                             False, 0, inflight, None)
            except RuntimeError as exc:
                assert "did not parse" in str(exc)
                client = None
            await then(client, transport, peer, up)
        finally:
            up.close()
            listener.close()

    asyncio.run(main())


def test_adopt_relays_the_answer_of_a_request_the_core_sent(tmp_path: Path) -> None:
    """The relay parses the request again, its exchange takes the upstream socket and the
    answer's first bytes and reads the rest there, and the slot the core took is given back."""

    async def then(client: ClientConnection | None, out: FakeTransport, peer: Peer,
                   up: socket.socket) -> None:
        assert client is not None
        up.sendall(b"ngth: 2\r\n\r\nok")
        for _ in range(500):
            if out.data().endswith(b"ok"):
                break
            await asyncio.sleep(0.01)
        assert out.data().startswith(b"HTTP/1.1 200 OK\r\n"), out.data()
        assert out.data().endswith(b"\r\n\r\nok"), out.data()
        assert peer.inflight == 0

    _in_flight(tmp_path, request("/x"), b"HTTP/1.1 200 OK\r\nContent-Le", then)


def test_adopt_lets_go_of_a_request_in_flight_it_cannot_parse(tmp_path: Path) -> None:
    """Were the two parsers ever to disagree (the core sent what the relay does not take as a
    request to start), adopt raises for the catch-all, and what the core held is let go first:
    the upstream socket closed (the upstream reads its end), the slot given back."""

    async def then(client: ClientConnection | None, out: FakeTransport, peer: Peer,
                   up: socket.socket) -> None:
        assert client is None, "adopt did not raise"
        up.settimeout(5)
        assert up.recv(100) == b""
        assert peer.inflight == 0

    _in_flight(tmp_path, b"GET /x HTTP/1.1\r\nHost: a\r\n", b"", then)
