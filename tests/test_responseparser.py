"""The response parser's two twins (proxy/responseparser.py): what each hands its sink for given
bytes, however they are split, and that the Cython one (llhttp driven through its C callbacks)
gives exactly what the httptools one gives: the same calls, the same errors, the same upgrade
offsets. No sockets: bytes in, calls out (as h11 is tested)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from parsertwins import feed, merged, splits

import failproxy
from failproxy.proxy import responseparser
from failproxy.proxy.responseparser import HeadSink, ResponseParserPy

try:
    from failproxy.proxy._llhttp import (  # type: ignore[import-not-found]
        ResponseParser as ResponseParserC,
    )
except ImportError:
    ResponseParserC = None

PURE = failproxy.BUILD.startswith("pure")
needs_c = pytest.mark.skipif(ResponseParserC is None or PURE,
                             reason="the Cython twin is not built, or this run is pure Python")


class Recorder(HeadSink):
    """Every call, in order; `fail_on` names a call that raises instead (a bug in the sink)."""

    def __init__(self, fail_on: str = "") -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.fail_on = fail_on

    def on_head(self, status: int, reason: bytes, lines: list[bytes], length: bytes | None,
                te: bytes, connection: tuple[bytes, ...], upgrade: bytes, keepalive: bytes,
                accel: bytes | None, keep_alive: bool) -> None:
        self.calls.append(("head", status, reason, tuple(lines), length, te, tuple(connection),
                           upgrade, keepalive, accel, keep_alive))
        if self.fail_on == "head":
            raise KeyError("a bug in on_head")

    def on_body(self, body: bytes) -> None:
        self.calls.append(("body", body))
        if self.fail_on == "body":
            raise KeyError("a bug in on_body")

    def on_message_complete(self) -> None:
        self.calls.append(("end",))
        if self.fail_on == "end":
            raise KeyError("a bug in on_message_complete")


def run(cls: Any, pieces: list[bytes], fail_on: str = "") -> tuple[list[Any], Any]:
    """The calls `pieces` make, body pieces merged, and how feeding ended
    (parsertwins.feed)."""
    sink = Recorder(fail_on)
    outcome = feed(cls(sink), pieces)
    return merged(sink.calls), outcome


CASES = {
    "length": b"HTTP/1.1 200 OK\r\nServer: x\r\nContent-Length: 3\r\n\r\nabc",
    "chunked with trailers": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                              b"3\r\nabc\r\n2\r\nde\r\n0\r\nTrailer-A: 1\r\nServer: t\r\n\r\n"),
    "trailers then the next response": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n"
        b"Connection: x\r\nX-Accel-Buffering: no\r\nServer: t\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
    "interim then final": (b"HTTP/1.1 100 Continue\r\nX-A: 1\r\n\r\n"
                           b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                           b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"),
    "upgrade": (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\n\r\n\x81\x05hello"),
    "no content": b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
    "not modified": b"HTTP/1.1 304 Not Modified\r\nETag: \"a\"\r\n\r\n",
    "close delimited": b"HTTP/1.1 200 OK\r\nServer: x\r\n\r\nuntil the end",
    "http/1.0 keep-alive": (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n"
                            b"Keep-Alive: timeout=5\r\nContent-Length: 2\r\n\r\nok"),
    "read headers, mixed case": (
        b"HTTP/1.1 200 Fine\r\nCONTENT-length: 2\r\nconnection: close, X-Drop\r\n"
        b"Connection: x-other\r\nKEEP-ALIVE: timeout=9\r\nkeep-alive: max=3\r\n"
        b"x-accel-buffering: yes\r\nX-Accel-Buffering:  No \r\nUpgrade: h2c\r\nupgrade: ws\r\n"
        b"Proxy-Authenticate: basic\r\nTE: x\r\nTrailer: y\r\nProxy-Connection: close\r\n"
        b"X-Drop: 1\r\n\r\nhi"),
    "empty and spaced values": (b"HTTP/1.1 200 OK\r\nX-Empty:\r\nX-Spaces:   a  b  \r\n"
                                b"Content-Length: 0\r\n\r\n"),
    "long names": (b"HTTP/1.1 200 OK\r\n" + b"X-" + b"n" * 40 + b": v\r\n"
                   + b"Transfer-Encoding-But-Longer-Than-Any: v\r\nContent-Length: 0\r\n\r\n"),
    "empty reason": b"HTTP/1.1 200 \r\nContent-Length: 0\r\n\r\n",
    "te twice": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n"
                 b"\r\n1\r\na\r\n0\r\n\r\n"),
    "two responses": (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na"
                      b"HTTP/1.1 404 Not Found\r\nContent-Length: 1\r\n\r\nb"),
    "bad status": b"HTTP/1.1 20x OK\r\n\r\n",
    "bad version": b"HTTP/3.1 200 OK\r\n\r\n",
    "space before colon": b"HTTP/1.1 200 OK\r\nServer : x\r\n\r\n",
    "obs-fold": b"HTTP/1.1 200 OK\r\nX-A: 1\r\n  folded\r\nContent-Length: 0\r\n\r\n",
    "bad chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    "length twice, different": b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    "length and chunked": (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n"
                           b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    "bare lf": b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
    "nul in value": b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 0\r\n\r\n",
    # more pieces than the C twin's first array holds (32): it grows mid-head
    "many headers": (b"HTTP/1.1 200 OK\r\n"
                     + b"".join(b"X-H%d: v%d\r\n" % (i, i) for i in range(40))
                     + b"Content-Length: 2\r\n\r\nok"),
}


def test_the_build_uses_the_twin_it_says() -> None:
    if PURE or ResponseParserC is None:
        assert responseparser.BUILT == "pure"
        assert responseparser.ResponseParser is ResponseParserPy
    else:
        assert responseparser.BUILT == "cython"
        assert responseparser.ResponseParser is ResponseParserC


@pytest.mark.parametrize("cls", [ResponseParserPy, pytest.param(ResponseParserC, marks=needs_c)])
def test_a_head_comes_in_one_call_with_what_failproxy_reads_apart(cls: Any) -> None:
    calls, outcome = run(cls, [CASES["read headers, mixed case"]])
    assert outcome is None
    assert calls == [
        ("head", 200, b"Fine",
         (b"CONTENT-length", b": ", b"2", b"\r\n", b"X-Drop", b": ", b"1", b"\r\n"),
         b"2", b"", (b"close, X-Drop", b"x-other"), b"ws", b"timeout=9,max=3", b"No ", False),
        ("body", b"hi"),
        ("end",),
    ]


@pytest.mark.parametrize("cls", [ResponseParserPy, pytest.param(ResponseParserC, marks=needs_c)])
def test_interim_heads_trailers_and_an_upgrade(cls: Any) -> None:
    calls, outcome = run(cls, [CASES["interim then final"]])
    assert outcome is None
    assert [c[:3] for c in calls] == [("head", 100, b"Continue"), ("end",),
                                      ("head", 103, b"Early Hints"), ("end",),
                                      ("head", 201, b"Created"), ("end",)]
    assert calls[0][3] == (b"X-A", b": ", b"1", b"\r\n")
    calls, outcome = run(cls, [CASES["chunked with trailers"]])
    assert outcome is None
    assert calls[0][3] == () and calls[0][5] == b"chunked"
    assert calls[1:] == [("body", b"abcde"), ("end",)]  # the trailer fields are not relayed
    calls, outcome = run(cls, [CASES["trailers then the next response"]])
    assert outcome is None
    assert calls[3] == ("head", 200, b"OK", (b"Content-Length", b": ", b"0", b"\r\n"), b"0",
                        b"", (), b"", b"", None, True)  # nor counted in the next head
    data = CASES["upgrade"]
    calls, outcome = run(cls, [data])
    assert calls[0][1] == 101 and calls[0][7] == b"websocket" and calls[-1] == ("end",)
    assert outcome == ("upgrade", 0, data.index(b"\x81"))


@pytest.mark.parametrize("cls", [ResponseParserPy, pytest.param(ResponseParserC, marks=needs_c)])
def test_a_sinks_own_error_rides_as_the_context(cls: Any) -> None:
    names = {"head": "on_head", "body": "on_body", "end": "on_message_complete"}
    for where, made in (("head", ["head"]), ("body", ["head", "body"]),
                        ("end", ["head", "body", "end"])):
        calls, outcome = run(cls, [CASES["length"]], fail_on=where)
        assert [c[0] for c in calls] == made  # nothing after the failing call
        assert outcome[:2] == ("error", "HttpParserCallbackError"), outcome
        assert outcome[3] == ("KeyError", repr(f"a bug in {names[where]}")), outcome


@pytest.mark.parametrize("cls", [ResponseParserPy, pytest.param(ResponseParserC, marks=needs_c)])
def test_a_closed_parser_takes_nothing(cls: Any) -> None:
    sink = Recorder()
    parser = cls(sink)
    data = CASES["length"]
    parser.feed_data(data[:20])
    parser.close()
    parser.feed_data(data[20:])
    parser.feed_data(b"not http at all")
    assert sink.calls == []


@pytest.mark.parametrize("cls", [ResponseParserPy, pytest.param(ResponseParserC, marks=needs_c)])
def test_a_reopened_parser_is_a_new_one_for_its_new_sink(cls: Any) -> None:
    """upstream.open_connection reuses a closed parser for the next connection: whatever the
    old one was in the middle of (a head cut short, here past a header and into the next) is
    gone, and the new sink gets what a new parser would give it."""
    old, new = Recorder(), Recorder()
    parser = cls(old)
    with pytest.raises(RuntimeError):
        parser.reopen(new)  # only a closed one
    data = CASES["read headers, mixed case"]
    parser.feed_data(data[:data.index(b"\r\n", 30) + 5])
    parser.close()
    parser.reopen(new)
    for piece in (data[:7], data[7:]):
        parser.feed_data(piece)
    fresh = Recorder()
    cls(fresh).feed_data(data)
    assert old.calls == [] and new.calls == fresh.calls and len(new.calls) == 3


@needs_c
def test_strings_seen_lately_are_handed_over_again_and_never_mixed_up() -> None:
    """The Cython twin keeps the short names and values it made lately (_llhttp._recent) and
    hands the same object over when the same bytes come again. Strings that share a slot of
    its table (same length, same first and last four bytes) must still come out as sent, and
    so must one longer than it keeps."""
    def head(value: bytes, body: bytes) -> tuple[Any, ...]:
        sink = Recorder()
        ResponseParserC(sink).feed_data(b"HTTP/1.1 200 OK\r\nX-Same: " + value + b"\r\n"
                                        b"Content-Length: %d\r\n\r\n" % len(body) + body)
        (got_head, got_body, _end) = sink.calls
        lines = got_head[3]
        return lines[2], got_body[1], lines[0]

    # one slot (same length, same first and last four bytes), three strings for its two ways
    one, two, three = (b"abcd" + c * 20 + b"wxyz" for c in (b"1", b"2", b"3"))
    long = b"v" * 64 + b"w" * 40
    sent = [(one, b"ok\n"), (two, b"no\n"), (one, b"ok\n"), (three, b"ok\n"), (two, b"no\n"),
            (one, b"ok\n"), (long, long), (two, b"no\n"), (b"a", b"b")]
    seen = [head(v, b) for v, b in sent]
    assert [(v, b) for v, b, _ in seen] == sent
    assert seen[0][2] == b"X-Same" and seen[0][2] is seen[1][2], "the name, made once"
    a, b = head(b"text/plain", b"x"), head(b"text/plain", b"x")
    assert a[0] is b[0] and a[1] is b[1], "the same value, the same object"


@needs_c
@pytest.mark.parametrize("name", sorted(CASES))
def test_the_twins_agree_however_the_bytes_are_split(name: str) -> None:
    for pieces in splits(CASES[name]):
        assert run(ResponseParserC, pieces) == run(ResponseParserPy, pieces), (name, pieces)


@needs_c
def test_the_twins_agree_on_a_memoryview_and_a_bytearray() -> None:
    data = CASES["chunked with trailers"]
    expected = run(ResponseParserPy, [data])
    assert run(ResponseParserC, [memoryview(data)]) == expected
    assert run(ResponseParserC, [bytearray(data)]) == expected


_NAMES = st.sampled_from([
    b"Content-Length", b"content-length", b"Transfer-Encoding", b"Connection", b"Keep-Alive",
    b"Upgrade", b"X-Accel-Buffering", b"TE", b"Trailer", b"Proxy-Authenticate", b"Server",
    b"Set-Cookie", b"X-Y", b"Proxy-Connection", b"X-" + b"z" * 40,
]).map(lambda n: bytes(c ^ 32 if 97 <= c <= 122 and c % 3 == 0 else c for c in n))
_VALUES = st.binary(max_size=12).map(lambda v: bytes(c for c in v if 0x21 <= c <= 0x7E))
_STATUS = st.sampled_from([b"200 OK", b"204 No Content", b"101 Switching", b"100 Continue",
                           b"304 Not Modified", b"404 ", b"500 Internal Error", b"999 x"])


@needs_c
@settings(max_examples=300, deadline=None)
@given(status=_STATUS, headers=st.lists(st.tuples(_NAMES, _VALUES), max_size=8),
       body=st.binary(max_size=40), cuts=st.lists(st.integers(min_value=0, max_value=400),
                                                  max_size=5))
def test_the_twins_agree_on_any_response(status: bytes, headers: list[tuple[bytes, bytes]],
                                         body: bytes, cuts: list[int]) -> None:
    data = (b"HTTP/1.1 " + status + b"\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in headers)
            + b"\r\n" + body)
    marks = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    pieces = [data[a:b] for a, b in itertools.pairwise(marks)]
    assert run(ResponseParserC, pieces) == run(ResponseParserPy, pieces)
