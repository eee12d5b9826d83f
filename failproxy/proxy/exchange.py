"""One request's walk over the servers, and the relay of the response that ends it.

The steps, named as nginx's upstream module names them: `next_peer` takes the next server in
order (skipping one marked down); `try_peer` skips it without connecting when it is `busy` or
its queue is full, else takes its in-flight slot and reuses an idle pooled connection or
`connect`s; `send_request` attaches the request to the connection; the connection reports the
response (`on_response_head`, `on_response_body`, `on_response_complete`) or a failure. A
failure ends the attempt (`end_attempt`: the one place a slot is given back) and `next_upstream`
decides (policy.may_retry) whether the request may move on; the `failover` is logged *before*
the next attempt starts. The first response head that is not itself a reason to move on is
relayed and the request is committed to it; `finalize` ends the exchange.

Answers are buffered as nginx buffers them (SPEC 9): bytes go to the client as soon as it can
take them, and what it cannot take yet goes to a spool.AnswerSpool (memory, then a temp file),
so the upstream is read at its own speed and released as soon as the answer is read whole. The
exchange then stays in SENDING until the client has taken the rest. With `X-Accel-Buffering: no`
or `response_buffering = false` a slow client slows the upstream down instead (back-pressure).

The phase of an exchange is explicit (`phase`, one of PHASES) and changes only in `_enter`,
which checks the transition against `_TRANSITIONS`.
"""

from __future__ import annotations

import errno
import time
from typing import Final, cast

from mypy_extensions import trait

from failproxy.proxy.compress import Gzipper, GzipSource
from failproxy.proxy.connect import start_connect, when_connected
from failproxy.proxy.context import WorkerContext
from failproxy.proxy.corebooks import InFlight, learn, peer_ok
from failproxy.proxy.events import ExchangeView
from failproxy.proxy.headers import BadRequest, http_date, response_head
from failproxy.proxy.rawtransport import close_fd
from failproxy.proxy.request import Request
from failproxy.proxy.spool import AnswerSpool, FileSource, Source
from failproxy.proxy.static import StaticFiles
from failproxy.proxy.upstream import (
    CHUNKED,
    CLOSE,
    LENGTH,
    ResponseSink,
    UpstreamConnection,
    open_connection,
)
from failproxy.routing import policy
from failproxy.routing.balance import Holdable
from failproxy.routing.peer import Peer
from failproxy.routing.routes import KNOWN_SLOW, UNKNOWN, route_key

# Called on the hot path, so held as module constants: in the compiled build a Final is a C
# static, where a from-import or a module attribute is a dict lookup per call (~150-300
# instructions each, bench.profiles.realsock).
monotonic: Final = time.monotonic
_EINPROGRESS: Final = errno.EINPROGRESS

# The phases of an exchange.
NEW: Final = 0  # created, no attempt yet
CONNECTING: Final = 1  # a connect to the current peer is under way
WAITING: Final = 2  # the request is on a connection; no response head yet
RELAYING: Final = 3  # a response head went to the client; its body streams
DONE: Final = 4  # answered, abandoned, or handed over as a tunnel
HELD: Final = 5  # no known free worker anywhere: waiting in failproxy (balance.Room)
SENDING: Final = 6  # the answer was read whole, the upstream released; the client takes the rest
PHASES: Final = ("new", "connecting", "waiting", "relaying", "done", "held", "sending")

# Allowed moves: from -> set of to, as bits (1 << phase): the check in `_enter` is then two
# native int operations, where a frozenset membership test was ~100 instructions a move (three
# moves a request). A failed attempt goes back to CONNECTING (or WAITING, with a pooled
# connection) on the next peer; only RELAYING is committed.
def _moves(*phases: int) -> int:
    bits = 0
    for phase in phases:
        bits |= 1 << phase
    return bits


_TRANSITIONS: Final[tuple[int, ...]] = (
    _moves(CONNECTING, WAITING, DONE, HELD, SENDING),  # NEW (SENDING: a static file)
    _moves(CONNECTING, WAITING, DONE),  # CONNECTING
    _moves(CONNECTING, WAITING, RELAYING, DONE),  # WAITING
    _moves(SENDING, DONE),  # RELAYING
    _moves(),  # DONE
    _moves(CONNECTING, WAITING, DONE),  # HELD
    _moves(DONE),  # SENDING
)


@trait
class Downstream:
    """What an exchange needs of its client connection (downstream.ClientConnection implements
    it; a mypyc trait, so compiled code calls it natively, see upstream.ResponseSink)."""

    __slots__ = ()

    client_ip: str
    write_paused: bool  # the client's socket buffer is full: stop reading the upstream
    paused: int  # why reading the client is paused (bits); 0 = reading

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def write_lines(self, data: list[bytes]) -> None:
        raise NotImplementedError

    def keep_alive_after(self, req: Request) -> bool:
        raise NotImplementedError

    def exchange_done(self, exchange: Exchange, keep_alive: bool, now: float) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def start_tunnel(self, conn: UpstreamConnection) -> None:
        raise NotImplementedError

    def upstream_paused(self, paused: bool) -> None:
        raise NotImplementedError

    def request_attached(self) -> None:
        raise NotImplementedError

    def slow_client(self) -> None:
        """The client fell behind its answer: keep its transport's buffer small (the spool
        holds the rest, in a file)."""
        raise NotImplementedError


class Exchange(ResponseSink, ExchangeView, Holdable):
    """The life of one request from the moment it is first in line until it is answered."""

    __slots__ = (
        "answered_by",
        "attempt",
        "buffer_answer",
        "bytes_sent",
        "chunked_out",
        "clean",
        "client",
        "client_ip",
        "conn",
        "connect_ms",
        "ctx",
        "gzip",
        "head_request",
        "held_ms",
        "idempotent",
        "intercepted",
        "keep_alive",
        "order",
        "out",
        "peer",
        "phase",
        "pos",
        "reasons",
        "req",
        "route",
        "route_at",
        "route_kind",
        "route_ms",
        "sent_at",
        "sent_load",
        "slot",
        "slot_answered",
        "slow",
        "spilled",
        "spool",
        "stale_retried",
        "stalled",
        "started",
        "static",
        "status",
        "tried",
        "upstream_ms",
    )

    def __init__(self, ctx: WorkerContext, client: Downstream, req: Request) -> None:
        self.ctx = ctx
        self.client = client
        self.client_ip = client.client_ip
        self.req = req
        self.started = req.started  # monotonic(), when the request head began to arrive
        self.phase = NEW
        self.route = route_key(req.method, req.url)  # SPEC 4.4: logged, and learned from
        self.slow = False  # a slow route, as the overflow policy sees it (set in start)
        # What the route table knew of the route when the overflow policy looked (start), and
        # when: a local attempt at that same instant uses it, not a second lookup (a held
        # request is sent later, when more may be known, and looks again).
        self.route_kind = UNKNOWN
        self.route_ms = 0.0
        self.route_at = -1.0
        self.sent_load = 0  # ours awaiting the answering peer when it was sent (capacity.py)
        self.clean = True  # sent where a worker was free, as far as known: its answer teaches
        # The server order this walk goes through, as it was when the request came: a new peer
        # list from DNS (context.apply_peers) applies to the next request, not mid-walk.
        self.order = ctx.order
        self.pos = -1
        self.attempt = 0
        # the address of each server tried, in order: a tuple grown by one per attempt (most
        # requests make one), not a list made per request
        self.tried: tuple[str, ...] = ()
        # why each failed attempt failed: a tuple, made only when one fails
        self.reasons: tuple[str, ...] = ()
        self.peer: Peer | None = None  # the peer of the current attempt
        self.slot: Peer | None = None  # the peer whose in-flight slot this exchange holds
        self.slot_answered = False  # ... and that peer's response head has arrived
        self.held_ms: float | None = None  # how long the overflow policy held it
        self.conn: UpstreamConnection | None = None
        self.answered_by: Peer | None = None
        self.connect_ms: float | None = None
        self.stale_retried = False
        self.head_request = req.method == b"HEAD"
        self.idempotent = policy.idempotent(req.method)
        self.chunked_out = False
        self.keep_alive = False
        self.status = 0
        self.bytes_sent = 0
        # Response bytes gathered during one read from the upstream, sent in one writev.
        self.out: list[bytes] = []
        # Answer buffering (module docstring): whether this answer may be spooled, the spool
        # once the client fell behind, and whether the upstream is paused because it is full.
        self.buffer_answer = ctx.response_buffering
        self.spool: Source | None = None  # an AnswerSpool, or a static file (FileSource)
        self.stalled = False
        self.sent_at = 0.0  # monotonic() when the request was put on the answering connection
        self.upstream_ms: float | None = None
        self.spilled = 0  # request and answer bytes that went to temp files
        self.static = False
        self.gzip: Gzipper | None = None  # the answer is compressed on its way (SPEC 10)
        # static.intercept_errors: the error page that replaces this upstream answer
        self.intercepted: bytes | None = None

    def _enter(self, phase: int) -> None:
        """The one place the phase changes."""
        assert _TRANSITIONS[self.phase] >> phase & 1, f"{PHASES[self.phase]} -> {PHASES[phase]}"
        self.phase = phase

    # -- the walk -------------------------------------------------------------------------------

    def start(self, now: float) -> None:
        """`now`: monotonic(), read once by the caller (one clock read per request side)."""
        static = self.ctx.static
        if static is not None and self._serve_file(static):
            return
        room = self.ctx.room
        # The overflow policy reasons about the local socket's workers; one marked down
        # (fail_timeout > 0) is skipped by the plain walk below, as nginx would.
        if room is not None and self.order[0] is room.local and not room.local.is_down(now):
            kind, route_ms = self.ctx.routes.known(self.route, self.req.url)
            self.route_kind = kind
            self.route_ms = route_ms
            self.route_at = now
            slow = kind == KNOWN_SLOW  # as routes.is_slow says
            self.slow = slow
            peer, reason = room.route(self, now, slow)
            if peer is None:
                self._enter(HELD)  # resumed by the policy (resume), or its client goes
                return
            self._go(peer, reason, now)
            return
        peer = self._next_peer()
        if peer is None:
            self._exhausted(None)
            return
        self._try_peer(peer, now)

    def adopt(self, inflight: InFlight) -> None:
        """Take over a request the C core sent to the local socket and does not answer itself
        (proxy/_core.pyx hands over an answer that is not its common case: an interim one,
        one to the connection's end or too long for it, a status the walk may retry on or an
        error page replaces, an invalid head, an end or a timeout before the answer is whole).
        From here the walk is this one's, as if it had sent the request itself: the bytes read
        so far are parsed again, and what the socket says next (its end, a reset) or the read
        deadline that has passed comes as it would have."""
        peer = inflight.peer
        now = inflight.sent_at
        self.route_kind = inflight.route_kind
        self.route_ms = inflight.route_ms
        self.route_at = now
        self.clean = inflight.clean  # as the policy's verdict had it (CoreBooks.begin)
        self.attempt = 1
        self.pos = 0  # the first of the order: a failure walks on from there
        self.peer = peer
        self.tried = (peer.address,)
        self.slot = peer  # the slot the core took, given back by this walk's _end_attempt
        self.slot_answered = False
        room = self.ctx.room
        if room is not None and peer is room.local:
            room.rekey(inflight.key, self)  # the policy's books of it are this walk's now
        self.connect_ms = inflight.connect_ms
        self._enter(CONNECTING)
        try:
            conn = open_connection(peer, self.ctx.loop, inflight.fd)
        except OSError as exc:
            close_fd(inflight.fd)
            self._next(policy.classify_connect_errno(exc.errno), exc.errno)
            return
        self._enter(WAITING)
        self.conn = conn
        conn.exchange = self
        conn.reused = False
        conn.timer.set(inflight.deadline)
        self.sent_at = now
        self.req.sink = conn  # the head went out whole, from the core
        client = self.client
        if client.write_paused:
            conn.pause_reading()
        if inflight.answer:
            conn.data_received(inflight.answer)
        if inflight.error:
            conn.read_failed(inflight.error)  # a reset the core read: the socket says no more

    def _serve_file(self, static: StaticFiles) -> bool:
        """SPEC 10: a GET or HEAD that a file under static.root answers is served from disk, and
        no upstream is chosen; False: no file answers, the request goes upstream."""
        req = self.req
        try:
            answer = static.lookup(req.method, req.url, req.lines)
        except OSError:
            return False  # unreadable: the app may know better, as with no file at all
        if answer is None:
            return False
        self.static = True
        client = self.client
        keep = client.keep_alive_after(req)
        headers = answer.headers
        framing = b"Date: " + http_date() + b"\r\n"
        length = answer.length
        source: Source | None = None
        if answer.fd >= 0:
            source = FileSource(answer.fd, answer.offset, length)
            gz = self.ctx.gzipper(answer.status, False, req.lines, headers, True)
            if gz is not None:
                headers = gz.rewrite_headers(headers)
                if req.http10:
                    keep = False  # the compressed length is known at the end: close marks it
                else:
                    framing += b"Transfer-Encoding: chunked\r\n"
                source = GzipSource(source, gz, not req.http10)
                length = 0  # counted as it goes (Source.produced)
        self.keep_alive = keep
        self.status = answer.status
        head = response_head(answer.status, b"", headers, framing, keep, req.http10, b"")
        self.bytes_sent = len(head) + length
        client.write(head)
        self._enter(SENDING)
        if source is not None:
            self.spool = source
            if not client.write_paused:
                self._drain()  # else when the client takes the head (client_paused)
            return True
        self._finalize(keep)
        return True

    def resume(self, peer: Peer, reason: str, now: float) -> None:
        """balance.Holdable: the policy sends a held request on."""
        self.held_ms = int((now - self.started) * 1_000_000) / 1000
        try:
            self._go(peer, reason, now)
        except Exception as exc:
            self.internal_error(exc, "resume")

    def shed(self, now: float) -> None:
        """balance.Holdable: a slow-route request held past routes.shed_after at capacity gets
        503 and a Retry-After of that many seconds (at least 1); no upstream saw it."""
        ctx = self.ctx
        self.held_ms = int((now - self.started) * 1_000_000) / 1000
        ctx.events.shed(self)
        wait = max(1, int(ctx.cfg.routes.shed_after + 0.999))
        self._answer_locally(503, "slow route shed at capacity; retry later",
                             b"Retry-After: %d\r\n" % wait)

    def _go(self, peer: Peer, reason: str, now: float) -> None:
        """The first attempt, where the overflow policy chose: when that is not the local socket
        the skip is a failover (logged before the attempt, as every failover is)."""
        room = self.ctx.room
        assert room is not None
        self.clean = room.clean  # where it may have waited for a worker, it teaches no route time
        local = room.local
        if reason and peer is not local:
            self.attempt += 1
            self.tried += (local.address,)
            self.reasons += (reason,)
            self.ctx.events.failover(self, local, peer, reason, None)
        if peer is not local:
            room.sent(peer, now)
        self._try_peer(peer, now)

    def _next_peer(self, reason: str = "") -> Peer | None:
        """The next server to try after a failure (with `reason`): where the overflow policy
        says (a peer with a free worker, else home), or under `overflow = "ring"` the next one
        in order that is not marked down (logging each one skipped)."""
        ctx = self.ctx
        room = ctx.room
        failed = self.peer
        if (
            room is not None
            and failed is not None
            and self.order[0] is room.local
            and (not self.tried or self.tried[0] == room.local.address)
        ):
            return room.after_failure(failed, reason, self.tried, monotonic())
        order = self.order
        while True:
            self.pos += 1
            if self.pos >= len(order):
                return None
            peer = order[self.pos]
            if not peer.down_until:
                return peer
            now = monotonic()
            if not peer.is_down(now):
                return peer
            if self.pos == 0 and all(p.is_down(now) for p in order):
                return peer  # every server is down: try them anyway, as nginx does
            ctx.events.skipped(self, peer, now)

    def _try_peer(self, peer: Peer, now: float) -> None:
        self.attempt += 1
        self.peer = peer
        self.tried += (peer.address,)
        if peer.busy():
            self._next("busy")
            return
        if peer.queue_probe is not None and peer.queue_full():
            self._next("queue_full")
            return
        self._take_slot(peer)
        room = self.ctx.room
        if room is not None:
            if peer is room.local:
                if now == self.route_at:
                    kind, route_ms = self.route_kind, self.route_ms
                else:
                    kind, route_ms = self.ctx.routes.known(self.route, self.req.url)
                room.local_sent(self, now, kind, route_ms)
            else:
                self.sent_load = room.busy(peer)  # what its answer teaches (capacity.py)
        if peer.has_idle():
            req = self.req
            # A request that could not be re-sent after a stale connection fails must not get
            # a connection that may be closing.
            careful = not (req.replayable and (self.idempotent or self.ctx.retry_non_idempotent))
            conn = peer.take_idle(now, careful)
            if conn is not None:
                self._send_request(cast(UpstreamConnection, conn), True, now)
                return
        self._connect(peer)

    def _take_slot(self, peer: Peer) -> None:
        assert self.slot is None, "an exchange holds one slot at a time"
        peer.acquire()
        self.slot = peer
        self.slot_answered = False

    def _connect(self, peer: Peer) -> None:
        self._enter(CONNECTING)
        t0 = monotonic()
        fd, err = start_connect(peer)
        if fd < 0:
            self._next(policy.classify_connect_errno(err), err)
            return
        if err == _EINPROGRESS:
            when_connected(
                self.ctx.loop,
                fd,
                self.ctx.connect_timeout,
                lambda err: self._tcp_connected(peer, fd, err, t0),
            )
            return
        self._open(peer, fd, t0)

    def _tcp_connected(self, peer: Peer, fd: int, err: int, t0: float) -> None:
        if self.phase == DONE:
            close_fd(fd)
            return
        try:
            if err:
                close_fd(fd)
                self._next(policy.classify_connect_errno(err), err)
            else:
                self._open(peer, fd, t0)
        except Exception as exc:
            self.internal_error(exc, "connected")

    def _open(self, peer: Peer, fd: int, t0: float) -> None:
        """Give the connected socket a transport and send the request on it, in this call: no
        Task or Future per connection (rawtransport.py says why)."""
        try:
            conn = open_connection(peer, self.ctx.loop, fd)
        except OSError as exc:
            close_fd(fd)
            self._next(policy.classify_connect_errno(exc.errno), exc.errno)
            return
        now = monotonic()
        seconds = now - t0
        self.connect_ms = int(seconds * 1_000_000 + 0.5) / 1000  # whole µs, as logged
        self.ctx.events.connected(peer, seconds)
        self._send_request(conn, False, now)

    def _send_request(self, conn: UpstreamConnection, reused: bool, now: float) -> None:
        """Put the request on `conn`; from here on bytes may have reached the upstream."""
        self._enter(WAITING)
        ctx = self.ctx
        self.conn = conn
        conn.exchange = self
        conn.reused = reused
        conn.timer.set(now + ctx.read_timeout)
        ctx.events.upstream_request(conn.peer)
        self.sent_at = now
        try:
            self.req.attach(conn, ctx.retry_body_bytes)
        except OSError as exc:
            self._body_unreadable(conn, exc)
            return
        client = self.client
        if client.write_paused:
            conn.pause_reading()
        if client.paused:
            client.request_attached()

    def _body_unreadable(self, conn: UpstreamConnection, exc: OSError) -> None:
        """A buffered body's temp file failed on read-back: the upstream got part of a request
        at most (the connection is cut, so it never sees it whole), the client a 503."""
        self.ctx.events.temp_file_error("request", exc, self.req)
        self._end_attempt()
        conn.abort()
        self._answer_locally(503, "request body could not be read back")

    def _end_attempt(self) -> None:
        """The current attempt is over, whatever its outcome: the one place the in-flight slot
        is given back and the request let go of its connection."""
        slot = self.slot
        if slot is not None:
            self.slot = None
            slot.release(self.slot_answered)
            room = self.ctx.room
            if room is not None:
                if slot is room.local and not self.slot_answered:
                    room.local_ended(self, monotonic())
                room.release()  # a worker may be free again: a held request may go
        conn = self.conn
        if conn is not None:
            self.conn = None
            conn.exchange = None
        self.req.detach()

    def _next(self, reason: str, err: int | None = None,
              conn: UpstreamConnection | None = None, nxt: Peer | None = None) -> None:
        """Every failed attempt ends here, as every failure in nginx ends in
        ngx_http_upstream_next, so that each is told once and in one order: the attempt's slot
        and connection let go; an answer already begun cut (never presented as complete); the
        peer's health told (not for the policy's own skips, busy and queue_full); the next
        server chosen (or `nxt`, when the caller had to ask first: an error status with nowhere
        to go is relayed, not replaced); the decision logged before the next attempt starts, so
        a stuck attempt leaves a trail; then the next attempt, or 502/504."""
        peer = self.peer
        assert peer is not None
        self._end_attempt()
        if conn is not None:
            conn.abort()
        phase = self.phase
        if phase == DONE:
            return
        if phase == RELAYING:
            self._cut()
            return
        if reason != "busy" and reason != "queue_full":
            self._peer_failed(peer)
        if nxt is None:
            nxt = self._next_upstream(reason)
        self.reasons += (reason,)
        if nxt is None:
            self._exhausted(reason)
            return
        self.ctx.events.failover(self, peer, nxt, reason, err)
        self._try_peer(nxt, monotonic())

    def _cut(self) -> None:
        """The answer has begun and cannot be finished: the client connection is closed
        without its end, so no client takes a partial answer for a whole one."""
        self.keep_alive = False
        self.client.abort()
        self._finalize(False)

    def _next_upstream(self, reason: str) -> Peer | None:
        """The peer a request that failed with `reason` moves on to, or None: it may not."""
        ctx = self.ctx
        if not policy.may_retry(
            reason,
            retry_on=ctx.retry_on,
            idempotent=self.idempotent,
            replayable=self.req.replayable,
            retry_non_idempotent=ctx.retry_non_idempotent,
        ):
            return None
        if policy.walk_limit_reached(
            self.attempt, ctx.tries, monotonic() - self.started, ctx.retry_timeout
        ):
            return None
        return self._next_peer(reason)

    def _exhausted(self, reason: str | None) -> None:
        """No server took the request: 502, or 504 when the last attempt timed out."""
        status = policy.exhausted_status(reason)
        self.ctx.events.exhausted(self, status)
        self._answer_locally(status, "no upstream server could take the request")

    def _answer_locally(self, status: int, text: str, extra: bytes = b"") -> None:
        client = self.client
        keep = client.keep_alive_after(self.req)
        data = self.ctx.error_response(status, text, close=not keep, head=self.head_request,
                                       extra=extra)
        self.status = status
        self.bytes_sent = len(data)
        client.write(data)
        self._finalize(keep)

    # -- passive health ---------------------------------------------------------------------------

    def _peer_failed(self, peer: Peer) -> None:
        if not peer.fail_timeout:
            return
        if peer.record_failure(monotonic()):
            self.ctx.events.peer_down(peer)
        else:
            self.ctx.events.peer_fails(peer)

    def _peer_ok(self, peer: Peer) -> None:
        """A success clears a failure count or a down mark."""
        peer_ok(self.ctx.events, peer)

    # -- events from the upstream connection ------------------------------------------------------

    def on_interim(
        self, conn: UpstreamConnection, status: int, reason: bytes, lines: list[bytes]
    ) -> None:
        """1xx before the real response: relayed to HTTP/1.1 clients (not 100: we sent our own)."""
        if status != 100 and not self.req.http10:
            data = response_head(status, reason, lines, b"", True, False, b"")
            self.client.write(data)

    def on_response_head(
        self, conn: UpstreamConnection, status: int, reason: bytes, lines: list[bytes]
    ) -> None:
        status_reason = (policy.STATUS_REASONS.get(status)
                         if status >= policy.STATUS_REASON_MIN else None)
        if status_reason is not None:
            nxt = self._next_upstream(status_reason)
            if nxt is not None:
                # Its body is not wanted: the connection cannot be reused without reading it.
                self._next(status_reason, None, conn, nxt)
                return
        self._enter(RELAYING)
        slot = self.slot
        if slot is not None:
            slot.answered()  # its worker is done with us: the policy counts it free
            self.slot_answered = True
            room = self.ctx.room
            if room is not None and slot is room.local:
                room.local_answered(self, monotonic())
        req = self.req
        keep = self.client.keep_alive_after(req)
        ctx = self.ctx
        if ctx.intercept_errors and status in ctx.error_statuses:
            # The walk is over and its answer is an error: the configured page replaces it
            # (static.intercept_errors, nginx's proxy_intercept_errors); its body is read and
            # dropped so the connection may be pooled.
            page = ctx.error_page(status, close=not keep, head=self.head_request)
            if page is not None:
                self.keep_alive = keep
                self.status = status
                self.answered_by = conn.peer
                self.intercepted = page
                return
        framing = b""
        gz = None
        if ctx.compress is not None:
            gz = ctx.gzipper(status, self.head_request, req.lines, lines,
                             conn.framing == LENGTH)
            if gz is not None:
                self.gzip = gz
                lines = gz.rewrite_headers(lines)
        if gz is not None or conn.framing == CHUNKED or conn.framing == CLOSE:
            if req.http10:
                keep = False
            else:
                framing = b"Transfer-Encoding: chunked\r\n"
                self.chunked_out = True
        elif status == 101:
            keep = True
            framing = b"Connection: upgrade\r\n"
        self.keep_alive = keep
        self.status = status
        self.answered_by = conn.peer
        if conn.no_buffering or status == 101:
            self.buffer_answer = False  # streamed as it comes; a tunnel is never buffered
        extra = conn.peer.header_line if self.ctx.upstream_header else b""
        data = response_head(status, reason, lines, framing, keep, req.http10, extra)
        self.bytes_sent += len(data)
        self.out.append(data)

    def on_response_body(self, data: bytes) -> None:
        gz = self.gzip
        if gz is not None:
            data = gz.compress(data)
            if not data:
                return
        elif self.intercepted is not None:
            return  # replaced by an error page: read and dropped
        self._emit(data)

    def _emit(self, data: bytes) -> None:
        """Queue body bytes for the client, framed as the client's answer is."""
        size = len(data)
        if self.chunked_out:
            line = b"%x\r\n" % size
            self.out += (line, data, b"\r\n")
            self.bytes_sent += size + len(line) + 2
        else:
            self.out.append(data)
            self.bytes_sent += size

    def flush_out(self) -> None:
        """After each read of a response still under way: relay what it brought, and give the
        next read `read_timeout` (once per read, not per body callback)."""
        gz = self.gzip
        if gz is not None:
            self._gzip_tail(gz.flush_sync())
        out = self.out
        if out:
            if self.spool is None and not self.client.write_paused:
                self.client.write_lines(out)  # the common case: the client keeps up
                out.clear()
            else:
                self._hold_out(out)
        conn = self.conn
        if conn is not None:
            conn.timer.set(monotonic() + self.ctx.read_timeout)

    def _hold_out(self, out: list[bytes]) -> None:
        """The client is behind: queue `out` after what it has not taken yet (spool), or, for an
        answer that is not buffered, hand it to the client's transport and let the paused
        client hold the upstream back (client_paused)."""
        spool = self.spool
        if spool is None:
            if not self.buffer_answer:
                self.client.write_lines(out)
                out.clear()
                conn = self.conn
                if conn is not None and self.client.write_paused:
                    conn.pause_reading()
                return
            ctx = self.ctx
            spool = AnswerSpool(
                ctx.response_buffer_bytes, ctx.max_temp_file_bytes, ctx.temp_dir, ctx.metrics
            )
            self.spool = spool
            self.client.slow_client()
        elif not isinstance(spool, AnswerSpool):
            raise AssertionError("an upstream answer while a file is served")
        try:
            spool.add(out)
        except OSError as exc:
            self.ctx.events.temp_file_error("response", exc, self.req)
            if spool.lost:
                out.clear()
                self._cut_answer()
                return
        out.clear()
        if not self.client.write_paused:
            self._drain()  # the client caught up meanwhile: it takes from the front at once
        elif spool.full():
            self._stall(True)

    def _stall(self, stalled: bool) -> None:
        """Back-pressure on the upstream while the spool is full (max_temp_file_bytes)."""
        if stalled == self.stalled:
            return
        self.stalled = stalled
        self._hold_upstream(stalled)
        conn = self.conn
        if conn is not None:
            # The upstream waits for us, not we for it: no read_timeout while it is held back
            # (the client's side is bounded by server.send_timeout).
            if stalled:
                conn.timer.clear()
            else:
                conn.timer.set(monotonic() + self.ctx.read_timeout)

    def _hold_upstream(self, held: bool) -> None:
        conn = self.conn
        if conn is not None:
            if held:
                conn.pause_reading()
            else:
                conn.resume_reading()

    def _drain(self) -> None:
        """The client can take more: give it what the spool holds, until its buffer is full
        again; once the spool is empty and the upstream is done, the exchange ends."""
        spool = self.spool
        if spool is None:
            return
        client = self.client
        try:
            while not client.write_paused:
                data = spool.take()
                if not data:
                    break
                client.write(data)
        except OSError as exc:
            self.ctx.events.temp_file_error("response", exc, self.req)
            self._cut_answer()
            return
        if spool.pending:
            if self.stalled and not spool.full():
                self._stall(False)
            return
        # All taken: the spool goes (its temp file with it), and the next bytes take the
        # direct path again.
        self.spilled += spool.spilled
        self.bytes_sent += spool.produced
        spool.close()
        self.spool = None
        self._stall(False)
        if self.phase == SENDING:
            self._finalize(self.keep_alive)

    def _cut_answer(self) -> None:
        """The answer cannot reach the client whole: never presented as complete."""
        conn = self.conn
        self._end_attempt()
        if conn is not None:
            conn.abort()
        self.keep_alive = False
        self.client.abort()
        self._finalize(False)

    def _gzip_tail(self, data: bytes) -> None:
        """Compressed bytes zlib held back until a flush."""
        if data:
            self._emit(data)

    def on_response_complete(self, conn: UpstreamConnection, reusable: bool) -> None:
        now = monotonic()
        out = self.out
        intercepted = self.intercepted
        if intercepted is not None:
            out.clear()
            out.append(intercepted)
            self.bytes_sent = len(intercepted)
        gz = self.gzip
        if gz is not None:
            self._gzip_tail(gz.finish())
        if self.chunked_out:
            out.append(b"0\r\n\r\n")
            self.bytes_sent += 5
        if out:
            if self.spool is None and not self.client.write_paused:
                self.client.write_lines(out)
                out.clear()
            else:
                self._hold_out(out)
                if self.phase == DONE:
                    return
        peer = conn.peer
        if self.sent_at:
            ms = int((now - self.sent_at) * 1_000_000) / 1000
            self.upstream_ms = ms
            self._learn(peer, ms, now)
        self._end_attempt()
        if peer.down_until or peer.fails:
            self._peer_ok(peer)
        if reusable and not conn.closed and conn.requests < peer.keepalive_requests:
            if conn.paused:
                conn.resume_reading()  # paused for a slow client: an idle one must see EOF
            conn.idle_since = now
            if peer.put_idle(conn):
                conn.timer.set(conn.idle_since + peer.keepalive_timeout)
            else:
                conn.close()
        else:
            conn.close()
        spool = self.spool
        if spool is not None and spool.pending:
            self._enter(SENDING)  # the upstream is free; the client takes the rest (_drain)
            return
        self._finalize(self.keep_alive, now)

    def _learn(self, peer: Peer, ms: float, now: float) -> None:
        """SPEC 4.3/4.4: an answer teaches, when it was sent where a worker was free (`clean`),
        its route's app time; and its destination's service time and concurrency, read against
        what the route was known to take before it. The first answer of a route not learned yet
        is read against itself: before, it taught no concurrency, so of two equal peers the one
        that answered the route first started slow start one step behind the other and took a
        third of the overflow instead of half (tests/test_learning.py, 13 against 27). With
        `routes.learn` off there is no route time: the destination's own service time is the
        reference (before, its concurrency never grew past this box's worker count)."""
        learn(self.ctx, self.route, self.clean, self.sent_load, self.slow, peer, ms, now)

    def on_upstream_lost(self, conn: UpstreamConnection, exc: Exception | None) -> None:
        """The upstream closed or reset the connection before the response was complete."""
        if (
            self.phase != RELAYING
            and self.phase != DONE
            and conn.reused
            and not self.stale_retried
            and not conn.got_bytes
            and policy.may_retry_stale(
                idempotent=self.idempotent,
                replayable=self.req.replayable,
                retry_non_idempotent=self.ctx.retry_non_idempotent,
            )
        ):
            # A pooled keep-alive connection the upstream had closed: not a failover.
            peer = conn.peer
            self._end_attempt()
            self.stale_retried = True
            self._take_slot(peer)
            self._connect(peer)
            return
        err = getattr(exc, "errno", None) if exc is not None else None
        self._next("reset", err)

    def on_upstream_timeout(self, conn: UpstreamConnection) -> None:
        self._next("timeout", None, conn)

    def on_upstream_invalid(self, conn: UpstreamConnection, detail: str) -> None:
        """A response that breaks HTTP: 502 if nothing was relayed yet, else close the client.
        Not moved on: the upstream may have acted on the request."""
        self._end_attempt()
        conn.abort()
        if self.phase == RELAYING:
            self._cut()
            return
        self.ctx.events.upstream_invalid(self, conn.peer, detail)
        self._answer_locally(502, "invalid response from upstream")

    def on_upstream_upgrade(self, conn: UpstreamConnection, rest: bytes) -> None:
        """101 relayed: the connection becomes a raw tunnel."""
        self._end_attempt()
        if self.phase == DONE:
            conn.close()
            return
        self.flush_out()
        client = self.client
        if rest:
            client.write(rest)
        client.start_tunnel(conn)
        self._finalize(True, 0.0, True)

    # -- events from the client side -------------------------------------------------------------

    def request_complete(self) -> None:
        """The client finished sending the body; the upstream read deadline starts over."""
        conn = self.conn
        if conn is not None:
            conn.timer.set(monotonic() + self.ctx.read_timeout)

    def upstream_paused(self, paused: bool) -> None:
        conn = self.conn
        sender = self.req.sender
        if sender is not None:
            # A buffered body: the client is done; the temp-file part goes on as the
            # connection's buffer drains.
            if conn is None:
                return
            if paused:
                conn.timer.set(monotonic() + self.ctx.send_timeout)
                return
            try:
                if sender.pump():
                    conn.timer.set(monotonic() + self.ctx.read_timeout)
            except OSError as exc:
                self._body_unreadable(conn, exc)
            return
        self.client.upstream_paused(paused)
        if conn is not None and paused:
            conn.timer.set(monotonic() + self.ctx.send_timeout)

    def client_paused(self, paused: bool) -> None:
        """The client's socket buffer filled up or drained. A buffered answer goes on being read
        into the spool (_hold_out); an unbuffered one holds the upstream back."""
        if self.spool is not None:
            if not paused:
                self._drain()
            return
        if not self.buffer_answer:
            self._hold_upstream(paused)

    def client_gone(self) -> None:
        """The client disconnected: whatever is in flight upstream is abandoned."""
        if self.phase == DONE:
            return
        self._abandon()
        if self.phase != RELAYING and self.phase != SENDING:
            self.status = 499
        self._finalize(False)

    def _abandon(self) -> None:
        """Let go of everything upstream: out of the hold queue (or the policy would send an
        answered request on later), the slot given back, the connection cut (nothing more of
        this request reaches it)."""
        if self.phase == HELD:
            room = self.ctx.room
            if room is not None:
                room.unhold(self)
        conn = self.conn
        self._end_attempt()
        if conn is not None:
            conn.abort()

    def abort_request(self, error: BadRequest) -> None:
        """The body broke a rule mid-stream: the upstream must never get a complete request."""
        self._abandon()
        client = self.client
        self.ctx.events.client_error(self.client_ip, error.status, error.detail, False)
        if self.phase == RELAYING or self.phase == SENDING:
            client.abort()  # an answer is under way: no second one (its temp file goes)
            self._finalize(False)
            return
        data = self.ctx.error_response(error.status, error.detail, close=True,
                                       head=self.head_request)
        self.status = error.status
        self.bytes_sent = len(data)
        client.write(data)
        self._finalize(False)

    def internal_error(self, exc: BaseException, where: str) -> None:
        """The catch-all: a bug met while serving this request costs this request, not the
        worker. Logged with its traceback; the upstream slot given back and its connection cut
        (nothing more of this request reaches it); a 500 when no answer has begun, else the
        client connection cut, so no client ever takes a half answer for a whole one. Either
        way the connection closes after it: its state is no longer to be trusted."""
        self.ctx.events.internal_error(self, exc, where)
        phase = self.phase
        if phase == DONE:
            # Met after the answer (in its log record, or in the next request this one's end
            # started): the connection's state is unknown, so it ends; its close frees the rest.
            self.client.abort()
            return
        self._abandon()
        client = self.client
        if phase in (RELAYING, SENDING):  # an answer has begun (a 1xx before a 500 is fine)
            self.keep_alive = False
            client.abort()
            self._finalize(False)
            return
        data = self.ctx.error_response(500, "internal error", close=True,
                                       head=self.head_request)
        self.status = 500
        self.bytes_sent = len(data)
        client.write(data)
        self._finalize(False)

    # -- the end --------------------------------------------------------------------------------

    def _finalize(self, keep_alive: bool, now: float = 0.0, tunnel: bool = False) -> None:
        """`now`: monotonic() if the caller has it (0: read it here)."""
        if self.phase == DONE:
            return
        self._enter(DONE)
        if not now:
            now = monotonic()
        req = self.req
        body = req.body
        if body is not None:
            self.spilled += body.spilled
        spool = self.spool
        if spool is not None:
            self.spilled += spool.spilled
            self.bytes_sent += spool.produced - spool.unsent  # what the client never got
            self.spool = None
            spool.close()  # a client that left: its temp file goes now
        self.ctx.events.request(self, now)
        req.release()
        if not tunnel:
            self.client.exchange_done(self, keep_alive, now)

    @property
    def done(self) -> bool:
        return self.phase == DONE

    def upgrade_asked(self) -> bytes:
        return self.req.upgrade

    def elapsed_ms(self) -> float:
        return int((monotonic() - self.started) * 1_000_000) / 1000

