"""One connection to an upstream server, and its strict response parsing.

A connection carries one exchange at a time, then idles in its peer's pool. It parses the
response with httptools and hands what it finds to its exchange, declared here as
`ResponseSink`: this module sits under the exchange and never imports it.

The parser is given no per-header callbacks: llhttp validates the head and frames the body,
and the head itself is read once, raw, when it is complete (headers.scan_response_head): the
lines to drop are cut out and the rest is relayed byte for byte, never rebuilt.

httptools (llhttp) cannot be told that a response answers HEAD and has no end-of-stream call for
close-delimited bodies; both are handled here.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import httptools

from failproxy.headers import InvalidResponse, ResponseHead, scan_response_head
from failproxy.peer import Peer
from failproxy.timer import Timer

# Response framing, as seen from the upstream.
LENGTH, CHUNKED, CLOSE, NOBODY = 1, 2, 3, 4


class ResponseSink(Protocol):
    """What a connection reports to the exchange it carries (exchange.Exchange)."""

    @property
    def head_request(self) -> bool: ...

    @property
    def upgrade_asked(self) -> bytes:
        """The protocols the request asked to upgrade to (b"" for none): all a 101 may name."""

    def on_interim(self, conn: UpstreamConnection, status: int, head: ResponseHead) -> None: ...

    def on_response_head(
        self, conn: UpstreamConnection, status: int, head: ResponseHead
    ) -> None: ...

    def on_response_body(self, data: bytes) -> None: ...

    def flush_out(self) -> None: ...

    def on_response_complete(self, conn: UpstreamConnection, reusable: bool) -> None: ...

    def on_upstream_lost(self, conn: UpstreamConnection, exc: Exception | None) -> None: ...

    def on_upstream_timeout(self, conn: UpstreamConnection) -> None: ...

    def on_upstream_invalid(self, conn: UpstreamConnection, detail: str) -> None: ...

    def on_upstream_upgrade(self, conn: UpstreamConnection, rest: bytes) -> None: ...

    def upstream_paused(self, paused: bool) -> None: ...


class UpstreamConnection:
    """An asyncio protocol (uvloop calls its methods; it needs no base class)."""

    __slots__ = (
        "_body_seen",
        "_head_buf",
        "_head_only",
        "_in_head",
        "_interim",
        "_parser",
        "_status",
        "closed",
        "exchange",
        "framing",
        "got_bytes",
        "idle_since",
        "keep_alive",
        "keepalive_hint",
        "loop",
        "paused",
        "peer",
        "requests",
        "reused",
        "timer",
        "transport",
        "tunnel",
    )

    def __init__(self, peer: Peer, loop: asyncio.AbstractEventLoop) -> None:
        self.peer = peer
        self.loop = loop
        self.transport: asyncio.Transport | None = None
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
        self.timer = Timer(loop, self._on_timer)
        self._parser = httptools.HttpResponseParser(self)
        self._status = 0
        # The bytes of the response head so far (from the start of the current message): read
        # whole in on_headers_complete.
        self._head_buf = b""
        self._in_head = True
        self._interim = False
        self._head_only = False
        self._body_seen = False
        self.framing = 0
        self.keep_alive = True
        self.got_bytes = False

    def _reset_response(self) -> None:
        self._status = 0
        self._head_buf = b""
        self._in_head = True
        self._interim = False
        self._head_only = False
        self._body_seen = False
        self.framing = 0
        self.keep_alive = True
        self.got_bytes = False

    # -- asyncio protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.timer.close()
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.close()
            return
        exchange = self.exchange
        if exchange is not None:
            self.exchange = None
            if self.framing == CLOSE and self._status and exc is None:
                exchange.on_response_complete(self, False)
            else:
                exchange.on_upstream_lost(self, exc)
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
        if self.exchange is None:
            # Bytes on an idle connection: the upstream broke the protocol; never reuse it.
            self.close()
            return
        self.got_bytes = True
        if self._in_head:
            self._head_buf += data
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            exchange = self.exchange
            if exchange is not None:
                offset = upgrade.args[0]
                exchange.on_upstream_upgrade(self, data[offset:])
            return
        except (httptools.HttpParserError, InvalidResponse) as exc:
            exchange = self.exchange
            self.exchange = None
            self.close()
            if exchange is not None:
                cause = exc.__context__ or exc  # a callback's own error rides as the context
                exchange.on_upstream_invalid(self, str(cause) or type(cause).__name__)
            return
        exchange = self.exchange
        if exchange is None:
            return
        if self._head_only:
            # A HEAD response ends with its head: llhttp would wait for the announced body.
            self._parser = httptools.HttpResponseParser(self)
            self._finish(self.keep_alive and not self._body_seen)
            return
        exchange.flush_out()

    def pause_writing(self) -> None:
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.pause_reading()  # the client sends faster than the upstream takes
            return
        exchange = self.exchange
        if exchange is not None:
            exchange.upstream_paused(True)

    def resume_writing(self) -> None:
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.resume_reading()
            return
        exchange = self.exchange
        if exchange is not None:
            exchange.upstream_paused(False)

    # -- httptools callbacks -------------------------------------------------------------------

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        self._status = status
        buf = self._head_buf
        end = buf.find(b"\r\n\r\n") + 4
        if end < 4:
            raise InvalidResponse("response head without CRLF line endings")
        exchange = self.exchange
        if exchange is None:
            return
        head = scan_response_head(buf[:end], status, exchange.upgrade_asked)
        if 100 <= status < 200 and status != 101:
            # An interim response: the real one (or another interim) starts after its head.
            self._interim = True
            self._head_buf = buf[end:]
            exchange.on_interim(self, status, head)
            return
        self._in_head = False
        self._head_buf = b""
        self.keep_alive = parser.should_keep_alive()
        if head.keepalive_hint:
            self.keepalive_hint = head.keepalive_hint
        if status == 101:
            self.framing = NOBODY
        elif exchange.head_request or status == 204 or status == 304:
            self.framing = NOBODY
            self._head_only = exchange.head_request
        elif head.chunked:
            self.framing = CHUNKED
        elif head.content_length is not None:
            self.framing = LENGTH
        else:
            self.framing = CLOSE
            self.keep_alive = False
        exchange.on_response_head(self, status, head)

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
            exchange.on_upstream_timeout(self)
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
