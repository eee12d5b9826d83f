"""Header rules as tables: no sockets needed."""

from __future__ import annotations

import pytest

from failproxy.config import HeadersConfig
from failproxy.headers import (
    BadRequest,
    InvalidResponse,
    RequestHeadBuilder,
    check_transfer_encoding,
    connection_tokens,
    response_tail,
    scan_response_head,
    simple_response,
)


@pytest.mark.parametrize(
    ("values", "tokens"),
    [
        ([b"close"], {b"close"}),
        ([b"Keep-Alive, X-Foo"], {b"keep-alive", b"x-foo"}),
        ([b"a", b" B ,, c"], {b"a", b"b", b"c"}),
        ([b""], set()),
    ],
)
def test_connection_tokens(values: list[bytes], tokens: set[bytes]) -> None:
    assert connection_tokens(values) == tokens


@pytest.mark.parametrize(
    ("value", "status"),
    [
        (b"chunked", None),
        (b"gzip, chunked", None),
        (b"Chunked", None),
        (b"chunked, gzip", 400),
        (b"gzip", 400),
        (b"foo, chunked", 501),
        (b"bogus", 501),
    ],
)
def test_transfer_encoding(value: bytes, status: int | None) -> None:
    if status is None:
        check_transfer_encoding(value)
    else:
        with pytest.raises(BadRequest) as info:
            check_transfer_encoding(value)
        assert info.value.status == status


def _build(cfg: HeadersConfig, **kw: object) -> bytes:
    args: dict[str, object] = dict(
        client_ip="192.0.2.7",
        tls=False,
        request_id="rid1",
        framing=b"",
        upgrade=b"",
        xff_prior=b"",
        via_prior=b"",
    )
    args.update(kw)
    return RequestHeadBuilder(cfg).build(
        b"GET", b"/p?q=1", [(b"Host", b"example.test"), (b"Accept", b"*/*")], **args  # type: ignore[arg-type]
    )


def test_default_head() -> None:
    head = _build(HeadersConfig())
    assert head == (
        b"GET /p?q=1 HTTP/1.1\r\nHost: example.test\r\nAccept: */*\r\n"
        b"X-Forwarded-For: 192.0.2.7\r\nX-Forwarded-Proto: http\r\n"
        b"Via: 1.1 failproxy\r\nX-Request-Id: rid1\r\n\r\n"
    )


@pytest.mark.parametrize(
    ("mode", "prior", "expected"),
    [
        ("replace", b"10.9.9.9", b"X-Forwarded-For: 192.0.2.7\r\n"),
        ("append", b"10.9.9.9", b"X-Forwarded-For: 10.9.9.9, 192.0.2.7\r\n"),
        ("append", b"", b"X-Forwarded-For: 192.0.2.7\r\n"),
    ],
)
def test_forwarded_for(mode: str, prior: bytes, expected: bytes) -> None:
    head = _build(HeadersConfig(x_forwarded_for=mode), xff_prior=prior)
    assert expected in head
    assert head.count(b"X-Forwarded-For") == 1


def test_off_switches() -> None:
    cfg = HeadersConfig(
        x_forwarded_for="off", x_forwarded_proto=False, via=False, request_id=""
    )
    head = _build(cfg, via_prior=b"1.0 other")
    assert b"X-Forwarded" not in head
    assert b"X-Request-Id" not in head
    assert b"Via: 1.0 other\r\n" in head


def test_via_appends_and_host_forwarding() -> None:
    head = _build(HeadersConfig(x_forwarded_host=True), via_prior=b"1.0 edge", tls=True)
    assert b"Via: 1.0 edge, 1.1 failproxy\r\n" in head
    assert b"X-Forwarded-Host: example.test\r\n" in head
    assert b"X-Forwarded-Proto: https\r\n" in head


def test_upgrade_and_framing_lines() -> None:
    head = _build(
        HeadersConfig(), upgrade=b"websocket", framing=b"Transfer-Encoding: chunked\r\n"
    )
    assert b"Connection: upgrade\r\nUpgrade: websocket\r\n" in head
    assert head.endswith(b"Transfer-Encoding: chunked\r\n\r\n")


@pytest.mark.parametrize(
    ("keep", "http10", "tail"),
    [
        (True, False, b"\r\n"),
        (False, False, b"Connection: close\r\n\r\n"),
        (True, True, b"Connection: keep-alive\r\n\r\n"),
        (False, True, b"Connection: close\r\n\r\n"),
    ],
)
def test_response_tail_connection(keep: bool, http10: bool, tail: bytes) -> None:
    assert response_tail(b"", keep_alive=keep, http10=http10, extra=b"") == tail
    framed = response_tail(b"F: 1\r\n", keep_alive=keep, http10=http10, extra=b"X: 2\r\n")
    assert framed == b"F: 1\r\nX: 2\r\n" + tail


NGINX = (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: text/plain\r\n"
         b"Content-Length: 2\r\nConnection: keep-alive\r\n\r\n")


@pytest.mark.parametrize(
    ("head", "kept"),
    [
        # the common case: only the hop-by-hop Connection line is cut out, the rest is as sent
        (NGINX, b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: text/plain\r\n"
                b"Content-Length: 2\r\n"),
        (b"HTTP/1.1 204 No Content\r\n\r\n", b"HTTP/1.1 204 No Content\r\n"),
        # every hop-by-hop header goes, whatever its case; Content-Length stays
        (b"HTTP/1.1 200 OK\r\nKEEP-ALIVE: timeout=5\r\nA: 1\r\nproxy-connection: x\r\n"
         b"TE: trailers\r\nTrailer: X\r\nProxy-Authenticate: Basic\r\nUpgrade: h2\r\n"
         b"content-length: 0\r\n\r\n", b"HTTP/1.1 200 OK\r\nA: 1\r\ncontent-length: 0\r\n"),
        # a header named by Connection is hop-by-hop too
        (b"HTTP/1.1 200 OK\r\nConnection: X-Secret, close\r\nX-Secret: 1\r\nB: 2\r\n\r\n",
         b"HTTP/1.1 200 OK\r\nB: 2\r\n"),
        # names that merely start like a hop-by-hop one are kept
        (b"HTTP/1.1 200 OK\r\nConnection-Id: 7\r\nTEA: green\r\n\r\n",
         b"HTTP/1.1 200 OK\r\nConnection-Id: 7\r\nTEA: green\r\n"),
        # an HTTP/1.0 upstream: the client gets an HTTP/1.1 status line
        (b"HTTP/1.0 200 OK\r\nA: 1\r\n\r\n", b"HTTP/1.1 200 OK\r\nA: 1\r\n"),
    ],
)
def test_scan_response_head_keeps_the_rest_byte_for_byte(head: bytes, kept: bytes) -> None:
    status = int(head[9:12])
    assert scan_response_head(head, status, b"").kept == kept


def test_scan_response_head_reads_framing() -> None:
    got = scan_response_head(NGINX, 200, b"")
    assert (got.content_length, got.chunked, got.upgrade, got.keepalive_hint) == (b"2", False,
                                                                                  b"", 0.0)
    got = scan_response_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                             b"Keep-Alive: timeout=5, max=100\r\n\r\n", 200, b"")
    assert got.chunked and got.content_length is None and got.keepalive_hint == 5.0
    switch = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
              b"Connection: upgrade\r\n\r\n")
    got = scan_response_head(switch, 101, b"WebSocket")
    assert got.upgrade == b"websocket"
    assert got.kept == b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"


@pytest.mark.parametrize(
    ("head", "why"),
    [
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", "other than chunked"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n"
         b"\r\n", "other than chunked"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", "other than chunked"),
        (b"HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 2\r\n\r\n",
         "framing header"),
        (b"HTTP/1.1 299 Odd\x01\r\n\r\n", "invalid status line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
         "both Content-Length and Transfer-Encoding"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n", "differing"),
        (b"HTTP/1.1 200 OK\r\nA: 1\r\n  folded\r\n\r\n", "obs-fold"),
    ],
)
def test_scan_response_head_refuses_ambiguous_framing(head: bytes, why: str) -> None:
    with pytest.raises(InvalidResponse, match=why):
        scan_response_head(head, int(head[9:12]), b"")


def test_scan_response_head_writes_known_status_lines() -> None:
    """As nginx: a known status gets failproxy's own line; another keeps the upstream's reason."""
    got = scan_response_head(b"HTTP/1.1 200 Fine\r\nA: 1\r\nConnection: close\r\n\r\n", 200,
                             b"")
    assert got.kept == b"HTTP/1.1 200 OK\r\nA: 1\r\n"
    got = scan_response_head(b"HTTP/1.1 299 Odd One\r\nConnection: close\r\nA: 1\r\n\r\n", 299,
                             b"")
    assert got.kept == b"HTTP/1.1 299 Odd One\r\nA: 1\r\n"


@pytest.mark.parametrize("asked", [b"", b"h2"])
def test_scan_response_head_refuses_a_101_not_asked_for(asked: bytes) -> None:
    with pytest.raises(InvalidResponse, match="101"):
        scan_response_head(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
                           101, asked)


def test_simple_response_is_well_framed() -> None:
    data = simple_response(502, "no upstream", close=False)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert b"Content-Length: %d" % len(body) in head
    assert b"Connection: close" not in head
    assert b"Connection: close" in simple_response(400, "bad", close=True)
