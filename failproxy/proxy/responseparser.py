"""A response's bytes in; its head as one call, its body pieces and its end out: two twins
behind one name, chosen at import as headers.py chooses its head writers.

The parser does what needs no exchange: it splits the head into the relayed header lines (flat
pieces, name, b": ", value, CRLF each, as the client's head is joined from) and the few headers
failproxy reads instead of relaying (framing, Connection, Upgrade, Keep-Alive,
X-Accel-Buffering), and hands them over in one `HeadSink.on_head` call. What depends on the
request (HEAD, the upgrade asked for, the status rules) stays with the connection
(upstream.py), the same code for both twins.

- `ResponseParserPy` (this module): httptools, a Python-level callback per header.
- `ResponseParser` where it was built and the build runs compiled: `_llhttp.pyx`, the
  same llhttp (vendor/llhttp, the version httptools bundles) driven from Cython through its C
  callbacks: no Python call and no bytes objects per header beyond the relayed pieces. With
  httptools each header cost ~1.5k instructions between its callback interface and the name
  lookup (bench/PROFILE.md).

Both raise httptools' exceptions as httptools does (a callback's own error rides as the
`__context__` of an HttpParserCallbackError; an upgrade is HttpParserUpgrade with the offset
of the bytes after the head), drop trailers, and give the same calls for the same bytes
however they are split (tests/test_responseparser.py).
"""

from __future__ import annotations

from typing import Any, Final, Protocol

import httptools
from mypy_extensions import mypyc_attr

from failproxy.proxy.headers import (
    H_ACCEL,
    H_CONNECTION,
    H_KEEPALIVE,
    H_LENGTH,
    H_PLAIN,
    H_TE,
    H_UPGRADE,
    response_kinds,
)


@mypyc_attr(allow_interpreted_subclasses=True)
class HeadSink:
    """What a parser reports to: upstream.UpstreamConnection's base class. A native class, not
    a Protocol, so the pure twin compiled by mypyc calls it through a vtable; not a trait, since
    the tests' recorder (interpreted) subclasses it."""

    __slots__ = ()

    def on_head(
        self,
        status: int,
        reason: bytes,
        lines: list[bytes],
        length: bytes | None,
        te: bytes,
        connection: tuple[bytes, ...],
        upgrade: bytes,
        keepalive: bytes,
        accel: bytes | None,
        keep_alive: bool,
    ) -> None:
        """A head, interim (1xx) or final. `lines`: the relayed header pieces (Content-Length's
        too); `length`: the last Content-Length value, None without one; `te`: every
        Transfer-Encoding value joined by ", "; `connection`: each Connection value; `upgrade`:
        the last Upgrade value; `keepalive`: every Keep-Alive value joined by ","; `accel`: the
        last X-Accel-Buffering value; `keep_alive`: llhttp's answer for this message."""
        raise NotImplementedError

    def on_body(self, body: bytes) -> None:
        raise NotImplementedError

    def on_message_complete(self) -> None:
        raise NotImplementedError


class Parser(Protocol):
    """Either twin, as the connection holds it (a Protocol: the compiled twin is no mypyc
    class)."""

    def feed_data(self, data: bytes) -> None: ...

    def close(self) -> None: ...

    def reopen(self, sink: HeadSink) -> None: ...


# Response headers that need more than being copied through; other hop-by-hop ones dropped.
_KINDS: Final = response_kinds()


class _Ended:
    """What a closed parser's httptools parser calls back: nothing."""


_ENDED: Final = httptools.HttpResponseParser(_Ended())


class ResponseParserPy:
    """The pure twin: httptools' HttpResponseParser, its header callbacks gathered here."""

    __slots__ = (
        "_accel",
        "_connection",
        "_in_trailers",
        "_keepalive",
        "_length",
        "_lines",
        "_parser",
        "_reason",
        "_sink",
        "_te",
        "_upgrade",
    )

    def __init__(self, sink: HeadSink) -> None:
        self._setup(sink)

    def reopen(self, sink: HeadSink) -> None:
        """A closed parser made new for another connection, as the compiled twin's."""
        if self._sink is not None:
            raise RuntimeError("reopen of a parser that is not closed")
        self._setup(sink)

    def _setup(self, sink: HeadSink) -> None:
        self._sink: HeadSink | None = sink
        self._parser = httptools.HttpResponseParser(self)
        self._in_trailers = False
        self._reason = b""
        self._lines: list[bytes] = []
        self._length: bytes | None = None
        self._te = b""
        self._connection: tuple[bytes, ...] = ()
        self._upgrade = b""
        self._keepalive = b""
        self._accel: bytes | None = None

    def feed_data(self, data: bytes) -> None:
        if self._sink is not None:  # a closed parser takes nothing
            self._parser.feed_data(data)

    def close(self) -> None:
        """Done with: what it is fed after this is dropped. The cycle with httptools' parser
        (it holds this object's bound methods) and the one with the sink are broken here, not
        left to the collector."""
        self._parser = _ENDED
        self._sink = None

    # -- httptools callbacks -------------------------------------------------------------------

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_trailers:
            return  # trailers are not relayed
        kind = _KINDS.kind(name)
        if kind in (H_PLAIN, H_LENGTH):
            lines = self._lines
            lines.append(name)
            lines.append(b": ")
            lines.append(value)
            lines.append(b"\r\n")
            if kind == H_LENGTH:
                self._length = value
        elif kind == H_CONNECTION:
            self._connection += (value,)
        elif kind == H_TE:
            self._te = self._te + b", " + value if self._te else value
        elif kind == H_KEEPALIVE:
            self._keepalive = self._keepalive + b"," + value if self._keepalive else value
        elif kind == H_UPGRADE:
            self._upgrade = value
        elif kind == H_ACCEL:
            self._accel = value
        # other hop-by-hop headers are dropped

    def on_headers_complete(self) -> None:
        parser = self._parser
        status: int = parser.get_status_code()
        keep_alive: bool = parser.should_keep_alive()
        reason = self._reason
        lines = self._lines
        length = self._length
        te = self._te
        connection = self._connection
        upgrade = self._upgrade
        keepalive = self._keepalive
        accel = self._accel
        self._reason = b""
        self._lines = []
        self._length = None
        self._te = b""
        self._connection = ()
        self._upgrade = b""
        self._keepalive = b""
        self._accel = None
        self._in_trailers = True
        sink = self._sink
        if sink is not None:
            sink.on_head(status, reason, lines, length, te, connection, upgrade, keepalive,
                         accel, keep_alive)

    def on_body(self, body: bytes) -> None:
        sink = self._sink
        if sink is not None:
            sink.on_body(body)

    def on_message_complete(self) -> None:
        self._in_trailers = False
        sink = self._sink
        if sink is not None:
            sink.on_message_complete()


def _select() -> tuple[Any, str]:
    try:
        from failproxy.proxy._llhttp import (  # type: ignore[import-not-found]
            ResponseParser as compiled,
        )
    except ImportError:
        return ResponseParserPy, "pure"
    return compiled, "cython"


# The class a connection makes its parser from, and which twin it is.
ResponseParser, BUILT = _select()
