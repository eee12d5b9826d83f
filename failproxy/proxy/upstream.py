"""One connection to an upstream server, and its strict response parsing.

A connection carries one exchange at a time, then idles in its peer's pool. It parses the
response with httptools and hands what it finds to its exchange, declared here as
`ResponseSink`: this module sits under the exchange and never imports it.

The relayed header lines are gathered as they are parsed, as the flat list of pieces the
client's head is joined from (name, ": ", value, CRLF): no tuple per header, no second pass.
(Reading the raw head instead, with no per-header callbacks, measured ~11k instructions per
request dearer: CPython's bytes search and regex cost more per byte than llhttp's callbacks.)

httptools (llhttp) cannot be told that a response answers HEAD and has no end-of-stream call for
close-delimited bodies; both are handled here.
"""

from __future__ import annotations

import asyncio
from typing import Final

import httptools
from mypy_extensions import trait

from failproxy.proxy.headers import (
    H_ACCEL,
    H_CONNECTION,
    H_KEEPALIVE,
    H_LENGTH,
    H_PLAIN,
    H_TE,
    H_UPGRADE,
    STATUS_LINES,
    connection_tokens,
    response_kinds,
    upgrade_matches,
    valid_status,
    without_names,
)
from failproxy.proxy.rawtransport import Transport
from failproxy.proxy.timer import take_timer
from failproxy.routing.peer import Peer, Pooled

# Called on the hot path, so held as module constants: in the compiled build a Final is a C
# static, where a from-import or a module attribute is a dict lookup per call (~150-300
# instructions each, bench.profiles.realsock).
_ResponseParser: Final = httptools.HttpResponseParser

# Response headers that need more than being copied through (other hop-by-hop ones are
# dropped), by name as sent: one table for the whole process (headers.NameTable).
_KINDS: Final = response_kinds()
# Connection tokens that name no header to drop.
_PLAIN_TOKENS: Final = frozenset({b"keep-alive", b"close", b"upgrade"})
# Connection tokens that would drop the framing itself: ambiguous framing, 502.
_FRAMING_TOKENS: Final = frozenset({b"content-length", b"transfer-encoding"})

# Response framing, as seen from the upstream.
LENGTH: Final = 1
CHUNKED: Final = 2
CLOSE: Final = 3
NOBODY: Final = 4


@trait
class ResponseSink:
    """What a connection reports to the exchange it carries (exchange.Exchange implements it).

    An abstract interface, as a mypyc trait rather than a typing.Protocol: compiled code calls a
    trait's methods through a vtable, where a Protocol-typed call is a generic Python method
    call (~700 instructions each, measured; several per request)."""

    __slots__ = ()

    head_request: bool  # the request is HEAD: its response has no body whatever it announces

    def upgrade_asked(self) -> bytes:
        """The protocols the request asked to upgrade to (b"" for none): all a 101 may name."""
        raise NotImplementedError

    def on_interim(
        self, conn: UpstreamConnection, status: int, reason: bytes, lines: list[bytes]
    ) -> None:
        raise NotImplementedError

    def on_response_head(
        self, conn: UpstreamConnection, status: int, reason: bytes, lines: list[bytes]
    ) -> None:
        """`lines`: the relayed header lines as pieces, name, b": ", value, b"\\r\\n" each."""
        raise NotImplementedError

    def on_response_body(self, data: bytes) -> None:
        raise NotImplementedError

    def flush_out(self) -> None:
        raise NotImplementedError

    def on_response_complete(self, conn: UpstreamConnection, reusable: bool) -> None:
        raise NotImplementedError

    def on_upstream_lost(self, conn: UpstreamConnection, exc: Exception | None) -> None:
        raise NotImplementedError

    def on_upstream_timeout(self, conn: UpstreamConnection) -> None:
        raise NotImplementedError

    def on_upstream_invalid(self, conn: UpstreamConnection, detail: str) -> None:
        raise NotImplementedError

    def on_upstream_upgrade(self, conn: UpstreamConnection, rest: bytes) -> None:
        raise NotImplementedError

    def internal_error(self, exc: BaseException, where: str) -> None:
        raise NotImplementedError

    def upstream_paused(self, paused: bool) -> None:
        raise NotImplementedError


class _Ended:
    """What an ended connection's parser calls back: nothing (it is never fed again)."""


_ENDED_PARSER: Final = httptools.HttpResponseParser(_Ended())


class UpstreamConnection(Pooled):
    """The protocol of one upstream connection: a rawtransport.StreamProtocol, its transport a
    rawtransport.SocketTransport."""

    __slots__ = (
        "_body_seen",
        "_conn_tokens",
        "_head_only",
        "_interim",
        "_length",
        "_lines",
        "_parser",
        "_reason",
        "_status",
        "_te",
        "_upgrade",
        "closed",
        "exchange",
        "framing",
        "got_bytes",
        "idle_since",
        "keep_alive",
        "keepalive_hint",
        "loop",
        "no_buffering",
        "paused",
        "peer",
        "requests",
        "reused",
        "send_paused",
        "timer",
        "transport",
        "tunnel",
    )

    def __init__(self, peer: Peer, loop: asyncio.AbstractEventLoop) -> None:
        self.peer = peer
        self.loop = loop
        self.transport: Transport | None = None  # set by whoever connected it
        self.exchange: ResponseSink | None = None
        self.closed = False
        self.requests = 0
        self.idle_since = 0.0
        # The upstream's own `Keep-Alive: timeout=N` (seconds it keeps an idle connection), 0
        # when it sent none.
        self.keepalive_hint = 0.0
        self.tunnel: asyncio.Transport | None = None
        self.reused = False
        self.paused = False
        self.send_paused = False  # our write buffer to it is full (spool.Sink)
        self.no_buffering = False  # the answer said `X-Accel-Buffering: no`
        self.timer = take_timer(loop, self._on_timer)
        self._parser = _ResponseParser(self)
        self._status = 0
        self._reason = b""
        self._lines: list[bytes] = []
        self._conn_tokens: list[bytes] = []
        self._interim = False
        self._head_only = False
        self._body_seen = False
        self._te = b""
        self._length: bytes | None = None
        self._upgrade = b""
        self.framing = 0
        self.keep_alive = True
        self.got_bytes = False

    def _reset_response(self) -> None:
        self._status = 0
        self._reason = b""
        self._lines = []
        self._conn_tokens = []
        self._interim = False
        self._head_only = False
        self._body_seen = False
        self._te = b""
        self._length = None
        self._upgrade = b""
        self.framing = 0
        self.keep_alive = True
        self.got_bytes = False
        self.no_buffering = False

    # -- asyncio protocol ---------------------------------------------------------------------

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.timer = self.timer.give_back()
        # The parser holds this connection's bound methods: a cycle only the garbage collector
        # would free (a collection every ~60 new connections, 12 objects each). Broken here,
        # the connection is freed by its reference count once the exchange lets it go.
        self._parser = _ENDED_PARSER
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.close()
            return
        exchange = self.exchange
        if exchange is not None:
            self.exchange = None
            try:
                if self.framing == CLOSE and self._status and exc is None:
                    exchange.on_response_complete(self, False)
                else:
                    exchange.on_upstream_lost(self, exc)
            except Exception as bug:
                exchange.internal_error(bug, "upstream lost")
        else:
            self.peer.forget_idle(self)

    def eof_received(self) -> bool | None:
        # Returning falsy closes the transport, which ends in connection_lost above.
        return None

    def data_received(self, data: bytes) -> None:
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.write(data)
            return
        # Read self.exchange into locals only (never narrow the attribute): the parser's callbacks
        # may end the exchange during feed_data, and compiled code trusts a narrowed type.
        carrying = self.exchange
        if carrying is None:
            # Bytes on an idle connection: the upstream broke the protocol; never reuse it.
            self.close()
            return
        self.got_bytes = True
        try:
            try:
                self._parser.feed_data(data)
            except httptools.HttpParserUpgrade as upgrade:
                exchange = self.exchange
                if exchange is not None:
                    offset = upgrade.args[0]
                    exchange.on_upstream_upgrade(self, data[offset:])
                return
            except httptools.HttpParserError as exc:
                cause = exc.__context__ or exc  # a callback's own error rides as the context
                if not isinstance(cause, httptools.HttpParserError):
                    raise cause from None  # a bug, not a bad answer: the catch-all below
                exchange = self.exchange
                self.exchange = None
                self.close()
                if exchange is not None:
                    exchange.on_upstream_invalid(self, str(cause) or type(cause).__name__)
                return
            exchange = self.exchange
            if exchange is None:
                return
            if self._head_only:
                # A HEAD response ends with its head: llhttp would wait for the announced body.
                self._parser = _ResponseParser(self)
                self._finish(self.keep_alive and not self._body_seen)
                return
            exchange.flush_out()
        except Exception as exc:
            self._internal_error(carrying, exc, "upstream read")

    def _internal_error(self, carrying: ResponseSink, exc: BaseException, where: str) -> None:
        """The catch-all for this connection's handlers: a bug met while it carried `carrying`.
        The connection is cut (where its answer stands is unknown now, so it is never reused)
        and the exchange answers for the rest (Exchange.internal_error)."""
        if self.exchange is carrying:
            self.exchange = None
        self.abort()
        carrying.internal_error(exc, where)

    def pause_writing(self) -> None:
        self.send_paused = True
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.pause_reading()  # the client sends faster than the upstream takes
            return
        exchange = self.exchange
        if exchange is not None:
            exchange.upstream_paused(True)

    def resume_writing(self) -> None:
        self.send_paused = False
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.resume_reading()
            return
        exchange = self.exchange
        if exchange is not None:
            exchange.upstream_paused(False)

    # -- httptools callbacks -------------------------------------------------------------------

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
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
            self._conn_tokens.append(value)
        elif kind == H_TE:
            self._te = self._te + b", " + value if self._te else value
        elif kind == H_KEEPALIVE:
            self._keepalive_hint(value)
        elif kind == H_UPGRADE:
            self._upgrade = value
        elif kind == H_ACCEL:
            # nginx's X-Accel-Buffering: "no" streams this answer unbuffered; never relayed
            self.no_buffering = value.strip().lower() == b"no"
        # other hop-by-hop headers are dropped

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        self._status = status
        exchange = self.exchange
        if exchange is None:
            return
        if status not in STATUS_LINES and not valid_status(status, self._reason):
            raise httptools.HttpParserError(f"invalid status line (status {status})")
        if 100 <= status < 200 and status != 101:
            self._interim = True
            exchange.on_interim(self, status, self._reason, self._lines)
            self._reason = b""
            self._lines = []
            return
        self.keep_alive = parser.should_keep_alive()
        lines = self._lines
        tokens = self._conn_tokens
        if tokens and (len(tokens) > 1 or tokens[0].lower() not in _PLAIN_TOKENS):
            drop = connection_tokens(tokens) - _PLAIN_TOKENS
            if drop & _FRAMING_TOKENS:
                raise httptools.HttpParserError("Connection lists a framing header")
            if drop:
                lines = without_names(lines, drop)
        if status == 101:
            if not upgrade_matches(self._upgrade, exchange.upgrade_asked()):
                raise httptools.HttpParserError("101 to a request that did not ask for it")
            self.framing = NOBODY
            lines += (b"Upgrade", b": ", self._upgrade, b"\r\n")
        elif exchange.head_request or status == 204 or status == 304:
            self.framing = NOBODY
            self._head_only = exchange.head_request
        elif self._te:
            # Only `chunked`, once: chunked twice is invalid (RFC 9112 6.1) and any other coding
            # would be lost when failproxy re-frames the body for the client.
            if self._te.strip().lower() != b"chunked":
                raise httptools.HttpParserError("response Transfer-Encoding other than chunked")
            self.framing = CHUNKED
        elif self._length is not None:
            self.framing = LENGTH
        else:
            self.framing = CLOSE
            self.keep_alive = False
        exchange.on_response_head(self, status, self._reason, lines)

    def on_body(self, body: bytes) -> None:
        if self._interim:
            return
        if self._head_only:
            self._body_seen = True
            return
        exchange = self.exchange
        if exchange is not None:
            exchange.on_response_body(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if self._head_only:
            return  # finished in data_received, after feed_data returns
        if self._status == 101:
            return  # HttpParserUpgrade follows
        self._finish(self.keep_alive)

    def _on_timer(self) -> None:
        """read/send timeout while carrying a request; keep-alive expiry while idle."""
        exchange = self.exchange
        if exchange is not None:
            self.exchange = None
            try:
                exchange.on_upstream_timeout(self)
            except Exception as exc:
                self._internal_error(exchange, exc, "upstream timer")
        else:
            self.peer.forget_idle(self)
            self.close()

    # -- helpers ------------------------------------------------------------------------------

    def _finish(self, reusable: bool) -> None:
        exchange = self.exchange
        self.exchange = None
        self.requests += 1
        self._reset_response()
        if exchange is not None:
            exchange.on_response_complete(self, reusable)

    def _keepalive_hint(self, value: bytes) -> None:
        """`Keep-Alive: timeout=N` tells when the upstream will close an idle connection."""
        for part in value.split(b","):
            key, _, val = part.strip().partition(b"=")
            if key.lower() == b"timeout":
                try:
                    self.keepalive_hint = float(val)
                except ValueError:
                    pass

    def reusable(self, now: float, careful: bool) -> bool:
        """Fit to carry another request? `careful`: only if surely not about to be closed."""
        transport = self.transport
        if self.closed or transport is None or transport.is_closing():
            return False
        idle = now - self.idle_since
        allowance = self.peer.keepalive_timeout
        if self.keepalive_hint:
            allowance = min(allowance, self.keepalive_hint)
        if careful:
            return idle < allowance / 2
        return idle < allowance

    def close(self) -> None:
        self.closed = True
        transport = self.transport
        if transport is not None:
            transport.close()

    def abort(self) -> None:
        self.closed = True
        transport = self.transport
        if transport is not None:
            transport.abort()

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None:
            transport.write(data)

    def writelines(self, data: list[bytes]) -> None:
        transport = self.transport
        if transport is not None:
            transport.writelines(data)

    def pause_reading(self) -> None:
        transport = self.transport
        if transport is not None and not self.closed and not self.paused:
            self.paused = True
            transport.pause_reading()

    def resume_reading(self) -> None:
        transport = self.transport
        if transport is not None and not self.closed and self.paused:
            self.paused = False
            transport.resume_reading()
