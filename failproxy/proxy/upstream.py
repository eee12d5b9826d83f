"""One connection to an upstream server, and its strict response parsing.

A connection carries one exchange at a time, then idles in its peer's pool. Its parser
(responseparser.py: llhttp from Cython where built, httptools otherwise) hands it each head in
one call, the relayed header lines already gathered as the flat list of pieces the client's head
is joined from (name, ": ", value, CRLF); what depends on the request (HEAD, the upgrade asked
for) and the status and framing rules are decided here, the same code for both parsers. What it
finds goes to its exchange, declared here as `ResponseSink`: this module sits under the exchange
and never imports it. (Reading the raw head instead, with no per-header callbacks, measured ~11k
instructions per request dearer: CPython's bytes search and regex cost more per byte than
llhttp's callbacks.)

The parser is not told that a response answers HEAD (httptools cannot be), and llhttp has no
end-of-stream call for close-delimited bodies; both are handled here.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Final

import httptools
from mypy_extensions import trait

from failproxy.proxy.headers import (
    STATUS_LINES,
    connection_tokens,
    upgrade_matches,
    valid_status,
    without_names,
)
from failproxy.proxy.rawtransport import Receiver, SocketTransport, Transport
from failproxy.proxy.responseparser import HeadSink, Parser, ResponseParser
from failproxy.proxy.timer import take_timer
from failproxy.routing.peer import Peer, Pooled

# Called on the hot path, so held as module constants: in the compiled build a Final is a C
# static, where a from-import or a module attribute is a dict lookup per call (~150-300
# instructions each, bench.profiles.realsock).
_ResponseParser: Final = ResponseParser
# ... and its methods, taken from the class once: every connection's parser is one of it, and
# a method called with its parser is not looked up by name on each call (~0.1k instructions).
_feed: Final = ResponseParser.feed_data
_close_parser: Final = ResponseParser.close
_reopen: Final = ResponseParser.reopen
# Connection tokens that name no header to drop.
_PLAIN_TOKENS: Final = frozenset({b"keep-alive", b"close", b"upgrade"})
# Connection tokens that would drop the framing itself: ambiguous framing, 502.
_FRAMING_TOKENS: Final = frozenset({b"content-length", b"transfer-encoding"})
# The one-token Connection values answers carry, spelled as they usually are: a set probe
# decides most answers without bytes.lower(), a method mypyc calls by name (~0.4k instructions).
_PLAIN_SPELLINGS: Final = _PLAIN_TOKENS | {b"Keep-Alive", b"Close", b"Upgrade"}


def _listed_names(value: bytes) -> bool:
    """Does one Connection value name more than keep-alive, close or upgrade?"""
    if value == b"close" or value == b"keep-alive":
        return False  # the usual answers, compared: a set probe hashes the new bytes (~0.2k)
    return value not in _PLAIN_SPELLINGS and value.lower() not in _PLAIN_TOKENS

# Response framing, as seen from the upstream.
LENGTH: Final = 1
CHUNKED: Final = 2
CLOSE: Final = 3
NOBODY: Final = 4


# An ended connection, its transport and its parser, as _reuse.take_ended looks at them.
Ended = tuple["UpstreamConnection", SocketTransport, Parser]


def _reuse() -> Callable[[list[Ended]], UpstreamConnection | None] | None:
    """`_reuse.take_ended` where it was built and the build runs compiled, else None (no
    reuse: a reference count is exact in C only)."""
    try:
        from failproxy.proxy._reuse import take_ended  # type: ignore[import-not-found]
    except ImportError:
        return None
    return take_ended  # type: ignore[no-any-return]


_take_ended: Final = _reuse()
# Ended connections kept for the next new one (open_connection): a few, as a connection is
# taken only once nothing else holds it, and every one looked at leaves the list.
ENDED_MAX: Final = 16
_ENDED: Final[list[Ended]] = []


def open_connection(peer: Peer, loop: asyncio.AbstractEventLoop, fd: int) -> UpstreamConnection:
    """A connection on `fd` (connected): an ended one that nothing else holds, made new with
    its transport and parser (~3k instructions less than new objects, bench.profiles.lockstep:
    behind unicorn a connection a request), else a new one. Raises OSError as SocketTransport
    does; the caller still owns `fd` then."""
    if _take_ended is not None and _ENDED:
        conn = _take_ended(_ENDED)
        if conn is not None:
            transport = conn.transport
            assert isinstance(transport, SocketTransport)
            conn._setup(peer, loop)
            _reopen(conn._parser, conn)
            transport.reopen(loop, fd, conn)
            conn.transport = transport
            return conn
    conn = UpstreamConnection(peer, loop)
    conn.transport = SocketTransport(loop, fd, conn)
    return conn


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


class UpstreamConnection(HeadSink, Pooled, Receiver):
    """The protocol of one upstream connection: a rawtransport.StreamProtocol, its transport a
    rawtransport.SocketTransport."""

    __slots__ = (
        "_body_seen",
        "_head_only",
        "_interim",
        "_parser",
        "_status",
        "closed",
        "exchange",
        "framing",
        "generation",
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
        self._parser: Parser = _ResponseParser(self)
        self.generation = 0  # the connections this object has been (open_connection reuses)
        self.timer = take_timer(loop, self)  # calls the connection (__call__)
        self._setup(peer, loop)

    def _setup(self, peer: Peer, loop: asyncio.AbstractEventLoop) -> None:
        """A new connection's state, for a new object and for a reused one alike (whose timer
        waits in `hold`, or is a stand-in given back)."""
        self.generation += 1
        if self.generation > 1:
            timer = self.timer
            if timer.held_by(loop):
                timer.resume(self)
            else:
                self.timer = take_timer(loop, self)
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
        self._status = 0
        self._interim = False
        self._head_only = False
        self._body_seen = False
        self.framing = 0
        self.keep_alive = True
        self.got_bytes = False

    def _reset_response(self) -> None:
        self._status = 0
        self._interim = False
        self._head_only = False
        self._body_seen = False
        self.framing = 0
        self.keep_alive = True
        self.got_bytes = False
        self.no_buffering = False

    # -- asyncio protocol ---------------------------------------------------------------------

    def connection_lost(self, exc: Exception | None) -> None:
        self._let_go()
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

    def _let_go(self) -> None:
        """What every end does, told by the transport or done here (`close`)."""
        self.closed = True
        # The parser holds this connection: a cycle only the garbage collector would free (a
        # collection every ~60 new connections, 12 objects each). Broken here, the connection is
        # freed by its reference count once the exchange lets it go. Safe from inside the
        # parser's own callback (it checks `close` before each call).
        _close_parser(self._parser)
        transport = self.transport
        if (_take_ended is not None and len(_ENDED) < ENDED_MAX
                and isinstance(transport, SocketTransport)):
            # Kept for open_connection, its timer with it (unarmed, calling nothing: the timer
            # holds no reference to it), not given back and taken again (~0.6k instructions).
            self.timer.hold()
            _ENDED.append((self, transport, self._parser))
        else:
            self.timer = self.timer.give_back()

    def read_failed(self, err: int) -> None:
        """A read of its socket failed with `err` before it was this connection's (the C core
        read it: Exchange.adopt): the end that read would have given it."""
        transport = self.transport
        if isinstance(transport, SocketTransport):
            transport.fail(OSError(err, os.strerror(err)))

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
                _feed(self._parser, data)
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
                self._parser.close()
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

    # -- the parser's calls (responseparser.HeadSink) ----------------------------------------

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
        self._status = status
        exchange = self.exchange
        if exchange is None:
            return
        if status not in STATUS_LINES and not valid_status(status, reason):
            raise httptools.HttpParserError(f"invalid status line (status {status})")
        if 100 <= status < 200 and status != 101:
            self._interim = True
            exchange.on_interim(self, status, reason, lines)
            return
        self.keep_alive = keep_alive
        if keepalive:
            self._keepalive_hint(keepalive)
        if accel is not None:
            # nginx's X-Accel-Buffering: "no" streams this answer unbuffered; never relayed
            self.no_buffering = accel.strip().lower() == b"no"
        if connection and (len(connection) > 1 or _listed_names(connection[0])):
            drop = connection_tokens(connection) - _PLAIN_TOKENS
            if drop & _FRAMING_TOKENS:
                raise httptools.HttpParserError("Connection lists a framing header")
            if drop:
                lines = without_names(lines, drop)
        if status == 101:
            if not upgrade_matches(upgrade, exchange.upgrade_asked()):
                raise httptools.HttpParserError("101 to a request that did not ask for it")
            self.framing = NOBODY
            lines += (b"Upgrade", b": ", upgrade, b"\r\n")
        elif exchange.head_request or status == 204 or status == 304:
            self.framing = NOBODY
            self._head_only = exchange.head_request
        elif te:
            # Only `chunked`, once: chunked twice is invalid (RFC 9112 6.1) and any other coding
            # would be lost when failproxy re-frames the body for the client.
            if te.strip().lower() != b"chunked":
                raise httptools.HttpParserError("response Transfer-Encoding other than chunked")
            self.framing = CHUNKED
        elif length is not None:
            self.framing = LENGTH
        else:
            self.framing = CLOSE
            self.keep_alive = False
        exchange.on_response_head(self, status, reason, lines)

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

    def __call__(self) -> None:
        """The timer's callback is the connection itself: a bound method would be made for
        each connection (~450 instructions, bench.profiles.lockstep)."""
        self._on_timer()

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

    def keepalive_hint_from(self, value: bytes) -> None:
        """`Keep-Alive: timeout=N` of an answer read by the C core (corebooks.CoreBooks.pool)."""
        self._keepalive_hint(value)

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
        if transport is None:
            return
        if (self.exchange is None and self.tunnel is None
                and isinstance(transport, SocketTransport) and transport.end_now()):
            # Nobody waits to hear of this end (unicorn's way: every answer ends its
            # connection), so it is done now, not in a callback of the next loop iteration.
            self._let_go()
            self.peer.forget_idle(self)
            return
        transport.close()

    def abort(self) -> None:
        self.closed = True
        transport = self.transport
        if transport is not None:
            transport.abort()

    def write(self, data: bytes) -> None:
        transport = self.transport
        if isinstance(transport, SocketTransport):
            # narrowed, the compiled build calls it directly; through the Protocol it is a
            # method call by name (~350 instructions, bench.profiles.lockstep)
            transport.write(data)
        elif transport is not None:
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
