"""SPEC §4 and §5 black-box: every failover reason against real sockets, the walk's limits, the
idempotency rules, passive marking, and the log events that record each decision."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import pytest
from backends import (
    CLOSE,
    HANG,
    RESET,
    HTTPBackend,
    Reply,
    closed_tcp_port,
    probe_connect,
    stale_unix_socket,
)
from support import Proxy

pytestmark = pytest.mark.timeout(40)


def _is_num(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and x >= 0


def assert_failover_event(ev: dict[str, Any], *, method: str, path: str, frm: str, to: str,
                          reason: str, attempt: int, errno: str | None = None,
                          request_id: str | None = None) -> None:
    assert ev["level"] == "warning", ev
    assert ev["method"] == method, ev
    assert ev["path"] == path, ev
    assert ev["from"] == frm, ev
    assert ev["to"] == to, ev
    assert ev["reason"] == reason, ev
    assert ev["attempt"] == attempt, ev
    assert _is_num(ev["elapsed_ms"]), ev
    assert isinstance(ev["request_id"], str) and ev["request_id"], ev
    if request_id is not None:
        assert ev["request_id"] == request_id, ev
    if errno is not None:
        assert ev.get("errno") == errno, ev
    for key in ("timestamp", "pid"):
        assert key in ev, ev


def _lands_on_next(proxy: Proxy, nxt: HTTPBackend, primary: str, reason: str,
                   errno: str | None, method: str = "GET", body: bytes = b"") -> dict[str, Any]:
    """One request: served by `nxt`, with one `failover` event from `primary` to it."""
    path = f"/r/{reason}?q=1"
    resp = proxy.request(method, path, body=body)
    assert resp.status == 200, (resp.status, resp.body)
    assert resp.body == f"{nxt.name} {method} {path}".encode()
    seen = nxt.seen(method, path)
    assert len(seen) == 1
    assert seen[0].body == body
    rid = seen[0].header("x-request-id")
    assert rid, "the request id is forwarded upstream"
    ev = proxy.log.wait_for_event("failover", path=path)
    assert_failover_event(ev, method=method, path=path, frm=primary, to=nxt.address,
                          reason=reason, attempt=1, errno=errno, request_id=rid)
    assert len(proxy.log.find("failover", path=path)) == 1
    req = proxy.log.wait_for_event("request", path=path)
    assert req["status"] == 200
    assert req["upstream"] == nxt.address
    assert req["upstreams"] == [primary, nxt.address]
    assert req["tries"] == 2
    assert req["overflowed"] is True
    assert req["request_id"] == rid
    # the failover was logged when decided, before the request finished
    assert proxy.log.events.index(ev) < proxy.log.events.index(req)
    return ev


# ---- one test per reason ------------------------------------------------------------------------

def test_overloaded_full_unix_backlog(proxy, backend) -> None:
    primary = backend("app", unix=True, backlog=0)
    primary.fill_backlog()
    assert probe_connect(primary.address) == "EAGAIN"
    nxt = backend("peer")
    p = proxy([primary, {"address": nxt.address, "backup": True}])
    ev = _lands_on_next(p, nxt, primary.address, "overloaded", "EAGAIN")
    assert ev["elapsed_ms"] < 250, "EAGAIN must move on at once, not after a timeout"
    assert primary.requests == []
    assert probe_connect(primary.address) == "EAGAIN"


def test_overloaded_post_body_reaches_next(proxy, backend) -> None:
    """Nothing was sent on a failed connect, so even a POST moves on, body intact."""
    primary = backend("app", unix=True, backlog=0)
    primary.fill_backlog()
    nxt = backend("peer")
    p = proxy([primary, {"address": nxt.address, "backup": True}])
    _lands_on_next(p, nxt, primary.address, "overloaded", "EAGAIN", method="POST",
                   body=b"x" * 5000)


def test_refused_stale_unix_socket(proxy, backend, sockdir) -> None:
    stale = stale_unix_socket(str(sockdir / "stale.sock"))
    assert probe_connect(stale) == "ECONNREFUSED"
    nxt = backend("peer")
    p = proxy([stale, {"address": nxt.address, "backup": True}])
    ev = _lands_on_next(p, nxt, stale, "refused", "ECONNREFUSED")
    assert ev["elapsed_ms"] < 250


def test_refused_closed_tcp_port(proxy, backend) -> None:
    closed = closed_tcp_port()
    nxt = backend("peer")
    p = proxy([closed, {"address": nxt.address, "backup": True}])
    _lands_on_next(p, nxt, closed, "refused", "ECONNREFUSED")


def test_missing_unix_socket(proxy, backend, sockdir) -> None:
    missing = f"unix:{sockdir / 'not-there.sock'}"
    assert probe_connect(missing) == "ENOENT"
    nxt = backend("peer")
    p = proxy([missing, {"address": nxt.address, "backup": True}])
    ev = _lands_on_next(p, nxt, missing, "missing", "ENOENT")
    assert ev["elapsed_ms"] < 250


def test_connect_timeout_blackholed_tcp_peer(proxy, backend, blackhole) -> None:
    hole = blackhole()
    nxt = backend("peer")
    p = proxy([hole.address, {"address": nxt.address, "backup": True}],
              upstream={"connect_timeout": 0.3})
    ev = _lands_on_next(p, nxt, hole.address, "connect_timeout", None)
    assert 250 <= ev["elapsed_ms"] < 2000, ev


@pytest.mark.parametrize("how", [RESET, CLOSE])
def test_reset_before_response(proxy, backend, how) -> None:
    primary = backend("app", unix=True, handler=lambda r: how)
    nxt = backend("peer")
    p = proxy([primary, {"address": nxt.address, "backup": True}])
    _lands_on_next(p, nxt, primary.address, "reset", None)
    assert [r.target for r in primary.requests] == ["/r/reset?q=1"]


def test_timeout_no_response_head(proxy, backend) -> None:
    primary = backend("app", unix=True, handler=lambda r: HANG)
    nxt = backend("peer")
    p = proxy([primary, {"address": nxt.address, "backup": True}],
              upstream={"read_timeout": 0.5, "retry_on": ["connect", "reset", "timeout"]})
    ev = _lands_on_next(p, nxt, primary.address, "timeout", None)
    assert 450 <= ev["elapsed_ms"] < 3000, ev
    assert len(primary.requests) == 1


def test_timeout_not_in_default_retry_on_is_504(proxy, backend) -> None:
    primary = backend("app", unix=True, handler=lambda r: HANG)
    nxt = backend("peer")
    p = proxy([primary, {"address": nxt.address, "backup": True}], upstream={"read_timeout": 0.4})
    resp = p.request("GET", "/stuck")
    assert resp.status == 504
    assert nxt.requests == []
    assert p.log.find("failover", path="/stuck") == []


def test_http_503_moves_on_when_in_retry_on(proxy, backend) -> None:
    primary = backend("app", unix=True,
                      handler=lambda r: Reply(503, headers=[("X-From", "app")], body=b"app busy"))
    nxt = backend("peer")
    p = proxy([primary, {"address": nxt.address, "backup": True}],
              upstream={"retry_on": ["connect", "reset", "http_503"]})
    _lands_on_next(p, nxt, primary.address, "http_503", None)
    assert len(primary.requests) == 1


def test_http_503_relayed_when_not_in_retry_on(proxy, backend) -> None:
    primary = backend("app", unix=True, handler=lambda r: Reply(
        503, headers=[("X-From", "app"), ("Retry-After", "7")], body=b"app busy, come back"))
    nxt = backend("peer")
    p = proxy([primary, {"address": nxt.address, "backup": True}])  # default retry_on
    resp = p.request("GET", "/busy")
    assert resp.status == 503
    assert resp.body == b"app busy, come back"
    assert resp.header("x-from") == "app"
    assert resp.header("retry-after") == "7"
    assert nxt.requests == []
    req = p.log.wait_for_event("request", path="/busy")
    assert req["status"] == 503
    assert req["upstream"] == primary.address
    assert p.log.find("failover") == []


def test_http_503_from_last_server_relayed_as_sent(proxy, backend) -> None:
    a = backend("a", unix=True, handler=lambda r: Reply(503, body=b"a is busy"))
    b = backend("b", handler=lambda r: Reply(503, headers=[("X-From", "b")], body=b"b is busy"))
    p = proxy([a, {"address": b.address, "backup": True}],
              upstream={"retry_on": ["connect", "http_503"]})
    resp = p.request("GET", "/both")
    assert resp.status == 503
    assert resp.body == b"b is busy", "the last server's own response, not a generated one"
    assert resp.header("x-from") == "b"
    ev = p.log.wait_for_event("failover", path="/both")
    assert ev["reason"] == "http_503" and ev["to"] == b.address


def test_http_503_post_not_replayed(proxy, backend) -> None:
    a = backend("a", unix=True, handler=lambda r: Reply(503, body=b"a is busy"))
    b = backend("b")
    p = proxy([a, {"address": b.address, "backup": True}],
              upstream={"retry_on": ["connect", "http_503"]})
    resp = p.request("POST", "/order", body=b"item=1")
    assert resp.status == 503
    assert resp.body == b"a is busy"
    assert b.requests == []


def test_self_ring_order(proxy, backend, sockdir) -> None:
    """With backups [h1, h2, h3] and self = h1, the backups are tried h2, h3, h1."""
    missing = f"unix:{sockdir / 'gone.sock'}"
    h1, h2, h3 = backend("h1"), backend("h2"), backend("h3")
    p = proxy([missing] + [{"address": h.address, "backup": True} for h in (h1, h2, h3)],
              upstream={"self": h1.address})
    resp = p.request("GET", "/ring")
    assert resp.body == b"h2 GET /ring"
    ev = p.log.wait_for_event("failover", path="/ring")
    assert ev["to"] == h2.address
    assert h1.requests == [] and h3.requests == []


def test_pipelined_requests_in_order_across_a_failover(proxy, backend) -> None:
    app = backend("app", unix=True, backlog=0, handler=lambda r: Reply(
        200, body=f"app {r.target}".encode(), close=True))
    peer = backend("peer", handler=lambda r: Reply(200, body=f"peer {r.target}".encode()))
    p = proxy([app, {"address": peer.address, "backup": True}])
    app.fill_backlog()
    with p.connect() as c:
        c.send(b"GET /a HTTP/1.1\r\nHost: t\r\n\r\nGET /b HTTP/1.1\r\nHost: t\r\n\r\n"
               b"GET /c HTTP/1.1\r\nHost: t\r\n\r\n")
        bodies = [c.read_response().body for _ in range(3)]
    assert bodies == [b"peer /a", b"peer /b", b"peer /c"]
    assert len(p.log.find("failover", reason="overloaded")) == 3


def test_websocket_after_failover(proxy, ws_backend, sockdir) -> None:
    from websockets.sync.client import connect

    missing = f"unix:{sockdir / 'gone.sock'}"
    p = proxy([missing, {"address": ws_backend.address, "backup": True}])
    with connect(f"ws://127.0.0.1:{p.port}/ws", open_timeout=5, close_timeout=2) as ws:
        ws.send("over")
        assert ws.recv(timeout=3) == "over"
    ev = p.log.wait_for_event("failover", path="/ws")
    assert ev["reason"] == "missing" and ev["to"] == ws_backend.address


def test_expect_100_continue_after_failover(proxy, backend, sockdir) -> None:
    missing = f"unix:{sockdir / 'gone.sock'}"
    peer = backend("peer")
    p = proxy([missing, {"address": peer.address, "backup": True}])
    with p.connect() as c:
        c.send(b"PUT /e HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
        assert c.read_head(timeout=3).status == 100
        c.send(b"data")
        resp = c.read_response()
    assert resp.body == b"peer PUT /e"
    assert peer.seen("PUT", "/e")[0].body == b"data"


# ---- idempotency --------------------------------------------------------------------------------

@pytest.mark.parametrize("how", [RESET, CLOSE])
def test_post_reset_is_502_and_never_replayed(proxy, backend, how) -> None:
    primary = backend("app", unix=True, handler=lambda r: how)
    nxt = backend("peer")
    p = proxy([primary, {"address": nxt.address, "backup": True}])
    with p.connect() as c:
        c.send(b"POST /pay HTTP/1.1\r\nHost: t\r\nContent-Length: 11\r\n\r\namount=100&")
        resp = c.read_response()
        assert resp.status == 502
        assert len(resp.body) < 1000
    time.sleep(0.3)
    assert [r.method for r in primary.requests] == ["POST"], "the POST reached the app once"
    assert nxt.requests == [], "a POST must not be replayed on the next server"
    req = p.log.wait_for_event("request", path="/pay")
    assert req["status"] == 502
    assert p.log.find("failover", path="/pay") == []


def test_post_timeout_is_504_and_never_replayed(proxy, backend) -> None:
    primary = backend("app", unix=True, handler=lambda r: HANG)
    nxt = backend("peer")
    p = proxy([primary, {"address": nxt.address, "backup": True}], upstream={"read_timeout": 0.4})
    resp = p.request("POST", "/slowpay", body=b"a=1")
    assert resp.status == 504
    assert nxt.requests == []
    assert len(primary.requests) == 1


def test_post_reset_replayed_with_retry_non_idempotent(proxy, backend) -> None:
    primary = backend("app", unix=True, handler=lambda r: RESET)
    nxt = backend("peer")
    p = proxy([primary, {"address": nxt.address, "backup": True}],
              upstream={"retry_non_idempotent": True})
    _lands_on_next(p, nxt, primary.address, "reset", None, method="POST", body=b"a=1&b=2")


def test_put_reset_replayed_with_its_body(proxy, backend) -> None:
    """PUT is idempotent and a small body is held: after a reset it moves on, body intact."""
    primary = backend("app", unix=True, handler=lambda r: RESET)
    nxt = backend("peer")
    p = proxy([primary, {"address": nxt.address, "backup": True}])
    _lands_on_next(p, nxt, primary.address, "reset", None, method="PUT", body=b"v" * 30000)


def test_put_body_over_retry_body_bytes_not_replayed(proxy, backend) -> None:
    """Streaming mode: a body larger than retry_body_bytes was not kept, so after a reset it
    cannot be sent again."""
    primary = backend("app", unix=True, handler=lambda r: RESET)
    nxt = backend("peer")
    p = proxy([primary, {"address": nxt.address, "backup": True}],
              upstream={"retry_body_bytes": 1000}, server={"request_buffering": False})
    resp = p.request("PUT", "/bigput", body=b"v" * 200000)
    assert resp.status == 502
    time.sleep(0.2)
    assert nxt.requests == []
    assert p.log.find("failover", path="/bigput") == []


def test_buffered_put_body_is_replayed_whatever_its_size(proxy, backend, tmp_path) -> None:
    """SPEC 9: a body held whole (request_buffering, the default) is replayed on a retry whatever
    its size: past request_buffer_bytes it comes back from the temp file, byte for byte."""
    primary = backend("app", unix=True, handler=lambda r: RESET)
    nxt = backend("peer")
    p = proxy([primary, {"address": nxt.address, "backup": True}],
              upstream={"retry_body_bytes": 1000},
              server={"request_buffer_bytes": 4096, "temp_dir": str(tmp_path)})
    body = bytes(range(256)) * 800  # 200 KiB: most of it in the temp file
    resp = p.request("PUT", "/bigput", body=body)
    assert resp.status == 200
    got = nxt.wait_requests(1)[0]
    assert got.complete and got.body == body
    line = p.log.wait_for_event("request", path="/bigput")
    assert line["spilled_bytes"] == len(body) - 4096


# ---- exhaustion ----------------------------------------------------------------------------------

def test_all_fail_502_upstream_exhausted(proxy, sockdir) -> None:
    missing = f"unix:{sockdir / 'gone.sock'}"
    closed = closed_tcp_port()
    stale = stale_unix_socket(str(sockdir / "stale.sock"))
    p = proxy([missing, {"address": closed, "backup": True}, {"address": stale, "backup": True}])
    with p.connect() as c:
        c.send(b"GET /nothing HTTP/1.1\r\nHost: t\r\nX-Request-Id: rid-exhaust-1\r\n\r\n")
        resp = c.read_response()
        assert resp.status == 502
        assert 0 < len(resp.body) < 1000
        assert (resp.header("content-type") or "").startswith("text/plain")
        # the request was read whole: the client connection stays open
        c.send(b"GET /nothing2 HTTP/1.1\r\nHost: t\r\n\r\n")
        assert c.read_response().status == 502
    ev = p.log.wait_for_event("upstream_exhausted", path="/nothing")
    assert ev["level"] == "error"
    assert ev["request_id"] == "rid-exhaust-1"
    assert ev["method"] == "GET"
    assert ev["tried"] == [missing, closed, stale]
    assert ev["reasons"] == ["missing", "refused", "refused"]
    assert ev["status"] == 502
    fos = p.log.find("failover", path="/nothing")
    assert [(f["from"], f["to"], f["attempt"]) for f in fos] == [
        (missing, closed, 1), (closed, stale, 2)]
    req = p.log.wait_for_event("request", path="/nothing")
    assert req["status"] == 502
    assert req["upstream"] is None
    assert req["upstreams"] == [missing, closed, stale]
    assert req["tries"] == 3


def test_all_fail_last_timeout_504(proxy, backend, sockdir) -> None:
    missing = f"unix:{sockdir / 'gone.sock'}"
    hang = backend("hang", handler=lambda r: HANG)
    p = proxy([missing, {"address": hang.address, "backup": True}], upstream={"read_timeout": 0.4})
    resp = p.request("GET", "/slow")
    assert resp.status == 504
    ev = p.log.wait_for_event("upstream_exhausted", path="/slow")
    assert ev["reasons"] == ["missing", "timeout"]
    assert ev["tried"] == [missing, hang.address]
    assert ev["status"] == 504


def test_all_fail_last_connect_timeout_504(proxy, blackhole, sockdir) -> None:
    missing = f"unix:{sockdir / 'gone.sock'}"
    hole = blackhole()
    p = proxy([missing, {"address": hole.address, "backup": True}],
              upstream={"connect_timeout": 0.3})
    resp = p.request("GET", "/dead")
    assert resp.status == 504
    ev = p.log.wait_for_event("upstream_exhausted", path="/dead")
    assert ev["reasons"] == ["missing", "connect_timeout"]
    assert ev["status"] == 504


def test_tries_bounds_the_walk(proxy, backend, sockdir) -> None:
    m1, m2 = f"unix:{sockdir / 'm1.sock'}", f"unix:{sockdir / 'm2.sock'}"
    ok = backend("ok")
    p = proxy([m1, m2, {"address": ok.address, "backup": True}], upstream={"tries": 2})
    resp = p.request("GET", "/bounded")
    assert resp.status == 502
    assert ok.requests == []
    ev = p.log.wait_for_event("upstream_exhausted", path="/bounded")
    assert ev["tried"] == [m1, m2]
    # tries = 0: every server once, so the same set-up reaches `ok`
    p2 = proxy([m1, m2, {"address": ok.address, "backup": True}])
    assert p2.request("GET", "/unbounded").status == 200


def test_retry_timeout_bounds_the_walk(proxy, backend, blackhole) -> None:
    h1, h2 = blackhole(), blackhole()
    ok = backend("ok")
    p = proxy([h1.address, h2.address, {"address": ok.address, "backup": True}],
              upstream={"connect_timeout": 0.4, "retry_timeout": 0.3})
    t0 = time.monotonic()
    resp = p.request("GET", "/hurry")
    took = time.monotonic() - t0
    assert resp.status == 504  # the last attempt was a connect timeout
    assert took < 1.5, f"retry_timeout 0.3 s: the walk stops after attempt 1 ({took:.2f} s)"
    assert ok.requests == []
    ev = p.log.wait_for_event("upstream_exhausted", path="/hurry")
    assert ev["tried"] == [h1.address]


# ---- fail_timeout = 0: the UNIX socket on every request ------------------------------------------

def test_fail_timeout_zero_unix_socket_tried_again_at_once(proxy, backend) -> None:
    # like unicorn, the app closes every connection: each request needs a connect
    app = backend("app", unix=True, backlog=0, handler=lambda r: Reply(
        200, body=f"app {r.method} {r.target}".encode(), close=True))
    peer = backend("peer")
    p = proxy([app, {"address": peer.address, "backup": True}])
    for round_ in range(3):
        app.fill_backlog()
        r1 = p.request("GET", f"/full{round_}")
        assert r1.body == f"peer GET /full{round_}".encode()
        p.log.wait_for_event("failover", path=f"/full{round_}", reason="overloaded")
        app.drain()
        r2 = p.request("GET", f"/room{round_}")
        assert r2.body == f"app GET /room{round_}".encode(), "the next request tries the socket"
        req = p.log.wait_for_event("request", path=f"/room{round_}")
        assert req["upstream"] == app.address
        assert req["upstreams"] == [app.address]
        assert req["tries"] == 1
        assert req["overflowed"] is False
    assert p.log.find("upstream_down") == []
    assert p.log.find("upstream_skipped") == []


def test_request_event_fields(proxy, backend) -> None:
    app = backend("app", unix=True)
    p = proxy([app, {"address": backend("peer").address, "backup": True}])
    resp = p.request("GET", "/fields?a=b", headers=[("X-Request-Id", "rid-fields")])
    assert resp.status == 200
    ev = p.log.wait_for_event("request", request_id="rid-fields")
    assert ev["level"] == "info"
    assert ev["method"] == "GET"
    assert ev["path"].startswith("/fields")
    assert ev["status"] == 200
    assert isinstance(ev["bytes_sent"], int) and ev["bytes_sent"] >= len(resp.body)
    assert _is_num(ev["duration_ms"])
    assert "127.0.0.1" in str(ev["client"])
    assert ev["upstream"] == app.address
    assert ev["upstreams"] == [app.address]
    assert ev["tries"] == 1
    assert ev["overflowed"] is False
    assert _is_num(ev["connect_ms"])
    assert isinstance(ev["pid"], int)
    assert ev["timestamp"].endswith(("Z", "+00:00"))


# ---- max_conns and passive marking --------------------------------------------------------------

def test_max_conns_busy(proxy, backend) -> None:
    app = backend("app", unix=True, handler=lambda r: Reply(
        200, body=b"slow done", delay=1.0 if r.target == "/slow" else 0.0))
    peer = backend("peer")
    # overflow = "ring": max_conns alone decides here. (Under the default `room` policy the
    # policy sees the socket's one worker busy first and skips it as `workers_busy`.)
    p = proxy([{"address": app.address, "max_conns": 1}, {"address": peer.address, "backup": True}],
              upstream={"overflow": "ring"})
    results: dict[str, Any] = {}
    t = threading.Thread(target=lambda: results.setdefault("slow", p.request("GET", "/slow")))
    t.start()
    app.wait_requests(1)
    resp = p.request("GET", "/while-busy")
    assert resp.body == b"peer GET /while-busy"
    ev = p.log.wait_for_event("failover", path="/while-busy")
    assert ev["reason"] == "busy"
    assert ev["from"] == app.address and ev["to"] == peer.address
    assert "errno" not in ev or ev["errno"] is None
    t.join(5)
    assert results["slow"].status == 200
    assert p.request("GET", "/after").body == b"slow done"  # room again: back to the socket
    assert [r.target for r in app.requests] == ["/slow", "/after"]


def test_fail_timeout_marks_down_skips_and_brings_up(proxy, backend, sockdir) -> None:
    path = str(sockdir / "app.sock")
    stale = stale_unix_socket(path)
    peer = backend("peer")
    p = proxy([{"address": stale, "fail_timeout": 1.5, "max_fails": 2},
               {"address": peer.address, "backup": True}])
    assert p.request("GET", "/f1").status == 200
    p.log.wait_for_event("failover", path="/f1", reason="refused")
    assert p.log.find("upstream_down") == [], "one failure of max_fails = 2 does not mark it down"
    assert p.request("GET", "/f2").status == 200
    p.log.wait_for_event("failover", path="/f2", reason="refused")
    down = p.log.wait_for_event("upstream_down", address=stale)
    assert down["level"] == "warning"
    assert down["fails"] == 2
    t_down = time.monotonic()
    # now the app comes back, but the server stays down for fail_timeout: skipped, not tried
    app = HTTPBackend("app", stale)
    try:
        mark = p.log.mark()
        with p.connect() as c:
            c.send(b"GET /f3 HTTP/1.1\r\nHost: t\r\nX-Request-Id: rid-f3\r\n\r\n")
            assert c.read_response().body == b"peer GET /f3"
        skipped = p.log.wait_for_event("upstream_skipped", since=mark, address=stale)
        assert skipped["request_id"] == "rid-f3"
        assert "until" in skipped
        assert app.requests == []
        assert p.log.find("failover", since=mark, path="/f3") == [], "a skip is not an attempt"
        req = p.log.wait_for_event("request", path="/f3")
        assert req["upstream"] == peer.address and req["overflowed"] is True
        # after fail_timeout it is tried again, and a success brings it up
        time.sleep(max(0.0, 1.5 - (time.monotonic() - t_down)) + 0.3)
        resp = p.request("GET", "/f4")
        assert resp.body == b"app GET /f4"
        up = p.log.wait_for_event("upstream_up", address=stale)
        assert up["level"] == "info"
        assert "fails" in up
    finally:
        app.stop()


# ---- stale pooled keep-alive connections ---------------------------------------------------------

def _dies_on_reuse(r: Any) -> Any:
    """Answer the first request of a connection (kept alive); close on the next one unanswered,
    as an app server does when its idle timer fires just as the request arrives."""
    if r.conn_seq > 0:
        return CLOSE
    return Reply(200, body=f"fresh {r.method} {r.target}".encode())


def test_stale_pooled_connection_retried_once_for_get(proxy, backend) -> None:
    app = backend("app", unix=True, handler=_dies_on_reuse)
    peer = backend("peer")
    p = proxy([app, {"address": peer.address, "backup": True}])
    assert p.request("GET", "/one").body == b"fresh GET /one"
    resp = p.request("GET", "/two")
    assert resp.status == 200
    assert resp.body == b"fresh GET /two"
    two = app.seen("GET", "/two")
    assert [(r.conn_id, r.conn_seq) for r in two] == [(1, 1), (2, 0)], \
        "sent on the pooled connection, then once on a fresh one"
    assert peer.requests == []
    assert p.log.find("failover", path="/two") == [], "a stale connection retry is not a failover"


def test_stale_pooled_connection_post_not_replayed(proxy, backend) -> None:
    app = backend("app", unix=True, handler=_dies_on_reuse)
    peer = backend("peer")
    p = proxy([app, {"address": peer.address, "backup": True}])
    assert p.request("GET", "/one").status == 200
    resp = p.request("POST", "/pay", body=b"amount=1")
    assert resp.status == 502
    time.sleep(0.3)
    assert len(app.seen("POST", "/pay")) == 1, "a POST is never replayed"
    assert peer.requests == []


def test_idle_closed_pooled_connection_not_used(proxy, backend) -> None:
    """The app closes idle keep-alive connections after 0.1 s: the pool must notice (EOF) and
    not hand that connection to the next request, a POST included."""
    app = backend("app", unix=True, idle_timeout=0.1)
    peer = backend("peer")
    p = proxy([app, {"address": peer.address, "backup": True}])
    assert p.request("GET", "/one").status == 200
    time.sleep(0.5)
    resp = p.request("POST", "/pay", body=b"amount=1")
    assert resp.status == 200
    assert resp.body == b"app POST /pay"
    time.sleep(0.5)
    assert p.request("GET", "/three").body == b"app GET /three"
    assert len(app.seen("POST", "/pay")) == 1
    assert peer.requests == []


def test_max_queue_skips_a_socket_with_a_waiting_connection(proxy, backend) -> None:
    """max_queue reads the accept queue (sock_diag) and skips the socket without connecting."""
    app = backend("app", unix=True, backlog=16)
    peer = backend("peer")
    p = proxy([{"address": app.address, "max_queue": 1}, {"address": peer.address, "backup": True}])
    assert p.request("GET", "/empty-queue").body == b"app GET /empty-queue"
    app.pause()
    waiting = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    waiting.connect(app.path)  # one connection now waits in the accept queue
    try:
        resp = p.request("GET", "/queued")
        assert resp.body == b"peer GET /queued"
        ev = p.log.wait_for_event("failover", path="/queued")
        assert_failover_event(ev, method="GET", path="/queued", frm=app.address,
                              to=peer.address, reason="queue_full", attempt=1)
        assert ev.get("errno") is None
    finally:
        waiting.close()
        app.resume()
    app.drain()
    resp = p.request("GET", "/drained")
    assert resp.body == b"app GET /drained", "an empty queue: the socket is tried again"

