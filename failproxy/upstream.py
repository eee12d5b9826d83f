"""Upstream side: the connect that sees EAGAIN, and the Protocol that parses responses strictly.

Connect: a raw non-blocking `socket.connect()`. asyncio's `sock_connect()` reports a full AF_UNIX
backlog as *success* (the error only shows at the first write, CPython gh-117208), so it would
hide exactly the failure failproxy exists to act on.

Response parsing: httptools (llhttp) cannot be told that a response answers HEAD and has no
end-of-stream call for close-delimited bodies; both are handled here.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

import httptools

from failproxy.headers import (
    HOP_BY_HOP,
    STATUS_LINES,
    connection_tokens,
    upgrade_matches,
    valid_status,
)
from failproxy.timer import Timer

if TYPE_CHECKING:
    from failproxy.exchange import Exchange
    from failproxy.state import Server

# Response headers that need more than being copied through (the rest of HOP_BY_HOP is dropped).
_CONNECTION, _LENGTH, _TE, _KEEPALIVE, _UPGRADE, _DROP = 1, 2, 3, 4, 5, 6
_SPECIAL = dict.fromkeys(HOP_BY_HOP, _DROP) | {
    b"connection": _CONNECTION,
    b"content-length": _LENGTH,
    b"transfer-encoding": _TE,
    b"keep-alive": _KEEPALIVE,
    b"upgrade": _UPGRADE,
}
# Connection tokens that name no header to drop.
_PLAIN_TOKENS = frozenset({b"keep-alive", b"close", b"upgrade"})
# Connection tokens that would drop the framing itself: ambiguous framing, 502.
_FRAMING_TOKENS = frozenset({b"content-length", b"transfer-encoding"})

# Response framing, as seen from the upstream.
LENGTH, CHUNKED, CLOSE, NOBODY = 1, 2, 3, 4


def start_connect(server: Server) -> tuple[socket.socket | None, int]:
    """Begin a connect without blocking.

    Returns (sock, 0) when connected (UNIX connects complete at once), (sock, EINPROGRESS) for a
    TCP connect under way, (None, errno) when it failed: EAGAIN is a full UNIX backlog.
    """
    sock = server.spare
    if sock is not None:
        server.spare = None
    else:
        # Non-blocking from birth: no extra ioctl() per connection.
        sock = socket.socket(server.family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    try:
        sock.connect(server.sockaddr)
    except BlockingIOError as exc:
        if exc.errno == errno.EINPROGRESS and not server.is_unix:
            return sock, errno.EINPROGRESS
        _discard(server, sock)
        return None, exc.errno or errno.EAGAIN
    except OSError as exc:
        _discard(server, sock)
        return None, exc.errno or errno.EIO
    return sock, 0


def _discard(server: Server, sock: socket.socket) -> None:
    """A UNIX socket whose connect failed is still unconnected: keep it for the next attempt.
    On an overloaded box that saves a socket() and a close() per request (~6 us here)."""
    if server.is_unix and server.spare is None:
        server.spare = sock
    else:
        sock.close()


def when_connected(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    timeout: float,
    callback: Callable[[int], None],
) -> None:
    """Call `callback(errno)` once a TCP connect in progress ends: 0 on success, ETIMEDOUT
    after `timeout` (a dead peer, or a full listen backlog, drops the SYN and never answers)."""
    fd = sock.fileno()
    timer: asyncio.TimerHandle | None = None

    def finish(err: int) -> None:
        loop.remove_writer(fd)
        if timer is not None:
            timer.cancel()
        callback(err)

    def writable() -> None:
        finish(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))

    loop.add_writer(fd, writable)
    if timeout > 0:
        timer = loop.call_later(timeout, finish, errno.ETIMEDOUT)


class UpstreamConnection(asyncio.Protocol):
    """One connection to an upstream server; carries one exchange at a time, then idles in the
    server's pool."""

    __slots__ = (
        "_body_seen",
        "_conn_tokens",
        "_head_only",
        "_headers",
        "_interim",
        "_length",
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
        "keepalive_until",
        "loop",
        "paused",
        "requests",
        "reused",
        "server",
        "timer",
        "transport",
        "tunnel",
    )

    def __init__(self, server: Server, loop: asyncio.AbstractEventLoop) -> None:
        self.server = server
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.exchange: Exchange | None = None
        self.closed = False
        self.requests = 0
        self.idle_since = 0.0
        self.keepalive_until = 0.0
        self.tunnel: asyncio.Transport | None = None
        self.reused = False
        self.paused = False
        self.timer = Timer(loop, self._on_timer)
        self._parser = httptools.HttpResponseParser(self)
        self._reset_response()

    def _reset_response(self) -> None:
        self._status = 0
        self._reason = b""
        self._headers: list[tuple[bytes, bytes]] = []
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

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.timer.close()
        if self.tunnel is not None:
            self.tunnel.close()
            return
        exchange = self.exchange
        if exchange is not None:
            self.exchange = None
            if self.framing == CLOSE and self._status and exc is None:
                exchange.on_response_complete(self, reusable=False)
            else:
                exchange.on_upstream_lost(self, exc)
        else:
            self.server.forget_idle(self)

    def eof_received(self) -> bool | None:
        # Returning falsy closes the transport, which ends in connection_lost above.
        return None

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.write(data)
            return
        if self.exchange is None:
            # Bytes on an idle connection: the upstream broke the protocol; never reuse it.
            self.close()
            return
        self.got_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            exchange = self.exchange
            if exchange is not None:
                offset = upgrade.args[0]
                exchange.on_upstream_upgrade(self, data[offset:])
            return
        except httptools.HttpParserError as exc:
            exchange = self.exchange
            self.exchange = None
            self.close()
            if exchange is not None:
                cause = exc.__context__ or exc  # a callback's own error rides as the context
                exchange.on_upstream_invalid(self, str(cause) or type(cause).__name__)
            return
        if self._head_only and self.exchange is not None:
            # A HEAD response ends with its head: llhttp would wait for the announced body.
            self._parser = httptools.HttpResponseParser(self)
            self._finish(reusable=self.keep_alive and not self._body_seen)
            return
        exchange = self.exchange
        if exchange is not None:
            exchange.flush_out()

    def pause_writing(self) -> None:
        if self.tunnel is not None:
            self.tunnel.pause_reading()  # the client sends faster than the upstream takes
        elif self.exchange is not None:
            self.exchange.upstream_paused(True)

    def resume_writing(self) -> None:
        if self.tunnel is not None:
            self.tunnel.resume_reading()
        elif self.exchange is not None:
            self.exchange.upstream_paused(False)

    # -- httptools callbacks -------------------------------------------------------------------

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        kind = _SPECIAL.get(name.lower())
        if kind is None:
            self._headers.append((name, value))
        elif kind == _CONNECTION:
            self._conn_tokens.append(value)
        elif kind == _LENGTH:
            self._length = value
            self._headers.append((name, value))
        elif kind == _TE:
            self._te = self._te + b", " + value if self._te else value
        elif kind == _KEEPALIVE:
            self._keepalive_hint(value)
        elif kind == _UPGRADE:
            self._upgrade = value
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
            exchange.on_interim(self, status, self._reason, self._headers)
            self._reason = b""
            self._headers = []
            return
        self.keep_alive = parser.should_keep_alive()
        headers = self._headers
        tokens = self._conn_tokens
        if tokens and (len(tokens) > 1 or tokens[0].lower() not in _PLAIN_TOKENS):
            drop = connection_tokens(tokens) - _PLAIN_TOKENS
            if drop & _FRAMING_TOKENS:
                raise httptools.HttpParserError("Connection lists a framing header")
            if drop:
                headers = [(n, v) for n, v in headers if n.lower() not in drop]
        if status == 101:
            if not upgrade_matches(self._upgrade, exchange.req.upgrade):
                raise httptools.HttpParserError("101 to a request that did not ask for it")
            self.framing = NOBODY
            headers.append((b"Upgrade", self._upgrade))
        elif exchange.head_request or status in (204, 304):
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
        exchange.on_response_head(self, status, self._reason, headers, self._length)

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
        self._finish(reusable=self.keep_alive)

    def _on_timer(self) -> None:
        """read/send timeout while carrying a request; keep-alive expiry while idle."""
        exchange = self.exchange
        if exchange is not None:
            self.exchange = None
            exchange.on_upstream_timeout(self)
        else:
            self.server.forget_idle(self)
            self.close()

    # -- helpers ------------------------------------------------------------------------------

    def _finish(self, reusable: bool) -> None:
        exchange = self.exchange
        self.exchange = None
        self.requests += 1
        self._reset_response()
        if exchange is not None:
            exchange.on_response_complete(self, reusable=reusable)

    def _keepalive_hint(self, value: bytes) -> None:
        """`Keep-Alive: timeout=N` tells when the upstream will close an idle connection."""
        for part in value.split(b","):
            key, _, val = part.strip().partition(b"=")
            if key.lower() == b"timeout":
                try:
                    self.keepalive_until = float(val)
                except ValueError:
                    pass

    def reusable(self, now: float, careful: bool) -> bool:
        """Fit to carry another request? `careful`: only if surely not about to be closed."""
        if self.closed or self.transport is None or self.transport.is_closing():
            return False
        idle = now - self.idle_since
        allowance = self.server.keepalive_timeout
        if self.keepalive_until:
            allowance = min(allowance, self.keepalive_until)
        if careful:
            return idle < allowance / 2
        return idle < allowance

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed and self.paused:
            self.paused = False
            self.transport.resume_reading()
