"""Header rules as tables: no sockets needed."""

from __future__ import annotations

import pytest

from failproxy.config import HeadersConfig
from failproxy.proxy.headers import (
    H_DROP,
    H_HOST,
    H_KEEPALIVE,
    H_PLAIN,
    H_REQUEST_ID,
    H_UNDERSCORE,
    BadRequest,
    NameTable,
    RequestHeadBuilder,
    check_transfer_encoding,
    connection_tokens,
    request_kind_names,
    response_head,
    response_kinds,
    simple_response,
    without_names,
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
        client_ip=b"192.0.2.7",
        tls=False,
        request_id="rid1",
        framing=b"",
        upgrade=b"",
        xff_prior=b"",
        via_prior=b"",
    )
    args.update(kw)
    lines = [b"Host", b": ", b"example.test", b"\r\n", b"Accept", b": ", b"*/*", b"\r\n"]
    return RequestHeadBuilder(cfg).build(
        b"GET", b"/p?q=1", lines, b"example.test", **args  # type: ignore[arg-type]
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
        (True, False, b"X: y\r\n\r\n"),
        (False, False, b"Connection: close\r\n\r\n"),
        (True, True, b"Connection: keep-alive\r\n\r\n"),
        (False, True, b"Connection: close\r\n\r\n"),
    ],
)
def test_response_head_connection(keep: bool, http10: bool, tail: bytes) -> None:
    lines = [b"X", b": ", b"y", b"\r\n"]
    head = response_head(200, b"OK", lines, b"", keep, http10, b"")
    assert head.startswith(b"HTTP/1.1 200 OK\r\nX: y\r\n")
    assert head.endswith(tail)


def test_response_head_writes_known_status_lines() -> None:
    """As nginx: a known status gets failproxy's own line; another keeps the upstream's reason."""
    ok = response_head(200, b"Fine", [], b"", True, False, b"")
    assert ok == b"HTTP/1.1 200 OK\r\n\r\n"
    odd = response_head(299, b"Odd One", [], b"", True, False, b"")
    assert odd == b"HTTP/1.1 299 Odd One\r\n\r\n"


def test_name_table_classifies_each_spelling_once() -> None:
    names = request_kind_names(b"x-request-id", "replace", frozenset({b"x-forwarded-proto"}))
    table = NameTable(names, underscore=True)
    for name, kind in [(b"Host", H_HOST), (b"HOST", H_HOST), (b"host", H_HOST),
                       (b"X_Forwarded_For", H_UNDERSCORE), (b"Accept", H_PLAIN),
                       (b"X-Forwarded-Proto", H_DROP), (b"HTTP2-Settings", H_DROP),
                       (b"X-Request-ID", H_REQUEST_ID), (b"Keep-Alive", H_DROP)]:
        assert table.kind(name) == kind, name
        assert table.kind(name) == kind, name  # the remembered answer is the same
    assert response_kinds().kind(b"Keep-Alive") == H_KEEPALIVE
    assert response_kinds().kind(b"X_Y") == H_PLAIN  # underscores are a request rule


def test_without_names() -> None:
    lines = [b"A", b": ", b"1", b"\r\n", b"X-Secret", b": ", b"2", b"\r\n"]
    assert without_names(lines, {b"x-secret"}) == [b"A", b": ", b"1", b"\r\n"]


def test_simple_response_is_well_framed() -> None:
    data = simple_response(502, "no upstream", close=False)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert b"Content-Length: %d" % len(body) in head
    assert b"Connection: close" not in head
    assert b"Connection: close" in simple_response(400, "bad", close=True)
