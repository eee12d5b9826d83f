"""The client connection: where a parsed request (requestparser.py) is checked, refused when
malformed, and handed to an exchange.

Requests are parsed strictly (SPEC 8): anything ambiguous is answered here and none of its bytes
reach an upstream. Requests are answered one at a time and in order; a pipelined request waits
in `queue` with reading paused, so a client can never make the proxy buffer more than one read.

Nothing goes upstream from inside a parser callback. The request at the front that has no
exchange yet is `pending`; it starts (and a streamed body's new bytes are sent) only once a read
has parsed cleanly, so a malformed chunk anywhere in a read keeps the whole read, head included,
from the upstream. A buffered request (SPEC 9, the default) stays pending until its whole body is
read: 413, 408 and a bad chunk are then answered without any upstream being contacted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Final, Protocol

import httptools

from failproxy.proxy import rawtransport
from failproxy.proxy.context import Connection, WorkerContext
from failproxy.proxy.corebooks import CoreBooks, InFlight
from failproxy.proxy.exchange import Downstream, Exchange
from failproxy.proxy.headers import (
    BadRequest,
    check_transfer_encoding,
    connection_tokens,
    simple_response,
    valid_host,
    without_h2c,
    without_names,
)
from failproxy.proxy.rawtransport import close_fd
from failproxy.proxy.request import Request
from failproxy.proxy.requestparser import RequestParser, RequestSink
from failproxy.proxy.spool import RequestBody
from failproxy.proxy.timer import take_timer
from failproxy.proxy.upstream import UpstreamConnection

# Called on the hot path, so held as module constants: in the compiled build a Final is a C
# static, where a from-import or a module attribute is a dict lookup per call (~150-300
# instructions each, bench.profiles.realsock).
monotonic: Final = time.monotonic
# The parser's feed_data, taken from its class once (every connection's parser is of this
# class): called with the parser, it is not looked up by name on each read (~0.1k instructions).
_feed: Final = RequestParser.feed_data

# Reasons to pause reading the client, as bits: reading resumes only when none is left.
PIPELINE: Final = 1
UPSTREAM_FULL: Final = 2
BUFFER_FULL: Final = 4
UPGRADE: Final = 8
REJECTED: Final = 16
# Unsent request-body bytes held (no upstream attached yet) before reading pauses.
BUFFER_LIMIT: Final = 65536
# The write buffer of a client that fell behind its answer (slow_client), and its low mark.
SLOW_CLIENT_HIGH: Final = 16384
# A body up to this size goes out joined to its head in one write (write_lines, flush_held).
JOIN_BELOW: Final = 4096
# What a connection holds to the end of an upstream batch before it writes (ClientConnection.write).
HOLD_BELOW: Final = 16384

# How long a connection failproxy closes keeps reading (and dropping) what its client still
# sends, after failproxy's FIN (lingering close, as nginx): see ClientConnection.close.
LINGER: Final = 2.0

# What the client timer is waiting for (DRAIN: an idle connection of a stopping worker, kept
# open a short grace in case the client is sending its next request right now).
DRAIN: Final = -1
IDLE: Final = 0
HEAD: Final = 1
BODY: Final = 2
NONE: Final = 3
WRITE: Final = 4  # the client takes none of its answer (server.send_timeout, nginx's send_timeout)

CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
# "#" as a byte value: `_HASH in url` is a memchr (~100 instructions), where url.find(b"#") is
# a method called by name (~1k) and `b"#" in url` takes the buffer path (~2k; bench/PROFILE.md).
_HASH: Final = ord("#")


class CoreSide(Connection, Protocol):
    """The C core, as the connection it handed over gives it back (proxy/_core.pyx)."""

    def take_back(self, transport: asyncio.Transport, served: int, deadline: float) -> None: ...


class ClientConnection(RequestSink, Downstream, rawtransport.BatchEnd):
    """One client connection: an asyncio protocol (uvloop calls its methods; no base class)."""

    __slots__ = (
        "_batch",
        "_held",
        "_send",
        "active",
        "began",
        "client_addr",
        "client_ip",
        "close_after",
        "closed",
        "core",
        "ctx",
        "eof",
        "error",
        "head_raw",
        "in_head",
        "inflight",
        "last_parsed",
        "loop",
        "parser",
        "paused",
        "pending",
        "queue",
        "req",
        "resume",
        "served",
        "slow",
        "streamed",
        "timer",
        "timer_kind",
        "tls",
        "transport",
        "tunnel",
        "upgrade_rest",
        "write_mark",
        "write_paused",
    )

    def __init__(self, ctx: WorkerContext, tls: bool) -> None:
        self.ctx = ctx
        self.loop = ctx.loop
        self.tls = tls
        self.transport: asyncio.Transport | None = None
        # transport.write, bound once a connection: a call by name looks the method up on each
        # answer (~0.15k instructions)
        self._send: Callable[[bytes], object] | None = None
        self.parser = RequestParser(self, ctx.request_names, ctx.max_uri_bytes)
        self.client_ip = ""
        self.client_addr = b""  # client_ip as bytes, for X-Forwarded-For
        self.req: Request | None = None
        self.active: Exchange | None = None
        # Pipelined requests waiting their turn: rare and short, so a list (56 bytes per idle
        # connection, where a deque allocates a 600-byte block up front).
        self.queue: list[Request | BadRequest] = []
        self.pending: Request | None = None  # first in line, no exchange yet (module docstring)
        self.streamed = False  # this read added streamed body bytes, sent once it parsed whole
        self.slow = False  # its answers fell behind once: smaller transport buffer (slow_client)
        self.write_mark = 0  # bytes its transport held when the send deadline was set
        self.served = 0
        self.paused = 0
        self.write_paused = False
        self.closed = False
        self.eof = False
        # The request after which the connection closes whatever it says: an upgrade request
        # that is not tunnelled (llhttp cannot parse past it).
        self.close_after: Request | None = None
        self.last_parsed: Request | None = None
        self.error: BadRequest | None = None
        self.in_head = True
        self.head_raw = 0
        self.tunnel: UpstreamConnection | None = None
        self.upgrade_rest = b""
        self.resume: Request | None = None  # an upgrade request llhttp stopped at, not tunnelled
        self.timer = take_timer(ctx.loop, self._on_timer)
        self.timer_kind = HEAD
        # The first request of what the C core hands over, when the core sent it (adopt), and
        # when its first byte came (0.0 once it is parsed, or with no core).
        self.inflight: InFlight | None = None
        self.began = 0.0
        self.core: CoreSide | None = None  # the C core that handed it over, to give it back
        # What an upstream batch wrote, sent at the batch's end (write): None when nothing is.
        self._held: bytes | None = None
        self._batch = ctx.poller

    # -- asyncio protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._send = self.transport.write  # type: ignore[union-attr]
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0] if isinstance(peer, tuple) else "unix"
        self.client_addr = self.client_ip.encode()
        self.ctx.connection_opened(self)
        self.timer.set(monotonic() + self.ctx.header_timeout)
        if self.ctx.draining:  # accepted just before the listener closed
            self.drain(self.ctx.idle_grace)

    def adopt(self, transport: asyncio.BaseTransport, data: bytes, eof: bool, began: float,
              deadline: float, write_paused: bool, served: int, inflight: InFlight | None,
              core: CoreSide | None) -> bool | None:
        """Take over a connection the C core (proxy/_core.pyx) accepted, at a request boundary:
        `data` is what the client sent since its last answer (unparsed: parsed again here),
        `began` when that request's first byte came (0.0: none yet), `deadline` the core's
        timer (the head's, counted from the connection's start, as connection_made counts it),
        `eof` whether the client has half-closed, `served` the requests the core answered on
        it. `inflight`: the core sent the first request of `data` upstream already, and its
        answer is this connection's to relay (Exchange.adopt). The core made this object the
        transport's protocol and swapped it in the worker's books
        (WorkerContext.connection_replaced); idle again after an answer, the connection goes
        back to it (`_give_back`). Returns what eof_received would: None closes."""
        self.transport = transport  # type: ignore[assignment]
        self._send = self.transport.write  # type: ignore[union-attr]
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0] if isinstance(peer, tuple) else "unix"
        self.client_addr = self.client_ip.encode()
        self.write_paused = write_paused
        self.served = served
        self.inflight = inflight
        self.core = core
        self.timer.set(deadline)
        if data:
            self.began = began  # on_message_begin's clock for the first request
            self.data_received(data)
            self.began = 0.0
        inflight = self.inflight
        if inflight is not None:
            # The core sent a request this parser did not take as one to start: a bug (the two
            # must agree on every byte they accept). What it holds is let go before the catch-all
            # ends the connection: the upstream socket, the slot and the policy's books.
            self.inflight = None
            close_fd(inflight.fd)
            CoreBooks(self.ctx).undo(inflight.key, inflight.peer, monotonic())
            raise RuntimeError("the core handed over an in-flight request the relay did not parse")
        if self.closed:
            return None
        if eof:
            return self.eof_received()
        if self.ctx.draining and not data:
            self.drain(self.ctx.idle_grace)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._send = None
        self.parser.close()
        self.timer = self.timer.give_back()  # for the next connection (timer.py says why)
        self.ctx.connection_closed(self)
        tunnel = self.tunnel
        if tunnel is not None:
            self.tunnel = None
            tunnel.close()
        active = self.active
        if active is not None:
            self.active = None
            try:
                active.client_gone()
            except Exception as bug:
                active.internal_error(bug, "client gone")
        self._release_waiting()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return  # lingering: what a client sends after failproxy closed is dropped
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.write(data)
            return
        if self.in_head:
            self.head_raw += len(data)
        try:
            try:
                _feed(self.parser, data)
            except httptools.HttpParserUpgrade as upgrade:
                self._parsed()
                self._on_parser_upgrade(data[upgrade.args[0] :])
                return
            except httptools.HttpParserError as exc:
                self._reject(self._refusal(exc))
                return
            self._parsed()
            if self.in_head and self.head_raw > self.ctx.max_header_bytes:
                self._reject(BadRequest(431, "request head too large"))
        except Exception as exc:
            self.internal_error(exc, "client read")

    def _refusal(self, exc: httptools.HttpParserError) -> BadRequest:
        """What a request the parser stopped at is answered: this connection's own refusal
        (`_fail`), the parser's (it rides as the error's context: 414, an invalid Host, an
        Expect), or llhttp's. Any other context is a bug, not bad input: raised again, for the
        catch-all."""
        error = self.error
        if error is not None:
            return error
        cause = exc.__context__
        if isinstance(cause, BadRequest):
            return cause
        if cause is not None:
            raise cause from None
        return _parse_error(exc)

    def _parsed(self) -> None:
        """A read parsed cleanly: start the pending request, send a streamed body's new bytes
        (see the module docstring)."""
        if self.pending is not None:
            self._start_pending()
        if self.streamed:
            self.streamed = False
            active = self.active
            if active is not None:
                active.req.flush_body(self.ctx.retry_body_bytes)

    def eof_received(self) -> bool | None:
        # A half-closed client may still want its answers (HTTP/1.0 clients, `nc -q`).
        if self.closed or (self.active is None and not self.queue):
            return None
        self.eof = True
        return True

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.timer_kind == NONE:
            # A client that stops taking its answer may not hold it (and a temp file) forever.
            # As nginx's send_timeout, it is the time without progress: see _on_timeout.
            self.timer_kind = WRITE
            self._arm_write_timer()
        if self.tunnel is not None:
            self.tunnel.pause_reading()
        elif self.active is not None:
            self.active.client_paused(True)

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.timer_kind == WRITE:
            self.timer_kind = NONE
            self.timer.clear()
        if self.tunnel is not None:
            self.tunnel.resume_reading()
        elif self.active is not None:
            try:
                self.active.client_paused(False)  # a spooled answer drains from here
            except Exception as exc:
                self.internal_error(exc, "client drained")

    # -- the parser's calls (requestparser.RequestSink) ------------------------------------

    def on_message_begin(self) -> None:
        now = self.began or monotonic()  # the first request the C core handed over began then
        self.began = 0.0
        self.req = Request(now)
        self.in_head = True
        self.head_raw = 0
        if self.timer_kind <= IDLE:
            self.timer_kind = HEAD
            self.timer.set(now + self.ctx.header_timeout)

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
        req = self.req
        assert req is not None
        req.method = method
        req.url = url
        req.lines = lines
        req.host = host
        req.host_count = host_count
        req.head_size = head_size
        req.content_length = length
        req.te = te
        req.conn_tokens = connection
        req.upgrade = upgrade
        req.request_id = request_id
        req.xff = xff
        req.via = via
        req.expect_continue = expect_continue
        self.in_head = False
        self.last_parsed = req
        try:
            self._finish_head(req, version, upgrading)
        except BadRequest as exc:
            self._fail(exc)
        if self.active is None and self.pending is None and not self.queue:
            self.pending = req
        else:
            self.queue.append(req)
            self._pause(PIPELINE)

    def on_body(self, body: bytes) -> None:
        req = self.req
        assert req is not None
        req.body_bytes += len(body)
        limit = self.ctx.max_body_bytes
        if limit and req.body_bytes > limit:
            self._fail(BadRequest(413, "request body too large"))
        held = req.body
        if held is not None:
            try:
                held.add(body)
            except OSError as exc:
                self.ctx.events.temp_file_error("request", exc, req)
                self._fail(BadRequest(503, "request body could not be stored"))
        else:
            if req.chunked:
                body = b"%x\r\n%b\r\n" % (len(body), body)
            req.add_body(body)
            self.streamed = True
            if req.sink is None and req.held > BUFFER_LIMIT:
                self._pause(BUFFER_FULL)
        if self.timer_kind == BODY:
            self.timer.set(monotonic() + self.ctx.body_timeout)

    def on_message_complete(self) -> None:
        req = self.req
        assert req is not None
        held = req.body
        if held is not None:
            if req.awaiting:
                req.awaiting = False
                self.ctx.metrics.body_buffering(-1)
            if req.chunked:
                # De-chunked, trailers dropped, as nginx sends a buffered body (SPEC 9).
                req.head = self._build_head(req, b"Content-Length: %d\r\n" % held.size, b"")
        elif req.chunked:
            req.add_body(b"0\r\n\r\n")
            self.streamed = True
        req.complete = True
        self.req = None
        self.in_head = True
        self.head_raw = 0
        if req.has_body and self.active is not None and self.active.req is req:
            self.timer_kind = NONE
            self.timer.clear()
            self.active.request_complete()

    # -- request flow ---------------------------------------------------------------------------

    def _start_pending(self) -> None:
        """Begin the pending request, unless it is buffered and its body is still arriving:
        then read on (telling a client that expects it to go on: 100 Continue)."""
        req = self.pending
        assert req is not None
        if req.body is not None and not req.complete:
            if not req.awaiting:
                req.awaiting = True
                self.ctx.metrics.body_buffering(1)
                if req.expect_continue and not req.http10:
                    self.write(CONTINUE)
                self.timer_kind = BODY
                self.timer.set(monotonic() + self.ctx.body_timeout)
                self._resume(BUFFER_FULL)
            return
        self.pending = None
        self._begin(req, req.started)

    def _release_waiting(self) -> None:
        """The connection is gone: requests that never reached an exchange let their bodies go."""
        pending = self.pending
        if pending is not None:
            self.pending = None
            self._drop(pending)
        if self.queue:
            for item in self.queue:
                if isinstance(item, Request):
                    self._drop(item)
            self.queue = []
        req = self.req
        if req is not None:
            self.req = None
            self._drop(req)

    def _drop(self, req: Request) -> None:
        if req.awaiting:
            req.awaiting = False
            self.ctx.metrics.body_buffering(-1)
        req.release()

    def _begin(self, req: Request, now: float) -> None:
        """Make `req` the active request and start its walk over the servers."""
        if req.expect_continue and req.has_body and not req.complete and not req.http10:
            self.write(CONTINUE)
        if req.complete or not req.has_body:
            self.timer_kind = NONE
            self.timer.clear()
        else:
            self.timer_kind = BODY
            self.timer.set(now + self.ctx.body_timeout)
        self.active = exchange = Exchange(self.ctx, self, req)
        inflight = self.inflight
        if inflight is not None:
            self.inflight = None
            exchange.adopt(inflight)
        else:
            exchange.start(now)

    def exchange_done(self, exchange: Exchange, keep_alive: bool, now: float) -> None:
        """The active request was answered: start the next pipelined one, idle, or close."""
        if self.active is exchange:
            self.active = None
        if self.last_parsed is exchange.req:
            self.last_parsed = None  # an idle connection holds no answered request (memory)
        self.served += 1
        if self.closed:
            return
        if not keep_alive or (self.eof and not self.queue):
            self.close()
            return
        if self.queue:
            nxt = self.queue.pop(0)
            if not self.queue:
                self._resume(PIPELINE)
            if isinstance(nxt, BadRequest):
                self._answer_error(nxt)
            else:
                self.pending = nxt
                self._start_pending()
            return
        if self.req is None:
            if self.ctx.draining:  # told keep-alive before draining began
                self.drain(self.ctx.idle_grace)
                return
            self.timer_kind = IDLE
            self.timer.set(now + self.ctx.keepalive_timeout)
        else:
            self.timer_kind = HEAD
            self.timer.set(self.req.started + self.ctx.header_timeout)
        self._resume(BUFFER_FULL)
        core = self.core
        if (core is not None and self.req is None and not self.paused and not self.write_paused
                and not self.eof and not self.slow and self.tunnel is None):
            if self._core_would_answer():
                self._give_back(core, now)
            else:
                self.core = None  # the relay's for good: an idle connection holds one object

    def _core_would_answer(self) -> bool:
        """Might the core answer this connection's next request itself? Not while the first
        server has idle pooled connections: the core connects anew for each request and leaves
        a socket with a connection to reuse to the relay, so a connection given back would come
        back with its next request, a hand-over both ways a request (behind an upstream that
        keeps connections alive: 0.6x the relay's own throughput, `bench throughput`). The
        connection then stays the relay's."""
        order = self.ctx.order
        return not order or not order[0].has_idle()

    def _give_back(self, core: CoreSide, now: float) -> None:
        """Idle between requests: the connection goes back to the C core that handed it over
        (adopt), which answers the next request if it is the common one. This object is done
        with it then: what it held is written, its timer and parser let go."""
        self.flush_held()
        transport = self.transport
        self.core = None
        self.closed = True  # inert from here: the transport calls the core
        self._send = None
        self.transport = None
        self.parser.close()
        self.timer = self.timer.give_back()
        self.ctx.connection_replaced(self, core)
        if transport is not None:
            transport.set_protocol(core)  # type: ignore[arg-type]
            core.take_back(transport, self.served, now + self.ctx.keepalive_timeout)

    def keep_alive_after(self, req: Request) -> bool:
        """May this connection carry another request after answering `req`?"""
        return (
            req.keep_alive
            and req.complete
            and not self.ctx.draining
            and self.close_after is not req
            and self.served + 1 < self.ctx.keepalive_requests
            and not self.closed
        )

    def _finish_head(self, req: Request, version: str, upgrading: bool) -> None:
        """Check what the parser leaves to the proxy (SPEC 8), then build the upstream head
        once: a retry re-sends the same bytes."""
        ctx = self.ctx
        if version != "1.1":
            if version != "1.0":
                raise BadRequest(505, f"HTTP version {version} not supported")
            req.http10 = True
        if req.head_size + len(req.url) > ctx.max_header_bytes:
            raise BadRequest(431, "request head too large")
        if req.method == b"CONNECT":
            raise BadRequest(501, "CONNECT is not supported")
        url = req.url  # not origin-form, or with a "#": checked further
        authority = _check_target(req) if url[:1] != b"/" or _HASH in url else b""
        # Keep-alive from the Connection tokens themselves (llhttp lets an HTTP/1.0 `keep-alive`
        # win over a `close`, and counts Proxy-Connection): `close` always wins, and HTTP/1.0
        # needs `keep-alive` (RFC 9112 9.3).
        tokens = connection_tokens(req.conn_tokens) if req.conn_tokens else _NO_TOKENS
        req.keep_alive = b"close" not in tokens and (not req.http10 or b"keep-alive" in tokens)
        if req.te:
            if req.http10:
                raise BadRequest(400, "Transfer-Encoding in an HTTP/1.0 request")
            check_transfer_encoding(req.te)
            req.chunked = True
            framing = b"Transfer-Encoding: " + req.te + b"\r\n"
            req.has_body = True
        elif req.content_length is not None:
            if ctx.max_body_bytes and int(req.content_length) > ctx.max_body_bytes:
                raise BadRequest(413, "request body too large")
            framing = b"Content-Length: " + req.content_length + b"\r\n"
            req.has_body = req.content_length != b"0"
        else:
            framing = b""
        if req.host_count != 1:
            if not req.http10:
                raise BadRequest(400, "missing Host" if not req.host_count else "repeated Host")
            if not req.host_count:
                # HTTP/1.0 may omit Host; the HTTP/1.1 request upstream may not (RFC 9112 3.2):
                # the address the client reached, as nginx sends its server's name.
                req.host = self._local_host()
                req.lines += (b"Host", b": ", req.host, b"\r\n")
        if authority:
            # RFC 9112 3.2.2: the target's authority replaces Host.
            req.lines = [b"Host", b": ", authority, b"\r\n", *without_names(req.lines, {b"host"})]
            req.host = authority
        if req.conn_tokens:
            tokens = tokens - {b"close", b"keep-alive", b"upgrade"}
            if tokens & {b"content-length", b"host", b"transfer-encoding"}:
                raise BadRequest(400, "Connection lists a framing header")
            if tokens:
                req.lines = without_names(req.lines, tokens)
        upgrade = b""
        if upgrading:
            upgrade = without_h2c(req.upgrade)
            if not upgrade or req.has_body:
                # llhttp stops after this head as if another protocol followed (httptools makes
                # it skip an upgrade request's body): not tunnelled, so HTTP resumes there.
                upgrade = b""
                self.resume = req
                if req.has_body:
                    self.req = Request(req.started)  # takes llhttp's early message-complete
        req.upgrade = upgrade  # what a 101 may name
        if not req.request_id and ctx.rid_header:
            inflight = self.inflight
            # sent upstream by the C core with its own: the same id here (adopt)
            req.request_id = ctx.new_request_id() if inflight is None else inflight.request_id
        if req.has_body and ctx.request_buffering:
            req.body = RequestBody(ctx.request_buffer_bytes, ctx.temp_dir, ctx.metrics)
            if req.chunked:
                return  # its head, with Content-Length, is built once the body is whole
        req.head = self._build_head(req, framing, upgrade)

    def _build_head(self, req: Request, framing: bytes, upgrade: bytes) -> bytes:
        """The head sent upstream, built once per request (a retry re-sends the same bytes)."""
        return self.ctx.build_head(req.method, req.url, req.lines, req.host, self.client_addr,
                                   self.tls, req.request_id, framing, upgrade, req.xff, req.via)

    def _local_host(self) -> bytes:
        """host[:port] the client connected to (a Host for requests that sent none)."""
        transport = self.transport
        name = transport.get_extra_info("sockname") if transport is not None else None
        if isinstance(name, tuple):
            host, port = str(name[0]), int(name[1])
            return (f"[{host}]:{port}" if ":" in host else f"{host}:{port}").encode()
        return b"localhost"

    def _on_parser_upgrade(self, rest: bytes) -> None:
        """llhttp stopped after an `Upgrade` request: the bytes after it belong to the tunnel,
        unless failproxy does not tunnel that request (`resume`): then HTTP goes on."""
        while self.resume is not None:
            req = self.resume
            self.resume = None
            if req.has_body:
                # llhttp skipped the body: a fresh parser reads it behind a stand-in head.
                self.req = req
                self.in_head = False
                self.parser.close()
                self.parser = RequestParser(_SkippedBody(self), self.ctx.request_names,
                                            self.ctx.max_uri_bytes)
                if req.chunked:
                    rest = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + rest
                else:
                    length = int(req.content_length or 0)
                    rest = b"POST / HTTP/1.1\r\nContent-Length: %d\r\n\r\n%b" % (length, rest)
            try:
                self.parser.feed_data(rest)
                self._parsed()
                return
            except httptools.HttpParserUpgrade as upgrade:
                self._parsed()
                rest = rest[upgrade.args[0] :]
            except httptools.HttpParserError as exc:
                self._reject(self._refusal(exc))
                return
        self.upgrade_rest = rest
        # Unless a 101 makes it a tunnel, the parser cannot go on after this request: the
        # connection closes once it is answered (requests before it keep theirs).
        self.close_after = self.last_parsed
        self._pause(UPGRADE)

    def start_tunnel(self, conn: UpstreamConnection) -> None:
        """The upstream answered 101: from now on bytes are copied both ways unparsed."""
        self.flush_held()  # the 101 head, before the tunnel writes to the transport itself
        self.active = None
        self.tunnel = conn
        conn.tunnel = self.transport
        conn.timer.close()
        self.timer_kind = NONE
        self.timer.clear()
        if self.upgrade_rest:
            conn.write(self.upgrade_rest)
            self.upgrade_rest = b""
        self._resume(UPGRADE)

    # -- errors ---------------------------------------------------------------------------------

    def _fail(self, error: BadRequest) -> None:
        """Abort parsing from inside a parser callback."""
        self.error = error
        raise error

    def _reject(self, error: BadRequest) -> None:
        """Bad input: answered in its turn, the connection closed, nothing sent upstream."""
        self.error = None
        self.transport.pause_reading()  # type: ignore[union-attr]
        self.paused |= REJECTED
        req = self.req
        self.req = None
        if req is not None:
            self._drop(req)  # its body goes; nothing of it reached an upstream unless active
        pending = self.pending
        if pending is not None:
            self.pending = None
            if pending is not req:
                # A good request before the bad one in the same read: it is answered first.
                self._begin(pending, pending.started)
        if req is not None and self.active is not None and self.active.req is req:
            # The active request's body turned out bad (e.g. a chunked body past the limit):
            # the upstream must never see a complete request.
            self.active.abort_request(error)
            return
        if req is not None and req in self.queue:
            self.queue.remove(req)
        if self.active is None and not self.queue:
            self._answer_error(error)
        else:
            self.queue.append(error)

    def internal_error(self, exc: BaseException, where: str) -> None:
        """The catch-all for this connection's handlers (reads, timers, a freed write buffer):
        a bug costs the request it met (Exchange.internal_error: 500, or the connection cut
        once an answer has begun) and this connection, never the worker. A bug outside any
        request gets a 500 when nothing is being answered. Whatever state is left, the
        connection ends: it is not to be trusted any more."""
        active = self.active
        try:
            if active is not None and not active.done:
                active.internal_error(exc, where)
            else:
                self.ctx.events.internal_error(None, exc, where)
                if not self.closed and not self.queue and self.pending is None:
                    self.write(simple_response(500, "internal error", close=True))
                    self.close()
        except Exception as again:  # the handling met the bug too: cut, and say so
            self.ctx.events.internal_error(None, again, where)
        if not self.closed:
            self.abort()

    def _answer_error(self, error: BadRequest) -> None:
        self.ctx.events.client_error(self.client_ip, error.status, error.detail)
        self.write(simple_response(error.status, error.detail, close=True))
        self.close()

    def _on_timer(self) -> None:
        try:
            self._on_timeout()
        except Exception as exc:
            self.internal_error(exc, "client timer")

    def _on_timeout(self) -> None:
        kind = self.timer_kind
        if kind <= IDLE:
            self.close()
        elif kind == HEAD:
            if self.req is None and self.head_raw == 0 and self.served:
                self.close()
            else:
                self._reject(BadRequest(408, "request head not received in time"))
        elif kind == BODY:
            self._reject(BadRequest(408, "request body stalled"))
        elif kind == WRITE:
            transport = self.transport
            if transport is not None and transport.get_write_buffer_size() < self.write_mark:
                # It took some since the deadline was set (under TCP memory pressure a buffer
                # can stay above its low mark for long while bytes keep flowing): wait on.
                self._arm_write_timer()
            else:
                self.abort()  # as nginx: the answer cannot be finished; it ends as 'gone'

    def _arm_write_timer(self) -> None:
        transport = self.transport
        self.write_mark = transport.get_write_buffer_size() if transport is not None else 0
        self.timer.set(monotonic() + self.ctx.client_send_timeout)

    # -- flow control and output ------------------------------------------------------------

    def _pause(self, reason: int) -> None:
        if not self.paused and self.transport is not None:
            self.transport.pause_reading()
        self.paused |= reason

    def _resume(self, reason: int) -> None:
        if not self.paused & reason:
            return
        self.paused &= ~reason
        if not self.paused and self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def upstream_paused(self, paused: bool) -> None:
        if paused:
            self._pause(UPSTREAM_FULL)
        else:
            self._resume(UPSTREAM_FULL)

    def slow_client(self) -> None:
        """exchange.Downstream: a slow client's transport holds 16 KiB before it says full
        (uvloop's default is 64 KiB): what it cannot take yet waits in the spool's file, not in
        this process's memory. Once per connection; a fast one never gets here."""
        if not self.slow and self.transport is not None:
            self.slow = True
            self.transport.set_write_buffer_limits(high=SLOW_CLIENT_HIGH)

    def request_attached(self) -> None:
        """The active request now streams to an upstream: held body bytes are on their way."""
        self._resume(BUFFER_FULL)

    def write(self, data: bytes) -> None:
        """Written now, or, inside a batch of upstream reads (rawtransport.Poller), held to the
        batch's end (flush_held) while what is held stays under HOLD_BELOW bytes: past that it
        goes now, so a writer that loops until the transport says full (`write_paused`: a spool
        or a file being drained) sees it fill as before, and nothing large waits here."""
        if self.closed:
            return
        held = self._held
        if held is not None:
            if len(held) + len(data) < HOLD_BELOW:
                self._held = held + data  # small pieces of one batch: one write at its end
                return
            self._held = None
            self.transport.writelines([held, data])  # type: ignore[union-attr]
        elif self._batch.batching and len(data) < HOLD_BELOW:
            self._held = data
            self._batch.after_batch(self)
        else:
            send = self._send
            if send is not None:
                send(data)

    def write_lines(self, data: list[bytes]) -> None:
        if len(data) == 2 and len(data[1]) <= JOIN_BELOW:
            # A head and a small body, the usual answer: one write of the two joined.
            # uvloop's writelines buffers each piece in a list and makes a write context for its
            # writev (~0.6k instructions more than a write of one piece,
            # bench.profiles.realsock); copying a small body costs less. A large one goes as it
            # is, with writev.
            self.write(data[0] + data[1])
        elif len(data) == 1:
            self.write(data[0])
        elif not self.closed:
            self.flush_held()
            self.transport.writelines(data)  # type: ignore[union-attr]

    def flush_held(self) -> None:
        """What an upstream batch wrote to this client, sent at the batch's end: the batch's
        answers to all clients then go out together, so a client's reader is woken once for
        them rather than once per answer with the Python of the next one in between (issue 21:
        each write woke a reader that had gone back to sleep). At the batch's end, not the loop
        turn's (a call_soon): that would wait for the next turn, and cost a loop iteration."""
        held = self._held
        if held is None:
            return
        self._held = None
        send = self._send
        if not self.closed and send is not None:
            send(held)

    def batch_ended(self) -> None:
        """flush_held, deferred: outside any handler of this connection, so its own catch-all.
        What the client got is not known to be whole, so nothing may follow it: an answer under
        way is cut (Exchange.internal_error), and the connection in any case."""
        try:
            self.flush_held()
        except Exception as bug:
            try:
                active = self.active
                if active is not None and not active.done:
                    active.internal_error(bug, "client write")
                else:
                    self.ctx.events.internal_error(None, bug, "client write")
            except Exception as again:  # the handling met the bug too: cut, and say so
                self.ctx.events.internal_error(None, again, "client write")
            if not self.closed:
                self.abort()

    def close(self) -> None:
        """Close after the answers written so far. Lingering, as nginx does: failproxy sends its
        FIN (write_eof) and reads on, dropping what arrives, until the client closes or LINGER
        passes. Closing with unread input at once makes the kernel reset the connection, and a
        client then loses answers it had not read yet (a pipelined request after a `close`)."""
        transport = self.transport
        if self.closed or transport is None:
            return
        self.flush_held()
        self.closed = True
        self.timer.close()
        if self.eof or not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        transport.resume_reading()
        self.loop.call_later(LINGER, transport.close)

    def abort(self) -> None:
        self._held = None
        if self.transport is not None:
            self.closed = True
            self.transport.abort()

    def drain(self, grace: float) -> None:
        """Graceful stop: a busy connection closes after its answer (`Connection: close`). An idle
        one stays open for `grace`: a request the client is sending at this very moment is still
        answered (with `Connection: close`); past the grace it closes, which RFC 9112 9.3.1
        clients survive (they retry an idempotent request on a connection closed while idle)."""
        if (self.active is not None or self.req is not None or self.queue or self.closed
                or self.pending is not None):
            return
        if grace <= 0:
            self.close()
            return
        self.timer_kind = DRAIN
        deadline = monotonic() + grace
        current = self.timer.deadline
        self.timer.set(min(current, deadline) if current else deadline)


_NO_TOKENS: Final[set[bytes]] = set()


def _check_target(req: Request) -> bytes:
    """A request-target other than origin-form (RFC 9112 3.2): raise BadRequest, or return the
    authority of an absolute-form target, which is rewritten to origin form."""
    url = req.url
    if url.find(b"#") >= 0:
        raise BadRequest(400, "fragment in the request target")  # as HAProxy, Envoy
    if url[:1] == b"/":
        return b""
    if url[:1] == b"*":
        if url != b"*" or req.method != b"OPTIONS":
            raise BadRequest(400, "asterisk-form is only for OPTIONS *")
        return b""
    # llhttp let no other form through: absolute-form (authority-form is CONNECT's, 501).
    scheme, sep, rest = url.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        raise BadRequest(400, "request target scheme is not http or https")
    end = len(rest)
    for delim in (b"/", b"?"):
        i = rest.find(delim)
        if 0 <= i < end:
            end = i
    authority, path = rest[:end], rest[end:]
    if authority.find(b"@") >= 0:
        raise BadRequest(400, "userinfo in the request target")
    if not valid_host(authority):
        raise BadRequest(400, "invalid authority in the request target")
    req.url = path if path[:1] == b"/" else b"/" + path
    return authority


class _SkippedBody(RequestSink):
    """What the parser that reads on after llhttp skipped the body of an upgrade request
    failproxy does not tunnel reports to: the stand-in head it is fed first is dropped, the rest
    goes to the client connection as usual."""

    __slots__ = ("client", "head")

    def __init__(self, client: ClientConnection) -> None:
        self.client = client
        self.head = True

    def on_message_begin(self) -> None:
        if not self.head:
            self.client.on_message_begin()

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
        if self.head:
            self.head = False
        else:
            self.client.on_head(method, url, version, upgrading, lines, host, host_count,
                                head_size, length, te, connection, upgrade, request_id, xff,
                                via, expect_continue)

    def on_body(self, body: bytes) -> None:
        self.client.on_body(body)

    def on_message_complete(self) -> None:
        self.client.on_message_complete()


def _parse_error(exc: Exception) -> BadRequest:
    """llhttp's own refusals: a well-formed but unsupported version is 505, the rest 400."""
    detail = str(exc) or "malformed request"
    if detail == "Invalid HTTP version":
        return BadRequest(505, "HTTP version not supported")
    return BadRequest(400, detail)
