"""The relay's books for a request the C core answers itself (proxy/_core.pyx): the slot, the
overflow policy's verdict, route learning, peer health and the access line's write, kept by
the same calls, in the same order, that an Exchange makes for the one walk the core takes:
the local socket, first and only attempt, sent home by the policy's common verdict.

Two calls a request, so the core crosses into Python as little as it can while the books are
Python objects (bench/PROFILE.md, "The plan for the core": their common path moves to C data
next; each crossing costs its arguments boxed and parsed, ~1k instructions): `begin` decides
and takes the slot; `finish`, once the answer is read whole and written, ends the worker's
part and the request's. The connect and the counters are the core's own, in C. `undo` gives
the slot back when the connect failed or the head could not be written (the request then goes
to the relay, which walks from the start). What the Exchange and the core both do after an
answer (`learn`, `peer_ok`) is written here once.
"""

from __future__ import annotations

from failproxy.proxy.context import WorkerContext
from failproxy.proxy.events import Events
from failproxy.proxy.upstream import open_connection
from failproxy.routing.localbooks import BUILT as BOOKS_BUILT
from failproxy.routing.localbooks import LocalBooking
from failproxy.routing.peer import Peer
from failproxy.routing.routes import KNOWN_SLOW, UNKNOWN, route_key


def learn(ctx: WorkerContext, route: str, clean: bool, sent_load: int, slow: bool, peer: Peer,
          ms: float, now: float) -> None:
    """SPEC 4.3/4.4: what an answer that took `ms` teaches (Exchange._learn says why each
    step is there)."""
    routes = ctx.routes
    route_ms, learned_ms = routes.answered(route, ms, now, clean)
    room = ctx.room
    if room is not None:
        if not route_ms:
            if routes.learn:
                route_ms = learned_ms
            elif clean:
                route_ms = room.service_ms(peer) or ms
        room.answered(peer, sent_load, ms, route_ms, slow, now)


def peer_ok(events: Events, peer: Peer) -> None:
    """A success clears a failure count or a down mark."""
    if peer.down_until and peer.record_success():
        events.peer_up(peer)
    elif peer.fails:
        peer.fails = 0
        events.peer_fails(peer)


class InFlight:
    """A request the core sent and hands to the relay with its answer unread or partly read
    (Exchange.adopt): where it went, on which socket, what came back so far, and what `begin`
    knew of it."""

    __slots__ = ("answer", "clean", "connect_ms", "deadline", "error", "fd", "key", "peer",
                 "request_id", "route_kind", "route_ms", "sent_at")

    def __init__(self, key: object, peer: Peer, fd: int, answer: bytes, sent_at: float,
                 connect_ms: float, route_kind: int, route_ms: float, clean: bool,
                 request_id: str, deadline: float, error: int = 0) -> None:
        self.key = key  # what the core's `begin` entered it under in the policy's books
        self.peer = peer
        self.fd = fd
        self.answer = answer
        self.sent_at = sent_at
        self.connect_ms = connect_ms
        self.route_kind = route_kind
        self.route_ms = route_ms
        self.clean = clean
        self.request_id = request_id  # sent upstream: the relay's log line names the same
        self.deadline = deadline  # the read deadline the core had set (read_timeout per read)
        # the errno of the core's read that failed (a reset), 0: none; read once, the socket
        # gives a later read its end only, so the relay is told
        self.error = error


# What `begin` gives the core for a request it sends: the peer, the route key, its kind and
# learned time, whether the answer teaches (the one in flight per connection is the core's to
# keep and pass back), and the policy's local books (None: no policy). The request id is the
# core's own (WorkerContext.request_id_prefix).
Sending = tuple[Peer, str, int, float, bool, LocalBooking | None]


class CoreBooks:
    """One worker's: the core holds it, and passes each request's own values back in."""

    __slots__ = ("c_books", "ctx")

    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx
        # The policy's local books are the compiled twin's: the core enters its requests there
        # and ends them itself, with C calls (`begin` gives it the books of the moment), and
        # neither `begin` nor `finish` does.
        self.c_books = BOOKS_BUILT == "cython"

    def begin(self, key: object, method: bytes, url: bytes, now: float) -> Sending | None:
        """The request goes to the first server, a local UNIX socket, where the relay would
        send it there now as its first and only choice (Exchange.start: the overflow policy's
        common verdict, or the first of the order when there is no policy): its slot taken, and
        the attempt entered in the policy's local books unless those are the compiled twin's
        (`c_books`: the core enters it there itself). None, with nothing done, where anything
        else may happen (the relay takes the request then). The core connects then, and counts the
        connect and the attempt; a connect that fails is `undo`ne and the request handed over:
        the relay connects again, sees the same error and logs its failover."""
        ctx = self.ctx
        order = ctx.order
        if not order or ctx.static is not None or ctx.compress is not None:
            return None
        local = order[0]
        if not local.is_unix or (local.down_until and local.is_down(now)):
            return None
        if local.busy() or local.queue_probe is not None or local.has_idle():
            return None
        route = route_key(method, url)  # a native call (an alias in a Final is a generic one)
        room = ctx.room
        if room is None:
            kind, route_ms = UNKNOWN, 0.0  # the plain walk looks nothing up
        else:
            if room.local is not local:
                return None
            kind, route_ms = ctx.routes.known(route, url)
            if kind == KNOWN_SLOW or not room.home_now(now):
                return None
        # sent where a worker was free, as far as known: its answer teaches (Exchange._go)
        clean = room.clean if room is not None else True
        local.acquire()
        books = None
        if room is not None:
            books = room.books
            if not self.c_books:
                room.local_sent(key, now, kind, route_ms)
        return local, route, kind, route_ms, clean, books

    def undo(self, key: object, peer: Peer, now: float) -> None:
        """`begin`'s request never reached the peer (the connect failed, or its head could not
        be written): the attempt ends with no answer, as Exchange._end_attempt ends one."""
        peer.release(False)
        room = self.ctx.room
        if room is not None:
            room.local_ended(key, now)
            room.release()

    def gone(self, key: object, peer: Peer, route: str, now: float, started: float,
             request_id: str, method: bytes, url: bytes, client_ip: str,
             connect_ms: float) -> None:
        """The client left with the request in flight: as the relay's client_gone, the attempt
        ends with no answer and the request is logged 499."""
        self.undo(key, peer, now)
        self.ctx.events.answered(now, started, 499, request_id, method, url, 0, client_ip, None,
                                 (peer.address,), 1, connect_ms, None, None, route, 0, False)

    def pool(self, peer: Peer, fd: int, keepalive: bytes, now: float) -> None:
        """The answer was whole and the upstream keeps the connection: into the peer's pool,
        as Exchange.on_response_complete puts one there (a connection made for it)."""
        conn = open_connection(peer, self.ctx.loop, fd)
        conn.requests = 1
        if keepalive:
            conn.keepalive_hint_from(keepalive)
        if conn.requests < peer.keepalive_requests and peer.put_idle(conn):
            conn.idle_since = now
            conn.timer.set(now + peer.keepalive_timeout)
        else:
            conn.close()

    def finish(self, key: object, peer: Peer, route: str, clean: bool, now: float,
               sent_at: float, line: bytes | None) -> None:
        """The answer was read whole (`now`) and written to the client: its worker is done
        with the request (as at the response head: the core reads the answer in one piece),
        learn, give the slot back, clear the peer's failures and log (`line`: the access line
        the core rendered, None when the log is off: Events.lines). The core counts it."""
        ctx = self.ctx
        peer.answered()
        room = ctx.room
        if room is not None and not self.c_books:
            room.local_answered(key, now)
        ms = int((now - sent_at) * 1_000_000) / 1000
        learn(ctx, route, clean, 0, False, peer, ms, now)
        peer.release(True)
        if room is not None:
            room.release()
        if peer.down_until or peer.fails:
            peer_ok(ctx.events, peer)
        if line is not None:
            ctx.events.rendered(line)
