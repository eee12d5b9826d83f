"""A request's bytes in; its head as one call, its body pieces and its end out: two twins
behind one name, chosen at import as responseparser.py chooses its own.

The parser does what needs no connection: it splits the head into the forwarded header lines
(flat pieces, name, b": ", value, CRLF each, as the upstream head is joined from) and the
headers failproxy reads instead of forwarding (Host is both), refuses at once what a header
alone makes bad (an invalid Host, an Expect other than 100-continue, a request-target past
`max_url` bytes), and hands the rest over in one `RequestSink.on_head` call. What depends on
the whole head or on the configuration beyond header names (the version and framing rules,
the target's form, the upstream head) stays with the client connection (downstream.py), the
same code for both twins.

- `RequestParserPy` (this module): httptools, a Python-level callback per header.
- `RequestParser` where it was built and the build runs compiled: `_llhttp.pyx`, the same
  llhttp (vendor/llhttp, the version httptools bundles) driven from Cython through its C
  callbacks: no Python call and no bytes objects per header beyond the forwarded pieces.

Both take a name table made by `Names` (the twin's own: headers.NameTable, or a C table) from
headers.request_kind_names(); both raise httptools' exceptions as httptools does (a callback's
own error, a BadRequest included, rides as the `__context__` of an HttpParserCallbackError; an
upgrade is HttpParserUpgrade with the offset of the bytes after the request, whose body llhttp
skips); both drop trailers and give the same calls for the same bytes however they are split
(tests/test_requestparser.py).
"""

from __future__ import annotations

from typing import Any, Final

import httptools
from mypy_extensions import mypyc_attr

from failproxy.proxy.headers import (
    H_CONNECTION,
    H_EXPECT,
    H_HOST,
    H_LENGTH,
    H_PLAIN,
    H_PROXY_CONNECTION,
    H_REQUEST_ID,
    H_TE,
    H_UPGRADE,
    H_VIA,
    H_XFF,
    KNOWN_HOSTS,
    BadRequest,
    NameTable,
    valid_host,
)


@mypyc_attr(allow_interpreted_subclasses=True)
class RequestSink:
    """What a request parser reports to: downstream.ClientConnection's base class (a native
    class, as responseparser.HeadSink, so the compiled pure twin calls it through a vtable)."""

    __slots__ = ()

    def on_message_begin(self) -> None:
        """A request's first byte was read (its header timer starts here)."""
        raise NotImplementedError

    def on_head(
        self,
        method: bytes,
        url: bytes,
        version: str,
        upgrading: bool,
        lines: list[bytes],
        host: bytes,
        host_count: int,
        head_size: int,
        length: bytes | None,
        te: bytes,
        connection: tuple[bytes, ...],
        upgrade: bytes,
        request_id: str,
        xff: bytes,
        via: bytes,
        expect_continue: bool,
    ) -> None:
        """A request head. `version`: "1.1", "1.0", ... as llhttp read it; `upgrading`: llhttp
        takes it for an upgrade (or CONNECT): it stops after this request and skips its body;
        `lines`: the forwarded header pieces (Host's among them, the last Host value in `host`,
        `host_count` of them); `head_size`: the header bytes as counted for the 431 limit
        (name, value and 4 a header); `length`: the last Content-Length value, None without
        one; `te`, `upgrade`, `xff`, `via`: every value of that header joined by ", ";
        `connection`: each Connection value; `request_id`: the configured request-id header's
        last value ("" without one); `expect_continue`: `Expect: 100-continue` came."""
        raise NotImplementedError

    def on_body(self, body: bytes) -> None:
        raise NotImplementedError

    def on_message_complete(self) -> None:
        raise NotImplementedError


def version_of(parser: httptools.HttpRequestParser, flagged: bool) -> str:
    """The version of the request whose head `parser` has just parsed (call it from
    on_headers_complete); `flagged`: the head had a Connection or Proxy-Connection header.

    Without get_http_version()'s string formatting where llhttp's keep-alive answer already
    says it (~2.2k instructions a request, bench/PROFILE.md): llhttp parses only 0.9, 1.0, 1.1
    and 2.0 (any other version fails in the parser), and its should_keep_alive() for a request
    is "no close flag" for 1.1 and "a keep-alive flag" for the other three. Only a Connection or
    Proxy-Connection value sets those flags, so with neither, keep-alive means 1.1. The rest
    (any such header, or no keep-alive) asks for the version. tests/test_version.py holds both
    answers side by side for every version llhttp accepts."""
    if not flagged and parser.should_keep_alive():
        return "1.1"
    return parser.get_http_version()


class _Ended:
    """What a closed parser's httptools parser calls back: nothing."""


_ENDED: Final = httptools.HttpRequestParser(_Ended())


class RequestParserPy:
    """The pure twin: httptools' HttpRequestParser, its callbacks gathered here."""

    __slots__ = (
        "_connection",
        "_expect",
        "_flagged",
        "_head_size",
        "_host",
        "_host_count",
        "_in_trailers",
        "_length",
        "_lines",
        "_max_url",
        "_names",
        "_parser",
        "_request_id",
        "_sink",
        "_te",
        "_upgrade",
        "_url",
        "_via",
        "_xff",
    )

    def __init__(self, sink: RequestSink, names: NameTable, max_url: int) -> None:
        self._sink: RequestSink | None = sink
        self._names = names
        self._max_url = max_url
        self._parser = httptools.HttpRequestParser(self)
        self._in_trailers = False
        self._reset()

    def _reset(self) -> None:
        self._url = b""
        self._lines: list[bytes] = []
        self._host = b""
        self._host_count = 0
        self._head_size = 0
        self._length: bytes | None = None
        self._te = b""
        self._connection: tuple[bytes, ...] = ()
        self._upgrade = b""
        self._request_id = ""
        self._xff = b""
        self._via = b""
        self._expect = False
        self._flagged = False

    def feed_data(self, data: bytes) -> None:
        if self._sink is not None:  # a closed parser takes nothing
            self._parser.feed_data(data)

    def close(self) -> None:
        """Done with: what it is fed after this is dropped; the reference cycles (httptools'
        parser holds this object's bound methods, the sink holds this parser) are broken."""
        self._parser = _ENDED
        self._sink = None

    # -- httptools callbacks -------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_trailers = False
        sink = self._sink
        if sink is not None:
            sink.on_message_begin()

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._max_url:
            raise BadRequest(414, "request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_trailers:
            return  # a chunked body's trailer fields: never forwarded (llhttp refuses framing ones)
        self._head_size += len(name) + len(value) + 4
        kind = self._names.kind(name)
        if kind == H_PLAIN:
            lines = self._lines
            lines.append(name)
            lines.append(b": ")
            lines.append(value)
            lines.append(b"\r\n")
        elif kind == H_HOST:
            self._host_count += 1
            self._host = value
            self._lines += (name, b": ", value, b"\r\n")
            if value not in KNOWN_HOSTS and not valid_host(value):
                raise BadRequest(400, "invalid Host")
        elif kind == H_LENGTH:
            self._length = value
        elif kind == H_CONNECTION:
            self._connection += (value,)
            self._flagged = True
        elif kind == H_TE:
            self._te = self._te + b", " + value if self._te else value
        elif kind == H_UPGRADE:
            self._upgrade = self._upgrade + b", " + value if self._upgrade else value
        elif kind == H_REQUEST_ID:
            self._request_id = value.decode("latin-1")
        elif kind == H_XFF:
            self._xff = self._xff + b", " + value if self._xff else value
        elif kind == H_VIA:
            self._via = self._via + b", " + value if self._via else value
        elif kind == H_EXPECT:
            if value.lower() != b"100-continue":
                raise BadRequest(417, "unsupported expectation")
            self._expect = True
        elif kind == H_PROXY_CONNECTION:
            self._flagged = True
        # H_DROP (hop-by-hop, or set by failproxy itself), H_UNDERSCORE: not forwarded

    def on_headers_complete(self) -> None:
        parser = self._parser
        version = version_of(parser, self._flagged)
        method: bytes = parser.get_method()
        upgrading: bool = parser.should_upgrade()
        url = self._url
        lines = self._lines
        host = self._host
        host_count = self._host_count
        head_size = self._head_size
        length = self._length
        te = self._te
        connection = self._connection
        upgrade = self._upgrade
        request_id = self._request_id
        xff = self._xff
        via = self._via
        expect = self._expect
        self._reset()
        self._in_trailers = True
        sink = self._sink
        if sink is not None:
            sink.on_head(method, url, version, upgrading, lines, host, host_count, head_size,
                         length, te, connection, upgrade, request_id, xff, via, expect)

    def on_body(self, body: bytes) -> None:
        sink = self._sink
        if sink is not None:
            sink.on_body(body)

    def on_message_complete(self) -> None:
        self._in_trailers = False
        sink = self._sink
        if sink is not None:
            sink.on_message_complete()


def _select() -> tuple[Any, Any, str]:
    try:
        from failproxy.proxy._llhttp import (  # type: ignore[import-not-found]
            Names as compiled_names,
        )
        from failproxy.proxy._llhttp import (
            RequestParser as compiled,
        )
    except ImportError:
        return RequestParserPy, NameTable, "pure"
    return compiled, compiled_names, "cython"


# The class a connection makes its parser from, the class of the name table it is given
# (`Names(headers.request_kind_names(...), underscore=True)`), and which twin it is.
RequestParser, Names, BUILT = _select()
