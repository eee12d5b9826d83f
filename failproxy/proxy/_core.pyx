# cython: language_level=3
"""The C core: the client connection's protocol where the compiled build runs it
(`FAILPROXY_CORE=1`, off by default while it is being built; bench/PROFILE.md, "The plan for
the core").

Why a core in C at all: in the seed's layout a request costs what the Python it runs costs
after the other processes cooled the caches, not what it executes (PROFILE.md); the same relay
with its events handled in C and its state in C data measured 1.0-1.1x unicorn direct, where
failproxy's Python relay is at 0.86x. The core is meant to answer the common request itself (a
body-less GET or HEAD to the local socket, answered with a length) and to hand everything else
to the Python relay, which stays the one place where the rest is written: bodies, static files,
error pages, failovers, held requests, retries.

A hand-over happens at a request boundary, before any byte of that request reached an upstream:
a `downstream.ClientConnection` becomes the transport's protocol, takes the core's place in the
worker's books (`WorkerContext.connection_replaced`: the same connection, no event), and is fed
the bytes the client sent since its last answer, which it parses again (`adopt`). It keeps the
connection from then on. The core's timer becomes the connection's: a head that has not come
by the time the core's timer fires is the Python relay's 408, as it would have been.

What the core does itself so far: it owns a connection from its accept to its first byte (an
idle connection costs this object and a timer) and hands it over then, or when its timer fires,
when the client half-closes, or when the worker drains. The request path in C comes next, one
case at a time, each behind the same hand-over.
"""

from time import monotonic as _monotonic

from failproxy.proxy.timer import take_timer

cdef object monotonic = _monotonic


cdef class CoreConnection:
    """One client connection until it is handed over (asyncio calls its methods)."""

    cdef object ctx
    cdef object _make_client
    cdef object transport
    cdef object timer
    cdef object _handed  # the ClientConnection it was given to, once it was
    cdef bint tls
    cdef bint closed
    cdef bint write_paused
    cdef double deadline  # the head's, from the connection's start (as ClientConnection's)

    def __cinit__(self, ctx, bint tls, make_client):
        """`make_client(ctx, tls)`: the Python relay's connection (downstream.ClientConnection),
        passed in by the worker: the core sits below it and never imports it."""
        self.ctx = ctx
        self.tls = tls
        self._make_client = make_client

    # -- asyncio protocol -----------------------------------------------------------------------

    def connection_made(self, transport):
        ctx = self.ctx
        self.transport = transport
        ctx.connection_opened(self)
        self.deadline = monotonic() + ctx.header_timeout
        self.timer = take_timer(ctx.loop, self._on_timer)
        self.timer.set(self.deadline)
        if ctx.draining:  # accepted just before the listener closed
            self.drain(ctx.idle_grace)

    def data_received(self, data):
        try:
            self._hand_over(data, False)
        except Exception as exc:
            self._internal_error(exc, "core read")

    def eof_received(self):
        if self.closed:
            return None
        try:
            return self._hand_over(b"", True)
        except Exception as exc:
            self._internal_error(exc, "core eof")
            return None

    def connection_lost(self, exc):
        if self._handed is not None:
            return  # uvloop tells the protocol it has now: this only if the swap raced
        self.closed = True
        timer = self.timer
        if timer is not None:
            self.timer = None
            timer.give_back()
        self.ctx.connection_closed(self)

    def pause_writing(self):
        self.write_paused = True

    def resume_writing(self):
        self.write_paused = False

    # -- the worker's calls (context.Connection) ----------------------------------------------

    def drain(self, double grace):
        """Graceful stop: the Python relay's rules for an idle connection (ClientConnection
        .drain) apply as they are, so it is handed over and told."""
        if self.closed:
            return
        client = self._hand_over_client()
        if client is not None:
            client.drain(grace)

    def abort(self):
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.abort()

    # -- the hand-over --------------------------------------------------------------------------

    def _on_timer(self):
        if self.closed:
            return
        try:
            self._hand_over_client()  # the deadline has passed: its timer fires at once
        except Exception as exc:
            self._internal_error(exc, "core timer")

    cdef object _hand_over_client(self):
        if self._handed is None and not self.closed:
            self._hand_over(b"", False)
        return self._handed

    cdef object _hand_over(self, bytes data, bint eof):
        """Give the connection to the Python relay (the module docstring says when)."""
        cdef object client
        timer = self.timer
        if timer is not None:
            self.timer = None
            timer.give_back()  # the client's own is taken in its constructor: reused, not new
        client = self._make_client(self.ctx, self.tls)
        self._handed = client
        self.ctx.connection_replaced(self, client)
        self.transport.set_protocol(client)
        return client.adopt(self.transport, data, eof, 0.0, self.deadline, self.write_paused)

    cdef _internal_error(self, exc, str where):
        self.ctx.events.internal_error(None, exc, where)
        self.abort()
