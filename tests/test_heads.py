"""The two heads' twins (proxy/headers.py's pure `RequestHeadBuilder.build` and
`response_head_py`, proxy/_heads.pyx's `RequestHead` and `ResponseHead`): the same bytes for
the same arguments, the same errors for what the fast path does not take, and the build that
runs uses the twin it says."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import failproxy
from failproxy.config import HeadersConfig
from failproxy.proxy import headers
from failproxy.proxy.headers import STATUS_LINES, RequestHeadBuilder, response_head_py

try:
    from failproxy.proxy._heads import (  # type: ignore[import-not-found]
        RequestHead,
        ResponseHead,
    )
except ImportError:
    RequestHead = ResponseHead = None

PURE = failproxy.BUILD.startswith("pure")
needs_c = pytest.mark.skipif(RequestHead is None or PURE,
                             reason="the Cython twin is not built, or this run is pure Python")

LINES = [b"Host", b": ", b"example.test", b"\r\n", b"Accept", b": ", b"*/*", b"\r\n"]
ARGS = (b"GET", b"/p?q=1", LINES, b"example.test", b"192.0.2.7", False, "rid1",
        b"Content-Length: 3\r\n", b"", b"", b"")


def _c_writer(builder: RequestHeadBuilder) -> Any:
    """The Cython twin made from a builder's settings, whatever this run's build is."""
    return RequestHead(builder._xff, builder._proto_http, builder._proto_https, builder._xfh,
                       builder._via, builder._rid_name, builder.build).build


def test_the_build_uses_the_twin_it_says() -> None:
    builder = RequestHeadBuilder(HeadersConfig())
    writer = builder.writer()
    if PURE:
        assert headers.BUILT == "pure"
        assert writer == builder.build and headers.response_head is response_head_py
    else:
        assert headers.BUILT == "cython"
        assert type(writer.__self__) is RequestHead
        assert type(headers.response_head.__self__) is ResponseHead


def test_the_running_writer_writes_a_head() -> None:
    head = RequestHeadBuilder(HeadersConfig()).writer()(*ARGS)
    assert head.startswith(b"GET /p?q=1 HTTP/1.1\r\nHost: example.test\r\nAccept: */*\r\n")
    assert head.endswith(b"X-Request-Id: rid1\r\nContent-Length: 3\r\n\r\n")
    assert headers.response_head(404, b"Nope", LINES, b"", True, True, b"X-Up: a\r\n") == (
        b"HTTP/1.1 404 Not Found\r\nHost: example.test\r\nAccept: */*\r\nX-Up: a\r\n"
        b"Connection: keep-alive\r\n\r\n")


_piece = st.binary(max_size=40)
_settings = st.builds(
    HeadersConfig,
    x_forwarded_for=st.sampled_from(["off", "replace", "append"]),
    x_forwarded_proto=st.booleans(),
    x_forwarded_host=st.booleans(),
    via=st.booleans(),
    request_id=st.sampled_from(["", "X-Request-ID", "Req-Id"]),
)


@needs_c
@settings(max_examples=400, deadline=None)
@given(cfg=_settings, method=_piece, target=_piece,
       lines=st.lists(_piece, max_size=48), host=_piece, client_ip=_piece, tls=st.booleans(),
       request_id=st.text(max_size=20), framing=_piece,
       upgrade=_piece, xff_prior=_piece, via_prior=_piece)
def test_the_request_twins_write_the_same_head(
    cfg: HeadersConfig, method: bytes, target: bytes, lines: list[bytes], host: bytes,
    client_ip: bytes, tls: bool, request_id: str, framing: bytes, upgrade: bytes,
    xff_prior: bytes, via_prior: bytes,
) -> None:
    builder = RequestHeadBuilder(cfg)
    args = (method, target, lines, host, client_ip, tls, request_id, framing, upgrade,
            xff_prior, via_prior)
    expected = builder.build(*args)
    assert _c_writer(builder)(*args) == expected


@needs_c
@settings(max_examples=400, deadline=None)
@given(status=st.sampled_from([*STATUS_LINES, 299, 599, 103, 0]), reason=_piece,
       lines=st.lists(_piece, max_size=48), framing=_piece, keep=st.booleans(),
       http10=st.booleans(), extra=_piece)
def test_the_response_twins_write_the_same_head(
    status: int, reason: bytes, lines: list[bytes], framing: bytes, keep: bool, http10: bool,
    extra: bytes,
) -> None:
    args = (status, reason, lines, framing, keep, http10, extra)
    assert ResponseHead(STATUS_LINES, response_head_py).write(*args) == response_head_py(*args)


class _Bytes(bytes):
    pass


@needs_c
@pytest.mark.parametrize("lines", [
    [b"A", b": ", bytearray(b"b"), b"\r\n"],   # another buffer: the pure twin joins it
    [b"A", b": ", _Bytes(b"sub"), b"\r\n"],    # a bytes subclass
], ids=["buffer", "subclass"])
def test_the_cython_twins_hand_the_rest_to_the_pure_ones(lines: Any) -> None:
    builder = RequestHeadBuilder(HeadersConfig())
    args = (b"GET", b"/", lines, b"h", b"10.0.0.1", True, "r", b"", b"", b"", b"")
    assert _c_writer(builder)(*args) == builder.build(*args)
    assert b"A: b\r\n" in builder.build(*args) or b"A: sub\r\n" in builder.build(*args)
    rargs = (200, b"OK", lines, b"", True, False, b"")
    assert ResponseHead(STATUS_LINES, response_head_py).write(*rargs) == response_head_py(*rargs)
    other = (b"GET", _Bytes(b"/x"), [], b"h", b"10.0.0.1", False, "r", b"", b"", b"", b"")
    assert _c_writer(builder)(*other) == builder.build(*other)


@needs_c
@pytest.mark.parametrize("bad", [
    ("lines", [b"A", "text"]), ("lines", [b"A", None]), ("lines", None),
    ("lines", (b"A", b": ", b"b", b"\r\n")),  # not a list: the typed twin takes none
    ("target", "/text"), ("request_id", b"bytes-id"), ("request_id", "\ud800"),
    ("framing", None),
], ids=str)
def test_the_cython_twins_refuse_what_the_pure_ones_refuse(bad: tuple[str, Any]) -> None:
    names = ["method", "target", "lines", "host", "client_ip", "tls", "request_id", "framing",
             "upgrade", "xff_prior", "via_prior"]
    args = list(ARGS)
    args[names.index(bad[0])] = bad[1]
    builder = RequestHeadBuilder(HeadersConfig())
    with pytest.raises(Exception) as expected:
        builder.build(*args)
    with pytest.raises(type(expected.value)) as got:
        _c_writer(builder)(*args)
    assert str(got.value) == str(expected.value)


@needs_c
@pytest.mark.parametrize("args", [
    (200, b"OK", [b"A", "text"], b"", True, False, b""),
    (200, b"OK", None, b"", True, False, b""),
    (200, b"OK", (b"A", b": ", b"b", b"\r\n"), b"", True, False, b""),
    (200, b"OK", [], None, True, False, b""),
    (299, "text", [], b"", True, False, b""),
    ("200", b"OK", [], b"", True, False, b""),
], ids=str)
def test_the_cython_response_twin_refuses_what_the_pure_one_refuses(args: tuple[Any, ...]) -> None:
    with pytest.raises(Exception) as expected:
        response_head_py(*args)
    with pytest.raises(type(expected.value)) as got:
        ResponseHead(STATUS_LINES, response_head_py).write(*args)
    assert str(got.value) == str(expected.value)
