"""The request parser's two twins (proxy/requestparser.py): what each hands its sink for given
bytes, however they are split, and that the Cython one (llhttp driven through its C callbacks)
gives exactly what the httptools one gives: the same calls, the same errors (a request refused
for a header alone fails at the same place with the same message), the same upgrade offsets.
No sockets: bytes in, calls out (as h11 is tested)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from parsertwins import feed, merged, splits

import failproxy
from failproxy.proxy import requestparser
from failproxy.proxy.headers import NameTable, request_kind_names
from failproxy.proxy.requestparser import RequestParserPy, RequestSink

try:
    from failproxy.proxy._llhttp import (  # type: ignore[import-not-found]
        Names as NamesC,
    )
    from failproxy.proxy._llhttp import (
        RequestParser as RequestParserC,
    )
except ImportError:
    RequestParserC = NamesC = None

PURE = failproxy.BUILD.startswith("pure")
needs_c = pytest.mark.skipif(RequestParserC is None or PURE,
                             reason="the Cython twin is not built, or this run is pure Python")

# A worker's table: X-Forwarded-For appended, X-Request-ID as the request-id header, and
# X-Forwarded-Proto set by failproxy (so dropped from the client's head).
KINDS = request_kind_names(b"x-request-id", "append", frozenset({b"x-forwarded-proto"}))
MAX_URL = 64


class Recorder(RequestSink):
    """Every call, in order; `fail_on` names a call that raises instead (a bug in the sink)."""

    def __init__(self, fail_on: str = "") -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.fail_on = fail_on

    def on_message_begin(self) -> None:
        self.calls.append(("begin",))
        if self.fail_on == "begin":
            raise KeyError("a bug in on_message_begin")

    def on_head(self, method: bytes, url: bytes, version: str, upgrading: bool,
                lines: list[bytes], host: bytes, host_count: int, head_size: int,
                length: bytes | None, te: bytes, connection: tuple[bytes, ...], upgrade: bytes,
                request_id: str, xff: bytes, via: bytes, expect_continue: bool) -> None:
        self.calls.append(("head", method, url, version, upgrading, tuple(lines), host,
                           host_count, head_size, length, te, tuple(connection), upgrade,
                           request_id, xff, via, expect_continue))
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


def make(twin: str, sink: RequestSink) -> Any:
    if twin == "py":
        return RequestParserPy(sink, NameTable(KINDS, underscore=True), MAX_URL)
    return RequestParserC(sink, NamesC(KINDS, underscore=True), MAX_URL)


def run(twin: str, pieces: list[bytes], fail_on: str = "") -> tuple[list[Any], Any]:
    """The calls `pieces` make, body pieces merged, and how feeding ended
    (parsertwins.feed)."""
    sink = Recorder(fail_on)
    outcome = feed(make(twin, sink), pieces)
    return merged(sink.calls), outcome


CASES = {
    "get": b"GET /a?b=c HTTP/1.1\r\nHost: h\r\nAccept: */*\r\nUser-Agent: t\r\n\r\n",
    "read headers, mixed case": (
        b"POST /p HTTP/1.1\r\nHOST: h:81\r\ncontent-LENGTH: 3\r\nConnection: keep-alive, X-A\r\n"
        b"connection: x-b\r\nX-Request-Id: abc\r\nX-Forwarded-For: 1.2.3.4\r\n"
        b"x-forwarded-for: 5.6.7.8\r\nVia: 1.0 a\r\nVIA: 1.1 b\r\nExpect: 100-Continue\r\n"
        b"Proxy-Connection: close\r\nKeep-Alive: 5\r\nTE: trailers\r\nX_Under: 1\r\n"
        b"X-Forwarded-Proto: https\r\nHTTP2-Settings: x\r\nX-A: 1\r\n\r\nabc"),
    "chunked with trailers": (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                              b"3\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: 1\r\nX-Other: 2\r\n\r\n"),
    "trailers then the next request": (
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n1\r\na\r\n0\r\n"
        b"Host: t\r\nExpect: nonsense\r\nX-T: 1\r\n\r\n"
        b"GET /2 HTTP/1.1\r\nHost: h\r\n\r\n"),
    "pipelined": (b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\nHEAD /2 HTTP/1.1\r\nHost: h\r\n\r\n"
                  b"DELETE /3 HTTP/1.0\r\n\r\n"),
    "http/1.0 keep-alive": b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    "http/0.9-style version": b"GET / HTTP/0.9\r\nHost: h\r\n\r\n",
    "http/2.0 version": b"GET / HTTP/2.0\r\nHost: h\r\n\r\n",
    "upgrade": (b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                b"upgrade: h2c\r\n\r\n\x81\x05hello"),
    "upgrade with a body": (b"POST /ws HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\n"
                            b"Upgrade: websocket\r\nContent-Length: 3\r\n\r\n"
                            b"abcGET / HTTP/1.1\r\n"),
    "connect": b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n",
    "absolute form": b"GET http://h/x HTTP/1.1\r\nHost: other\r\n\r\n",
    "empty and spaced values": b"GET / HTTP/1.1\r\nHost: h\r\nX-Empty:\r\nX-S:   a  b  \r\n\r\n",
    "long names": (b"GET / HTTP/1.1\r\nHost: h\r\nX-" + b"n" * 40 + b": v\r\n"
                   + b"Transfer-Encoding-But-Longer-Than-Any: v\r\n\r\n"),
    "two hosts": b"GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n",
    "url at the limit": b"GET /" + b"u" * (MAX_URL - 1) + b" HTTP/1.1\r\nHost: h\r\n\r\n",
    "url past the limit": b"GET /" + b"u" * MAX_URL + b" HTTP/1.1\r\nHost: h\r\n\r\n",
    "invalid host": b"GET / HTTP/1.1\r\nHost: a b\r\nX-A: 1\r\n\r\n",
    "invalid host, last": b"GET / HTTP/1.1\r\nX-A: 1\r\nHost: a/b\r\n\r\n",
    "bad expect": b"PUT / HTTP/1.1\r\nHost: h\r\nExpect: 200-ok\r\nContent-Length: 1\r\n\r\nx",
    "bad method": b"G@T / HTTP/1.1\r\nHost: h\r\n\r\n",
    "bad version": b"GET / HTTP/3.1\r\nHost: h\r\n\r\n",
    "space before colon": b"GET / HTTP/1.1\r\nHost : h\r\n\r\n",
    "obs-fold": b"GET / HTTP/1.1\r\nHost: h\r\nX-A: 1\r\n  folded\r\n\r\n",
    "bad chunk": b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    "length twice, different": (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\n"
                                b"Content-Length: 2\r\n\r\n"),
    "length and chunked": (b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n"
                           b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    "bare lf": b"GET / HTTP/1.1\nHost: h\n\n",
    "nul in value": b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\x00b\r\n\r\n",
    "space in the target": b"GET /a b HTTP/1.1\r\nHost: h\r\n\r\n",
    # more pieces than the C twin's first array holds (32): it grows mid-head
    "many headers": (b"GET / HTTP/1.1\r\nHost: h\r\n"
                     + b"".join(b"X-H%d: v%d\r\n" % (i, i) for i in range(40))
                     + b"Connection: close\r\n\r\n"),
}


def test_the_build_uses_the_twin_it_says() -> None:
    if PURE or RequestParserC is None:
        assert requestparser.BUILT == "pure"
        assert requestparser.RequestParser is RequestParserPy
        assert requestparser.Names is NameTable
    else:
        assert requestparser.BUILT == "cython"
        assert requestparser.RequestParser is RequestParserC
        assert requestparser.Names is NamesC


@pytest.mark.parametrize("twin", ["py", pytest.param("c", marks=needs_c)])
def test_a_head_comes_in_one_call_with_what_failproxy_reads_apart(twin: str) -> None:
    data = CASES["read headers, mixed case"]
    calls, outcome = run(twin, [data])
    assert outcome is None
    head_size = sum(len(line) + 2 for line in data.split(b"\r\n\r\n")[0].split(b"\r\n")[1:])
    assert calls == [
        ("begin",),
        ("head", b"POST", b"/p", "1.1", False,
         (b"HOST", b": ", b"h:81", b"\r\n", b"X-A", b": ", b"1", b"\r\n"),
         b"h:81", 1, head_size, b"3", b"", (b"keep-alive, X-A", b"x-b"), b"", "abc",
         b"1.2.3.4, 5.6.7.8", b"1.0 a, 1.1 b", True),
        ("body", b"abc"),
        ("end",),
    ]


@pytest.mark.parametrize("twin", ["py", pytest.param("c", marks=needs_c)])
def test_versions_trailers_upgrades(twin: str) -> None:
    calls, outcome = run(twin, [CASES["pipelined"]])
    assert outcome is None
    assert [(c[1], c[2], c[3]) for c in calls if c[0] == "head"] == [
        (b"GET", b"/1", "1.1"), (b"HEAD", b"/2", "1.1"), (b"DELETE", b"/3", "1.0")]
    assert run(twin, [CASES["http/2.0 version"]])[0][1][3] == "2.0"
    assert run(twin, [CASES["http/0.9-style version"]])[0][1][3] == "0.9"
    calls, outcome = run(twin, [CASES["chunked with trailers"]])
    assert outcome is None
    assert calls[1][10] == b"chunked" and calls[1][5] == (b"Host", b": ", b"h", b"\r\n")
    assert calls[2:] == [("body", b"abcde"), ("end",)]  # the trailer fields are not forwarded
    calls, outcome = run(twin, [CASES["trailers then the next request"]])
    assert outcome is None  # a trailer's bad Host or Expect is no refusal: it is dropped
    assert calls[5] == ("head", b"GET", b"/2", "1.1", False, (b"Host", b": ", b"h", b"\r\n"),
                        b"h", 1, 9, None, b"", (), b"", "", b"", b"", False)
    data = CASES["upgrade"]
    calls, outcome = run(twin, [data])
    assert calls[1][4] is True and calls[1][12] == b"websocket, h2c"
    assert calls[-1] == ("end",)
    assert outcome == ("upgrade", 0, data.index(b"\x81"))
    data = CASES["upgrade with a body"]
    calls, outcome = run(twin, [data])
    assert [c[0] for c in calls] == ["begin", "head", "end"]  # llhttp skips the body
    assert outcome == ("upgrade", 0, data.index(b"abc"))


@pytest.mark.parametrize("twin", ["py", pytest.param("c", marks=needs_c)])
def test_refused_for_a_header_alone(twin: str) -> None:
    calls, outcome = run(twin, [CASES["url past the limit"]])
    assert calls == [("begin",)]
    assert outcome == ("error", "HttpParserCallbackError", "`on_url` callback error",
                       ("BadRequest", "request target too long"))
    assert run(twin, [CASES["url at the limit"]])[1] is None
    calls, outcome = run(twin, [CASES["invalid host"]])
    assert calls == [("begin",)]
    assert outcome == ("error", "HttpParserCallbackError", "`on_header_field` callback error",
                       ("BadRequest", "invalid Host"))
    calls, outcome = run(twin, [CASES["invalid host, last"]])
    assert outcome[:2] == ("error", "HttpParserCallbackError")
    assert outcome[3] == ("BadRequest", "invalid Host")
    calls, outcome = run(twin, [CASES["bad expect"]])
    assert outcome[3] == ("BadRequest", "unsupported expectation")


@pytest.mark.parametrize("twin", ["py", pytest.param("c", marks=needs_c)])
def test_a_sinks_own_error_rides_as_the_context(twin: str) -> None:
    names = {"begin": "on_message_begin", "head": "on_head", "body": "on_body",
             "end": "on_message_complete"}
    data = b"PUT / HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nab"
    for where, made in (("begin", ["begin"]), ("head", ["begin", "head"]),
                        ("body", ["begin", "head", "body"]),
                        ("end", ["begin", "head", "body", "end"])):
        calls, outcome = run(twin, [data], fail_on=where)
        assert [c[0] for c in calls] == made  # nothing after the failing call
        assert outcome[:2] == ("error", "HttpParserCallbackError"), outcome
        assert outcome[3] == ("KeyError", repr(f"a bug in {names[where]}")), outcome


@pytest.mark.parametrize("twin", ["py", pytest.param("c", marks=needs_c)])
def test_a_closed_parser_takes_nothing(twin: str) -> None:
    sink = Recorder()
    parser = make(twin, sink)
    data = CASES["get"]
    parser.feed_data(data[:20])
    parser.close()
    parser.feed_data(data[20:])
    parser.feed_data(b"not http at all")
    assert sink.calls == [("begin",)]


@needs_c
@pytest.mark.parametrize("name", sorted(CASES))
def test_the_twins_agree_however_the_bytes_are_split(name: str) -> None:
    for pieces in splits(CASES[name]):
        assert run("c", pieces) == run("py", pieces), (name, pieces)


@needs_c
def test_the_twins_agree_on_a_memoryview_and_a_bytearray() -> None:
    data = CASES["read headers, mixed case"]
    expected = run("py", [data])
    for twin_input in (memoryview(data), bytearray(data)):
        sink = Recorder()
        make("c", sink).feed_data(twin_input)
        assert [c for c in sink.calls] == [c for c in expected[0]]


@needs_c
def test_the_c_name_table_is_the_name_tables_twin() -> None:
    names = [*KINDS, b"Accept", b"X_Y", b"x-request-i", b"x-request-idd", b"", b"h",
             b"X-" + b"z" * 80, b"HOST", b"Content-length"]
    for underscore in (True, False):
        py, c = NameTable(KINDS, underscore=underscore), NamesC(KINDS, underscore=underscore)
        for name in names:
            spelled = bytes(ch ^ 32 if 97 <= ch <= 122 and ch % 2 else ch for ch in name)
            assert c.kind(name) == py.kind(name), name
            assert c.kind(spelled) == py.kind(spelled), spelled
    assert NamesC({}, underscore=False).kind(b"Host") == 0


_NAMES = st.sampled_from([
    b"Host", b"Content-Length", b"Transfer-Encoding", b"Connection", b"Keep-Alive", b"Upgrade",
    b"Expect", b"Via", b"X-Forwarded-For", b"X-Request-ID", b"X-Forwarded-Proto",
    b"Proxy-Connection", b"TE", b"Accept", b"X_Y", b"Cookie", b"X-" + b"z" * 40,
]).map(lambda n: bytes(c ^ 32 if 97 <= c <= 122 and c % 3 == 0 else c for c in n))
_VALUES = st.sampled_from([b"h", b"0", b"5", b"chunked", b"close", b"keep-alive", b"upgrade",
                           b"websocket", b"100-continue", b"a b", b"1.1.1.1", b"", b"x,y"])
_LINES = st.sampled_from([b"GET / HTTP/1.1", b"POST /p?q HTTP/1.1", b"GET / HTTP/1.0",
                          b"OPTIONS * HTTP/1.1", b"GET http://h/ HTTP/1.1", b"PUT /x HTTP/2.0",
                          b"GET /" + b"u" * 70 + b" HTTP/1.1"])


@needs_c
@settings(max_examples=300, deadline=None)
@given(line=_LINES, headers=st.lists(st.tuples(_NAMES, _VALUES), max_size=8),
       body=st.binary(max_size=40), cuts=st.lists(st.integers(min_value=0, max_value=400),
                                                  max_size=5))
def test_the_twins_agree_on_any_request(line: bytes, headers: list[tuple[bytes, bytes]],
                                        body: bytes, cuts: list[int]) -> None:
    data = (line + b"\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in headers) + b"\r\n"
            + body)
    marks = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    pieces = [data[a:b] for a, b in itertools.pairwise(marks)]
    assert run("c", pieces) == run("py", pieces)


@needs_c
def test_a_parser_between_heads_holds_no_header_buffers() -> None:
    """The compiled twin gives its header buffers (the name, the value, the target and the
    forwarded pieces: 256 B each) back when a feed leaves them empty, so an idle keep-alive
    connection holds none (bench memory: they were a quarter of an idle connection's bytes);
    a head cut across feeds keeps what it has gathered. Measured with tracemalloc over many
    parsers, against the same parsers holding a head cut in the middle of a header."""
    import gc
    import tracemalloc

    head = b"GET /a/b?c=d HTTP/1.1\r\nHost: h\r\nAccept: */*\r\nUser-Agent: t\r\n\r\n"
    cut = head.index(b"Accept: */") + len(b"Accept: */")  # a target, pieces, a value begun

    def per_parser(data: bytes, n: int = 400) -> float:
        sinks = [Recorder() for _ in range(n)]
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            parsers = [make("c", s) for s in sinks]
            for p in parsers:
                p.feed_data(data)
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert all(len(s.calls) == (3 if data == head else 1) for s in sinks)
        return grown / n

    whole = per_parser(head)
    halfway = per_parser(head[:cut])
    # halfway: the target's, the value's and the pieces' buffers kept (the name's is empty
    # after "Accept"), 3 x 256 B more than a parser that read its head whole
    assert halfway - whole >= 3 * 256 - 64, (whole, halfway)
    # and feeding the rest of that head, the parser gives them back and parses it as whole
    sink = Recorder()
    parser = make("c", sink)
    parser.feed_data(head[:cut])
    parser.feed_data(head[cut:])
    assert merged(sink.calls) == run("c", [head])[0]
