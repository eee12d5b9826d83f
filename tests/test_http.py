"""SPEC §8 black-box: HTTP/1.x framing through failproxy, byte for byte, over real sockets."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from backends import CLOSE, HTTPBackend, Reply
from support import (
    IncompleteResponse,
    Proxy,
    build_request,
    chunked_body,
    free_port,
    proc_status,
    reset_peak_rss,
)

pytestmark = pytest.mark.timeout(40)

MB = 1 << 20


@pytest.fixture
def app(backend) -> HTTPBackend:
    return backend("app")


@pytest.fixture
def fp(proxy, app) -> Proxy:
    return proxy([app])


# ---- keep-alive and pipelining -------------------------------------------------------------------

def test_keepalive_both_sides(fp, app) -> None:
    with fp.connect() as c:
        for i in range(3):
            c.send(build_request("GET", f"/ka{i}"))
            resp = c.read_response()
            assert resp.status == 200
            assert resp.body == f"app GET /ka{i}".encode()
            assert "close" not in resp.connection_tokens
        assert c.is_open(), "the client connection stays open between requests"
    assert len(app.requests) == 3
    assert len({r.conn_id for r in app.requests}) == 1, "the upstream connection is reused"


def test_client_connection_close_honoured(fp, app) -> None:
    with fp.connect(timeout=3) as c:
        c.send(build_request("GET", "/bye", headers=[("Connection", "close")]))
        resp = c.read_response()
        assert resp.body == b"app GET /bye"
        assert "close" in resp.connection_tokens
        c.wait_closed()


def test_client_keepalive_requests_limit(proxy, app) -> None:
    fp = proxy([app], server={"keepalive_requests": 2})
    with fp.connect(timeout=3) as c:
        c.send(build_request("GET", "/k1"))
        assert "close" not in c.read_response().connection_tokens
        c.send(build_request("GET", "/k2"))
        resp = c.read_response()
        assert resp.body == b"app GET /k2"
        assert "close" in resp.connection_tokens
        c.wait_closed()


def test_client_keepalive_timeout(proxy, app) -> None:
    fp = proxy([app], server={"keepalive_timeout": 0.5})
    with fp.connect(timeout=3) as c:
        c.send(build_request("GET", "/idle"))
        assert c.read_response().status == 200
        t0 = time.monotonic()
        c.wait_closed(3)
        assert 0.3 < time.monotonic() - t0 < 2.5


def test_max_connections_makes_accept_wait(proxy, app) -> None:
    """Past max_connections a worker stops accepting: the next connection waits in the kernel's
    queue (it is not refused) and is served as soon as a connection closes."""
    fp = proxy([app], server={"max_connections": 2})
    first, second = fp.connect(timeout=3), fp.connect(timeout=3)
    try:
        for c in (first, second):
            c.send(build_request("GET", "/held"))
            assert c.read_response().status == 200
        with fp.connect(timeout=3) as third:  # the TCP handshake completes in the backlog
            third.send(build_request("GET", "/third"))
            with pytest.raises(IncompleteResponse):
                third.read_response(timeout=0.5)
            first.close()
            resp = third.read_response(timeout=3)
            assert resp.body == b"app GET /third"
    finally:
        first.close()
        second.close()


def test_client_gone_mid_body_then_next_request(proxy, backend) -> None:
    app = backend("app")
    fp = proxy([app])
    with fp.connect(timeout=3) as c:
        c.send(b"POST /partial HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n" + b"p" * 5000)
        time.sleep(0.2)
    time.sleep(0.3)
    assert not [r for r in app.seen(path="/partial") if r.complete], \
        "the upstream never sees a complete request the client did not send"
    assert fp.alive()
    assert fp.request("GET", "/next").body == b"app GET /next"


def test_body_timeout_stalled_upload(proxy, backend) -> None:
    app = backend("app")
    fp = proxy([app], server={"body_timeout": 0.5})
    with fp.connect(timeout=5) as c:
        c.send(b"POST /stall HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n" + b"s" * 10)
        t0 = time.monotonic()
        c.wait_closed(4)
        assert 0.4 < time.monotonic() - t0 < 3.0
    time.sleep(0.2)
    assert not [r for r in app.seen(path="/stall") if r.complete]


def test_pipelined_requests_answered_in_order(proxy, backend) -> None:
    app = backend("app", handler=lambda r: Reply(
        200, body=f"{r.method} {r.target} {r.body.decode()}".encode(),
        delay=0.3 if r.target == "/p1" else 0.0))
    fp = proxy([app])
    with fp.connect() as c:
        c.send(build_request("GET", "/p1") + build_request("POST", "/p2", body=b"two")
               + build_request("GET", "/p3") + build_request("HEAD", "/p4")
               + build_request("GET", "/p5"))
        bodies = [c.read_response().body for _ in range(3)]
        head = c.read_response("HEAD")
        last = c.read_response()
    assert bodies == [b"GET /p1 ", b"POST /p2 two", b"GET /p3 "]
    assert head.status == 200 and head.body == b""
    assert last.body == b"GET /p5 "


# ---- chunked both ways ---------------------------------------------------------------------------

def test_chunked_request_body(fp, app) -> None:
    parts = [b"alpha-", b"b" * 70000, b"-gamma"]
    with fp.connect() as c:
        c.send(b"POST /up HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        for p in parts:
            c.send(b"%x\r\n%s\r\n" % (len(p), p))
            time.sleep(0.05)
        c.send(b"0\r\n\r\n")
        resp = c.read_response()
    assert resp.status == 200
    (req,) = app.seen("POST", "/up")
    assert req.complete
    assert req.body == b"".join(parts)
    assert not (req.has_header("content-length") and req.chunked), "one framing only"


def test_chunked_response_body(proxy, backend) -> None:
    parts = [b"one,", b"two," * 5000, b"three"]
    app = backend("app", handler=lambda r: Reply(200, body=parts, chunked=True, part_delay=0.05))
    fp = proxy([app])
    with fp.connect() as c:
        c.send(build_request("GET", "/chunks"))
        resp = c.read_response()
        assert resp.chunked
        assert resp.body == b"".join(parts)
        c.send(build_request("GET", "/again"))
        assert c.read_response().body == b"".join(parts)


def test_chunked_response_to_http10_client_is_not_chunked(proxy, backend) -> None:
    parts = [b"one,", b"two,", b"three"]
    app = backend("app", handler=lambda r: Reply(200, body=parts, chunked=True))
    fp = proxy([app])
    with fp.connect() as c:
        c.send(b"GET /old HTTP/1.0\r\nHost: t\r\n\r\n")
        resp = c.read_response()
        assert not resp.has_header("transfer-encoding"), "HTTP/1.0 knows no chunked encoding"
        assert resp.body == b"one,two,three"
        c.wait_closed()


# ---- big bodies, bounded memory ------------------------------------------------------------------

def _rss_guard(fp: Proxy) -> tuple[int, int]:
    pids = fp.serving_pids()
    assert len(pids) == 1, f"run with workers = 1: {pids}"
    pid = pids[0]
    base = proc_status(pid)["VmRSS"]
    assert reset_peak_rss(pid), "cannot reset VmHWM"
    return pid, base


def test_20mb_request_body_streamed(proxy, backend) -> None:
    size = 20 * MB
    data = os.urandom(size)
    app = backend("app", read_rate=20 * MB, handler=lambda r: Reply(
        200, body=f"{r.body_len} {r.body_sha256}".encode()))
    fp = proxy([app], server={"max_body_bytes": 0})
    assert fp.request("POST", "/warm", body=b"x" * 100000).status == 200
    pid, base = _rss_guard(fp)
    with fp.connect(timeout=30) as c:
        c.send(build_request("POST", "/big", body=None,
                             headers=[("Content-Length", str(size))]))
        c.sock.sendall(data)
        resp = c.read_response(timeout=30)
    assert resp.status == 200
    assert resp.body == f"{size} {hashlib.sha256(data).hexdigest()}".encode()
    (req,) = app.seen("POST", "/big")
    assert req.body_len == size
    peak = proc_status(pid)["VmHWM"]
    growth = (peak - base) * 1024
    print(f"upload: proxy RSS {base} kB, peak {peak} kB")
    assert growth < 8 * MB, f"proxy RSS grew by {growth / MB:.1f} MB for a 20 MB upload"


def test_20mb_response_body_to_slow_reader(proxy, backend) -> None:
    size = 20 * MB
    data = os.urandom(size)
    app = backend("app", handler=lambda r: Reply(200, body=data if r.target == "/big" else b"warm"))
    fp = proxy([app])
    assert fp.request("GET", "/warm").status == 200
    pid, base = _rss_guard(fp)
    t0 = time.monotonic()

    def pause(got: int) -> None:  # about 16 MB/s: far slower than the upstream
        behind = got / (16 * MB) - (time.monotonic() - t0)
        if behind > 0:
            time.sleep(behind)

    with fp.connect(timeout=30, rcvbuf=65536) as c:
        c.send(build_request("GET", "/big"))
        resp = c.read_response(timeout=30, slow_read=pause)
    assert resp.status == 200
    assert resp.body == hashlib.sha256(data).hexdigest().encode(), "byte-exact"
    peak = proc_status(pid)["VmHWM"]
    growth = (peak - base) * 1024
    print(f"download: proxy RSS {base} kB, peak {peak} kB, {time.monotonic() - t0:.2f} s")
    assert growth < 8 * MB, f"RSS grew by {growth / MB:.1f} MB relaying 20 MB to a slow reader"


def test_pooled_connection_after_backpressured_response(proxy, backend) -> None:
    """A response relayed to a slow reader makes the proxy pause reading its upstream; the upstream
    connection goes back to the pool afterwards and must serve the next request (not stay
    paused)."""
    data = os.urandom(4 * MB)
    app = backend("app", handler=lambda r: Reply(
        200, body=data if r.target == "/big" else b"small"))
    fp = proxy([app])
    for round_ in range(5):
        t0 = time.monotonic()

        def pause(got: int, t0: float = t0) -> None:
            behind = got / (16 * MB) - (time.monotonic() - t0)
            if behind > 0:
                time.sleep(behind)

        with fp.connect(timeout=10, rcvbuf=65536) as c:
            c.send(build_request("GET", "/big"))
            resp = c.read_response(timeout=10, slow_read=pause)
            assert resp.body == hashlib.sha256(data).hexdigest().encode()
        resp = fp.request("GET", f"/small{round_}", timeout=3)
        assert resp.body == b"small", round_


def test_20mb_chunked_request_body(proxy, backend) -> None:
    size = 20 * MB
    data = os.urandom(size)
    app = backend("app", handler=lambda r: Reply(
        200, body=f"{r.body_len} {r.body_sha256}".encode()))
    fp = proxy([app], server={"max_body_bytes": 0})
    with fp.connect(timeout=30) as c:
        c.send(b"PUT /bigchunks HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        step = 256 * 1024 + 7
        for i in range(0, size, step):
            part = data[i:i + step]
            c.sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))
        c.send(b"0\r\n\r\n")
        resp = c.read_response(timeout=30)
    assert resp.body == f"{size} {hashlib.sha256(data).hexdigest()}".encode()


# ---- HEAD, 1xx, 204, 304 -------------------------------------------------------------------------

def test_head_on_kept_alive_upstream_connection(proxy, backend) -> None:
    app = backend("app", handler=lambda r: Reply(200, body=b"z" * 1000 if r.target == "/h"
                                                 else b"after head"))
    fp = proxy([app])
    with fp.connect(timeout=3) as c:
        c.send(build_request("HEAD", "/h"))
        head = c.read_response("HEAD")
        assert head.status == 200
        assert head.header("content-length") == "1000"
        c.send(build_request("GET", "/g"))
        resp = c.read_response()
        assert resp.body == b"after head"
    assert [r.method for r in app.requests] == ["HEAD", "GET"]
    assert app.requests[0].conn_id == app.requests[1].conn_id, \
        "the next request uses the same upstream connection"


@pytest.mark.parametrize("framing", ["chunked", "none"])
def test_head_answered_without_content_length(proxy, backend, framing) -> None:
    """An upstream may answer HEAD with the Transfer-Encoding a GET would get, or with no framing
    header at all, and keep the connection open: there is no body either way."""
    te = "Transfer-Encoding: chunked\r\n" if framing == "chunked" else ""

    def handler(r: Any) -> Reply:
        if r.method == "HEAD":
            return Reply(raw=f"HTTP/1.1 200 OK\r\nX-Head: 1\r\n{te}\r\n".encode())
        return Reply(200, body=b"after head")

    app = backend("app", handler=handler)
    fp = proxy([app])
    with fp.connect(timeout=3) as c:
        c.send(build_request("HEAD", "/hc"))
        head = c.read_response("HEAD")
        assert head.status == 200 and head.header("x-head") == "1"
        c.send(build_request("GET", "/g"))
        assert c.read_response().body == b"after head"


def test_1xx_204_304_without_bodies(proxy, backend) -> None:
    def handler(r: Any) -> Reply:
        if r.target == "/204":
            return Reply(204, no_length=True)
        if r.target == "/304":
            return Reply(304, headers=[("ETag", '"v1"'), ("Content-Length", "50")], no_length=True)
        if r.target == "/103":
            return Reply(200, body=b"final", interim=[b"HTTP/1.1 103 Early Hints\r\n"
                                                     b"Link: </style.css>; rel=preload\r\n\r\n"])
        return Reply(200, body=b"plain")

    fp = proxy([backend("app", handler=handler)])
    with fp.connect(timeout=3) as c:
        c.send(build_request("GET", "/204"))
        r = c.read_response()
        assert r.status == 204 and r.body == b""
        assert not r.has_header("transfer-encoding")
        c.send(build_request("GET", "/304", headers=[("If-None-Match", '"v1"')]))
        r = c.read_response()
        assert r.status == 304 and r.body == b""
        c.send(build_request("GET", "/103"))
        r = c.read_response()
        assert r.status == 200 and r.body == b"final"
        assert all(i.status == 103 for i in r.interim)
        c.send(build_request("GET", "/plain"))
        r = c.read_response()
        assert r.body == b"plain", "framing intact after bodiless responses"


def test_expect_100_continue(fp, app) -> None:
    with fp.connect(timeout=3) as c:
        c.send(b"PUT /e HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        interim = c.read_head(timeout=3)
        assert interim.status == 100, "client gets 100 Continue before sending the body"
        c.send(b"hello")
        resp = c.read_response()
        assert resp.status == 200
    (req,) = app.seen("PUT", "/e")
    assert req.body == b"hello"


# ---- WebSocket -----------------------------------------------------------------------------------

def test_websocket_echo_through_101_tunnel(proxy, ws_backend) -> None:
    from websockets.sync.client import connect

    fp = proxy([ws_backend.address])
    with connect(f"ws://127.0.0.1:{fp.port}/chat", open_timeout=5, close_timeout=2) as ws:
        ws.send("hello")
        assert ws.recv(timeout=3) == "hello"
        blob = os.urandom(100000)
        ws.send(blob)
        assert ws.recv(timeout=3) == blob
    assert ws_backend.handshakes[0][0] == "/chat"
    names = {k.lower() for k, _ in ws_backend.handshakes[0][1]}
    assert "upgrade" in names, "Upgrade is forwarded when tunnelling"
    ev = fp.log.wait_for_event("request", path="/chat")
    assert ev["status"] == 101


# ---- HTTP/1.0 ------------------------------------------------------------------------------------

def test_http10_without_keepalive(fp, app) -> None:
    with fp.connect(timeout=3) as c:
        c.send(b"GET /ten HTTP/1.0\r\n\r\n")  # no Host: fine on 1.0
        resp = c.read_response()
        assert resp.status == 200
        assert resp.body == b"app GET /ten"
        c.wait_closed()


def test_http10_with_only_proxy_connection_keep_alive_is_http10(fp, app) -> None:
    """llhttp counts Proxy-Connection as Connection, failproxy does not: still HTTP/1.0 (no Host
    needed), answered and closed (downstream.http_version must not take it for 1.1)."""
    with fp.connect(timeout=3) as c:
        c.send(b"GET /pc HTTP/1.0\r\nProxy-Connection: keep-alive\r\n\r\n")
        resp = c.read_response()
        assert resp.status == 200
        assert resp.body == b"app GET /pc"
        c.wait_closed()


def test_http10_keepalive(fp, app) -> None:
    with fp.connect(timeout=3) as c:
        for path in ("/ka1", "/ka2"):
            c.send(f"GET {path} HTTP/1.0\r\nHost: t\r\nConnection: keep-alive\r\n\r\n".encode())
            resp = c.read_response()
            assert resp.body == f"app GET {path}".encode()
            assert resp.has_header("content-length")
            assert "keep-alive" in resp.connection_tokens
            assert not resp.close_delimited


# ---- headers -------------------------------------------------------------------------------------

def test_hop_by_hop_request_headers_stripped(fp, app) -> None:
    resp = fp.request("GET", "/hop", headers=[
        ("Connection", "keep-alive, X-Hop"), ("X-Hop", "secret"), ("Keep-Alive", "timeout=5"),
        ("Proxy-Connection", "keep-alive"), ("TE", "trailers"), ("Trailer", "X-Checksum"),
        ("Proxy-Authorization", "Basic Zm9vOmJhcg=="), ("Upgrade", "h2c"), ("X-End", "kept")])
    assert resp.status == 200
    (req,) = app.seen("GET", "/hop")
    for name in ("x-hop", "keep-alive", "proxy-connection", "te", "trailer",
                 "proxy-authorization", "upgrade"):
        assert not req.has_header(name), f"{name} reached the upstream: {req.headers}"
    conn = (req.header("connection") or "").lower()
    assert "x-hop" not in conn and "upgrade" not in conn
    assert req.header("x-end") == "kept"


def test_hop_by_hop_response_headers_stripped(proxy, backend) -> None:
    app = backend("app", handler=lambda r: Reply(200, body=b"ok", headers=[
        ("Connection", "X-Resp-Hop"), ("X-Resp-Hop", "1"), ("Keep-Alive", "timeout=99"),
        ("Proxy-Authenticate", "Basic realm=x"), ("X-End", "yes")]))
    fp = proxy([app])
    resp = fp.request("GET", "/rhop")
    assert resp.body == b"ok"
    assert not resp.has_header("x-resp-hop")
    assert not resp.has_header("proxy-authenticate")
    assert resp.header("keep-alive") != "timeout=99"
    assert "x-resp-hop" not in resp.connection_tokens
    assert resp.header("x-end") == "yes"


def test_forwarding_headers(fp, app) -> None:
    resp = fp.request("GET", "/fwd", headers=[
        ("Host", "Example.COM:8080"), ("X-Forwarded-For", "6.6.6.6"),
        ("X-Forwarded-Proto", "https"), ("X-Request-Id", "client-rid-42")])
    assert resp.status == 200
    (req,) = app.seen("GET", "/fwd")
    assert req.header_all("x-forwarded-for") == ["127.0.0.1"], "client-sent XFF is replaced"
    assert req.header_all("x-forwarded-proto") == ["http"]
    assert "1.1 failproxy" in (req.header("via") or "")
    assert req.header_all("host") == ["Example.COM:8080"], "Host forwarded as sent"
    assert req.header_all("x-request-id") == ["client-rid-42"]
    ev = fp.log.wait_for_event("request", path="/fwd")
    assert ev["request_id"] == "client-rid-42"


def test_x_forwarded_host_set_from_host(proxy, app) -> None:
    fp = proxy([app], headers={"x_forwarded_host": True})
    fp.request("GET", "/xfh", headers=[("Host", "shop.example:8443"),
                                       ("X-Forwarded-Host", "evil.example")])
    (req,) = app.seen("GET", "/xfh")
    assert req.header_all("x-forwarded-host") == ["shop.example:8443"]


def test_request_id_generated(fp, app) -> None:
    fp.request("GET", "/rid1")
    fp.request("GET", "/rid2")
    ids = [r.header("x-request-id") for r in app.requests]
    assert all(ids) and ids[0] != ids[1]
    for path, rid in zip(("/rid1", "/rid2"), ids, strict=True):
        assert fp.log.wait_for_event("request", path=path)["request_id"] == rid


def test_underscore_header_names_dropped(fp, app) -> None:
    fp.request("GET", "/us", headers=[("X_Evil", "1"), ("X-Good", "2"), ("Under_Score", "3")])
    (req,) = app.seen("GET", "/us")
    assert not [k for k, _ in req.headers if "_" in k], req.headers
    assert req.header("x-good") == "2"
    assert not req.has_header("x-evil"), "X_Evil must not turn into X-Evil"


# ---- bad input (SPEC §8) -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def strict(tmp_path_factory) -> Any:
    """One proxy for the bad-input table, with small limits."""
    d: Path = tmp_path_factory.mktemp("strict")
    app = HTTPBackend("app")
    fp = Proxy(d, [app], server={"max_uri_bytes": 1024, "max_header_bytes": 4096,
                                 "max_body_bytes": 1000, "header_timeout": 1.0})
    fp.start()
    yield fp, app
    fp.stop()
    app.stop()


H = "Host: t\r\n"
BAD = {
    "cl_and_te": (f"POST /b HTTP/1.1\r\n{H}Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
                  "0\r\n\r\n", 400),
    "two_content_lengths": (f"POST /b HTTP/1.1\r\n{H}Content-Length: 5\r\nContent-Length: 6\r\n\r\n"
                            "hello!", 400),
    "invalid_content_length": (f"POST /b HTTP/1.1\r\n{H}Content-Length: 5x\r\n\r\nhello", 400),
    "te_on_http10": (f"POST /b HTTP/1.0\r\n{H}Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "te_last_not_chunked": (
        f"POST /b HTTP/1.1\r\n{H}Transfer-Encoding: chunked, gzip\r\n\r\n", 400),
    "te_unknown_coding": (f"POST /b HTTP/1.1\r\n{H}Transfer-Encoding: foo, chunked\r\n\r\n"
                          "0\r\n\r\n", 501),
    "obs_fold": (f"GET /b HTTP/1.1\r\n{H}X-A: 1\r\n  folded\r\n\r\n", 400),
    "space_before_colon": (f"GET /b HTTP/1.1\r\n{H}X-A : 1\r\n\r\n", 400),
    "nul_in_header": (f"GET /b HTTP/1.1\r\n{H}X-A: a\x00b\r\n\r\n", 400),
    "bare_cr_in_header": (f"GET /b HTTP/1.1\r\n{H}X-A: a\rb\r\n\r\n", 400),
    "missing_host_http11": ("GET /b HTTP/1.1\r\nX-A: 1\r\n\r\n", 400),
    "repeated_host": (f"GET /b HTTP/1.1\r\n{H}Host: u\r\n\r\n", 400),
    "http_2_0": (f"GET /b HTTP/2.0\r\n{H}\r\n", 505),
    "http_1_2": (f"GET /b HTTP/1.2\r\n{H}\r\n", 505),
    "uri_too_long": (f"GET /{'u' * 2000} HTTP/1.1\r\n{H}\r\n", 414),
    "head_too_large": (f"GET /b HTTP/1.1\r\n{H}X-Big: {'h' * 6000}\r\n\r\n", 431),
    "body_too_large": (f"POST /b HTTP/1.1\r\n{H}Content-Length: 5000\r\n\r\n" + "x" * 5000, 413),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input(strict, case) -> None:
    fp, app = strict
    raw, status = BAD[case]
    before = len(app.requests)
    mark = fp.log.mark()
    with fp.connect(timeout=5) as c:
        c.send(raw.encode("latin-1"))
        resp = c.read_response()
        assert resp.status == status, (case, resp.status, resp.body)
        c.wait_closed(3)
    time.sleep(0.1)
    assert len(app.requests) == before, f"{case}: bytes reached the upstream"
    ev = fp.log.wait_for_event("client_error", since=mark, status=status)
    assert "detail" in ev and "client" in ev


def test_chunked_body_crossing_limit_413(strict) -> None:
    fp, app = strict
    with fp.connect(timeout=5) as c:
        c.send(f"POST /chunky HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\n\r\n".encode())
        c.send(chunked_body([b"a" * 600, b"b" * 600, b"c" * 600])[:-5])
        try:
            c.send(b"0\r\n\r\n")
        except OSError:
            pass
        resp = c.read_response()
        assert resp.status == 413
        c.wait_closed(3)
    time.sleep(0.3)
    assert not [r for r in app.seen(path="/chunky") if r.complete], \
        "the upstream never receives a complete request"


def test_header_timeout_408(strict) -> None:
    fp, app = strict
    before = len(app.requests)
    with fp.connect(timeout=5) as c:
        c.send(b"GET /slowloris HTTP/1.1\r\nHost: t\r\n")
        t0 = time.monotonic()
        resp = c.read_response(timeout=4)
        took = time.monotonic() - t0
        assert resp.status == 408
        assert 0.8 <= took < 3.0, took
        c.wait_closed(3)
    assert len(app.requests) == before


# ---- upstream connection reuse -------------------------------------------------------------------

@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
], ids=["connection_close", "http10"])
def test_upstream_connection_not_reused_when_it_said_close(proxy, backend, raw) -> None:
    """The upstream said the connection ends (and then left it open): never send on it again."""
    app = backend("app", handler=lambda r: Reply(raw=raw))
    fp = proxy([app])
    for i in range(3):
        assert fp.request("GET", f"/c{i}").body == b"ok"
    assert [r.conn_seq for r in app.requests] == [0, 0, 0]


def test_upstream_extra_bytes_after_response_not_relayed(proxy, backend) -> None:
    """Bytes past the end of a response are not the next response (no desynchronisation)."""
    def handler(r: Any) -> Reply:
        if r.target == "/first":
            return Reply(raw=b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                             b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil")
        return Reply(200, body=b"honest")

    app = backend("app", handler=handler)
    fp = proxy([app])
    assert fp.request("GET", "/first").body == b"ok"
    time.sleep(0.1)
    assert fp.request("GET", "/second").body == b"honest"


# ---- upstream responses --------------------------------------------------------------------------

def test_close_delimited_upstream_response(proxy, backend) -> None:
    app = backend("app", handler=lambda r: Reply(
        200, body=[b"part1-", b"part2-" * 10000, b"end"], close_delimited=True, part_delay=0.05))
    fp = proxy([app])
    with fp.connect(timeout=5) as c:
        c.send(build_request("GET", "/cd"))
        resp = c.read_response()
        assert resp.body == b"part1-" + b"part2-" * 10000 + b"end"
        assert resp.chunked, "relayed chunked to an HTTP/1.1 client"
        c.send(build_request("GET", "/cd2"))
        assert c.read_response().body.endswith(b"end")


@pytest.mark.parametrize("kind", ["content_length", "chunked"])
def test_response_cut_short_closes_client(proxy, backend, kind) -> None:
    if kind == "chunked":
        reply = Reply(200, body=[b"a" * 100, b"b" * 100], chunked=True, then=CLOSE)
    else:
        reply = Reply(200, body=b"x" * 500, content_length=1000, then=CLOSE)
    fp = proxy([backend("app", handler=lambda r: reply)])
    with fp.connect(timeout=5) as c:
        c.send(build_request("GET", "/cut"))
        with pytest.raises(IncompleteResponse):
            c.read_response()
        assert c.eof, "the client connection is closed, the response not presented as complete"


@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 2OO OK\r\nContent-Length: 2\r\n\r\nok",
    b"garbage\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"2\r\nok\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok!",
], ids=["bad_status", "garbage", "cl_and_te", "two_cl"])
def test_invalid_upstream_response_502(proxy, backend, raw) -> None:
    fp = proxy([backend("app", handler=lambda r: Reply(raw=raw, close=True))])
    resp = fp.request("GET", "/badup")
    assert resp.status == 502


# ---- signals -------------------------------------------------------------------------------------

def test_sigterm_stops(fp) -> None:
    assert fp.request("GET", "/x").status == 200
    fp.send_signal(signal.SIGTERM)
    assert fp.wait_exit(5) == 0
    assert fp.log.find("stopped") or fp.log.find("stopping")


def test_sigquit_finishes_inflight(proxy, backend) -> None:
    app = backend("app", handler=lambda r: Reply(200, body=b"finished", delay=1.0))
    fp = proxy([app])
    out: dict[str, Any] = {}

    def slow() -> None:
        try:
            out["resp"] = fp.request("GET", "/inflight")
        except Exception as e:
            out["err"] = e

    t = threading.Thread(target=slow)
    t.start()
    app.wait_requests(1)
    fp.send_signal(signal.SIGQUIT)
    t.join(5)
    assert "resp" in out, out
    assert out["resp"].status == 200 and out["resp"].body == b"finished"
    assert fp.wait_exit(5) == 0


# ---- TLS listener ------------------------------------------------------------------------------

def test_tls_listener_serves_https_and_says_so_upstream(proxy, app, tmp_path) -> None:
    """A `tls_listen` address is served with TLS; the upstream hears X-Forwarded-Proto: https,
    the plain listener next to it still says http."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-subj", "/CN=localhost", "-days", "1", "-keyout", str(key), "-out",
         str(cert)],
        check=True, capture_output=True, timeout=30)
    tls_port = free_port()
    fp = proxy([app], server={"tls_listen": [f"127.0.0.1:{tls_port}"], "tls_cert": str(cert),
                              "tls_key": str(key)})
    ctx = ssl.create_default_context(cafile=str(cert))
    ctx.check_hostname = False
    with socket.create_connection(("127.0.0.1", tls_port), timeout=5) as raw, \
            ctx.wrap_socket(raw) as tls:
        tls.sendall(build_request("GET", "/secure"))
        data = b""
        while not data.endswith(b"app GET /secure"):
            chunk = tls.recv(65536)
            assert chunk, data
            data += chunk
    assert data.startswith(b"HTTP/1.1 200 ")
    (seen,) = app.seen("GET", "/secure")
    assert seen.header_all("x-forwarded-proto") == ["https"]
    assert fp.request("GET", "/plain").status == 200
    (plain,) = app.seen("GET", "/plain")
    assert plain.header_all("x-forwarded-proto") == ["http"]
