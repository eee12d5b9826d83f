"""One request's walk over the servers, and the relay of the response that ends it.

The walk: take the next server in order; skip it if marked down or at `max_conns`; reuse an
idle pooled connection or connect; on a failure decide (policy.may_retry) whether the request
may move on, log the `failover` *before* the next attempt starts, and go on. The first response
head that is not itself a reason to move on is relayed and the request is committed to it.
"""

from __future__ import annotations

import errno
import socket
import time
from typing import TYPE_CHECKING

from failproxy import policy
from failproxy.headers import BadRequest, response_head, simple_response
from failproxy.upstream import (
    CHUNKED,
    CLOSE,
    UpstreamConnection,
    start_connect,
    when_connected,
)

if TYPE_CHECKING:
    from failproxy.client import ClientProtocol, Request
    from failproxy.state import Server
    from failproxy.worker import Worker

_perf = time.perf_counter


class Exchange:
    """The life of one request from the moment it is first in line until it is answered."""

    __slots__ = (
        "answered_by",
        "attempt",
        "bytes_sent",
        "chunked_out",
        "client",
        "conn",
        "connect_ms",
        "done",
        "head_request",
        "head_sent",
        "idempotent",
        "keep_alive",
        "out",
        "pos",
        "reasons",
        "req",
        "server",
        "stale_retried",
        "started",
        "status",
        "tried",
        "worker",
    )

    def __init__(self, worker: Worker, client: ClientProtocol, req: Request) -> None:
        self.worker = worker
        self.client = client
        self.req = req
        self.started = _perf()
        self.pos = -1
        self.attempt = 0
        self.tried: list[str] = []
        self.reasons: list[str] = []
        self.server: Server | None = None
        self.conn: UpstreamConnection | None = None
        self.answered_by: Server | None = None
        self.connect_ms: float | None = None
        self.stale_retried = False
        self.head_request = req.method == b"HEAD"
        self.idempotent = req.method in policy.IDEMPOTENT_METHODS
        self.head_sent = False
        self.chunked_out = False
        self.keep_alive = False
        self.status = 0
        self.bytes_sent = 0
        self.done = False
        # Response bytes gathered during one read from the upstream, sent in one writev.
        self.out: list[bytes] = []

    # -- the walk -------------------------------------------------------------------------------

    def start(self) -> None:
        server = self._next_server()
        if server is None:
            self._exhausted(None)
            return
        self._try(server)

    def _next_server(self) -> Server | None:
        """The next server in order that is not marked down (logging each one skipped)."""
        order = self.worker.order
        while True:
            self.pos += 1
            if self.pos >= len(order):
                return None
            server = order[self.pos]
            if not server.down_until:
                return server
            now = self.worker.loop.time()
            if not server.is_down(now):
                return server
            if self.pos == 0 and all(s.is_down(now) for s in order):
                return server  # every server is down: try them anyway, as nginx does
            self.worker.log_skipped(self, server)

    def _try(self, server: Server) -> None:
        self.attempt += 1
        self.server = server
        self.tried.append(server.address)
        if server.max_conns and server.inflight >= server.max_conns:
            self._failed("busy", None)
            return
        if server.queue_probe is not None and server.queue_full():
            self._failed("queue_full", None)
            return
        server.inflight += 1
        req = self.req
        if server.idle:
            # A request that could not be re-sent after a stale connection fails must not get
            # a connection that may be closing.
            careful = not (req.replayable and (self.idempotent or self.worker.retry_non_idempotent))
            conn = server.take_idle(self.worker.loop.time(), careful)
            if conn is not None:
                self._attach(conn, reused=True)
                return
        self._connect(server)

    def _connect(self, server: Server) -> None:
        t0 = _perf()
        sock, err = start_connect(server)
        if sock is None:
            server.inflight -= 1
            self._failed(policy.classify_connect_errno(err), err)
            return
        if err == errno.EINPROGRESS:
            when_connected(
                self.worker.loop,
                sock,
                self.worker.connect_timeout,
                lambda err: self._tcp_connected(server, sock, err, t0),
            )
            return
        self._open(server, sock, t0)

    def _tcp_connected(self, server: Server, sock: socket.socket, err: int, t0: float) -> None:
        if self.done:
            sock.close()
            server.inflight -= 1
        elif err:
            sock.close()
            server.inflight -= 1
            self._failed(policy.classify_connect_errno(err), err)
        else:
            self._open(server, sock, t0)

    def _open(self, server: Server, sock: socket.socket, t0: float) -> None:
        self.worker.loop.create_task(self._wrap(server, sock, t0))

    async def _wrap(self, server: Server, sock: socket.socket, t0: float) -> None:
        """Give a connected socket a uvloop transport, then send the request on it."""
        loop = self.worker.loop
        conn = UpstreamConnection(server, loop)
        try:
            if server.is_unix:
                await loop.create_unix_connection(lambda: conn, sock=sock)
            else:
                await loop.create_connection(lambda: conn, sock=sock)
        except OSError as exc:
            sock.close()
            server.inflight -= 1
            if not self.done:
                self._failed(policy.classify_connect_errno(exc.errno), exc.errno)
            return
        except Exception as exc:  # a bug here must not leave the client waiting forever
            sock.close()
            server.inflight -= 1
            self.worker.log.exception("internal_error", request_id=self.req.request_id or None)
            if not self.done:
                self._answer_locally(502, f"internal error: {type(exc).__name__}")
            return
        seconds = _perf() - t0
        self.connect_ms = seconds * 1000.0
        self.worker.metrics.connect_duration(server.index, seconds)
        if self.done:
            server.inflight -= 1
            conn.close()
            return
        self._attach(conn, reused=False)

    def _attach(self, conn: UpstreamConnection, reused: bool) -> None:
        """Send the request on `conn`; from here on bytes may have reached the upstream."""
        self.conn = conn
        conn.exchange = self
        conn.reused = reused
        conn.timer.set(self.worker.loop.time() + self.worker.read_timeout)
        self.worker.metrics.upstream_request(conn.server.index)
        req = self.req
        req.attach(conn, self.worker.retry_body_bytes)
        client = self.client
        if client.write_paused:
            conn.pause_reading()
        if client.paused:
            client.request_attached()

    def _release_attempt(self) -> None:
        conn = self.conn
        if conn is not None:
            self.conn = None
            conn.exchange = None
            conn.server.inflight -= 1
        self.req.detach()

    def _failed(self, reason: str, err: int | None) -> None:
        """The current attempt failed: move on if the policy allows, else end the request."""
        server = self.server
        assert server is not None
        if reason != "busy" and reason != "queue_full":
            self.worker.server_failed(server)
        nxt = self._next_if_allowed(reason)
        if nxt is None:
            self.reasons.append(reason)
            self._exhausted(reason)
            return
        self._move_on(server, nxt, reason, err)

    def _move_on(self, server: Server, nxt: Server, reason: str, err: int | None) -> None:
        """Log the decision before the next attempt starts, so a stuck attempt leaves a trail."""
        self.reasons.append(reason)
        self.worker.log_failover(self, server, nxt, reason, err)
        self._try(nxt)

    def _next_if_allowed(self, reason: str) -> Server | None:
        worker = self.worker
        if not policy.may_retry(
            reason,
            retry_on=worker.retry_on,
            idempotent=self.idempotent,
            replayable=self.req.replayable,
            retry_non_idempotent=worker.retry_non_idempotent,
        ):
            return None
        if policy.walk_limit_reached(
            self.attempt, worker.tries, _perf() - self.started, worker.retry_timeout
        ):
            return None
        return self._next_server()

    def _exhausted(self, reason: str | None) -> None:
        """No server took the request: 502, or 504 when the last attempt timed out."""
        status = policy.exhausted_status(reason)
        self.worker.log_exhausted(self, status)
        self._answer_locally(status, "no upstream server could take the request")

    def _answer_locally(self, status: int, text: str) -> None:
        client = self.client
        keep = client.keep_alive_after(self.req)
        data = simple_response(status, text, close=not keep)
        self.status = status
        self.bytes_sent = len(data)
        client.write(data)
        self._finish(keep)

    # -- events from the upstream connection ------------------------------------------------------

    def on_interim(
        self,
        conn: UpstreamConnection,
        status: int,
        reason: bytes,
        headers: list[tuple[bytes, bytes]],
    ) -> None:
        """1xx before the real response: relayed to HTTP/1.1 clients (not 100: we sent our own)."""
        if status != 100 and not self.req.http10:
            data = response_head(
                status, reason, headers, b"", keep_alive=True, http10=False, extra=b""
            )
            self.client.write(data)

    def on_response_head(
        self,
        conn: UpstreamConnection,
        status: int,
        reason: bytes,
        headers: list[tuple[bytes, bytes]],
        length: bytes | None,
    ) -> None:
        status_reason = policy.STATUS_REASONS.get(status)
        if status_reason is not None:
            nxt = self._next_if_allowed(status_reason)
            if nxt is not None:
                # Its body is not wanted: the connection cannot be reused without reading it.
                server = conn.server
                self._release_attempt()
                conn.abort()
                self.worker.server_failed(server)
                self._move_on(server, nxt, status_reason, None)
                return
        client = self.client
        req = self.req
        keep = client.keep_alive_after(req)
        framing = b""
        if conn.framing == CHUNKED or conn.framing == CLOSE:
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
        self.head_sent = True
        self.answered_by = conn.server
        extra = conn.server.header_line if self.worker.upstream_header else b""
        data = response_head(
            status, reason, headers, framing, keep_alive=keep, http10=req.http10, extra=extra
        )
        self.bytes_sent += len(data)
        self.out.append(data)

    def on_response_body(self, data: bytes) -> None:
        conn = self.conn
        if conn is not None:
            conn.timer.set(self.worker.loop.time() + self.worker.read_timeout)
        size = len(data)
        if self.chunked_out:
            line = b"%x\r\n" % size
            self.out += (line, data, b"\r\n")
            self.bytes_sent += size + len(line) + 2
        else:
            self.out.append(data)
            self.bytes_sent += size

    def flush_out(self) -> None:
        out = self.out
        if out:
            self.client.write_lines(out)
            out.clear()

    def on_response_complete(self, conn: UpstreamConnection, reusable: bool) -> None:
        if self.chunked_out:
            self.out.append(b"0\r\n\r\n")
            self.bytes_sent += 5
        self.flush_out()
        server = conn.server
        self._release_attempt()
        if server.down_until or server.fails:
            self.worker.server_ok(server)
        if reusable and not conn.closed and conn.requests < server.keepalive_requests:
            if conn.paused:
                conn.resume_reading()  # paused for a slow client: an idle one must see EOF
            conn.idle_since = self.worker.loop.time()
            if server.put_idle(conn):
                conn.timer.set(conn.idle_since + server.keepalive_timeout)
            else:
                conn.close()
        else:
            conn.close()
        self._finish(self.keep_alive)

    def on_upstream_lost(self, conn: UpstreamConnection, exc: Exception | None) -> None:
        """The upstream closed or reset the connection before the response was complete."""
        server = conn.server
        self._release_attempt()
        if self.done:
            return
        if self.head_sent:
            # Cut short: never presented as complete. The client connection is closed.
            self.keep_alive = False
            self.client.abort()
            self._finish(False)
            return
        if (
            conn.reused
            and not self.stale_retried
            and not conn.got_bytes
            and policy.may_retry_stale(
                idempotent=self.idempotent,
                replayable=self.req.replayable,
                retry_non_idempotent=self.worker.retry_non_idempotent,
            )
        ):
            # A pooled keep-alive connection the upstream had closed: not a failover.
            self.stale_retried = True
            server.inflight += 1
            self._connect(server)
            return
        err = getattr(exc, "errno", None) if exc is not None else None
        self._failed("reset", err)

    def on_upstream_timeout(self, conn: UpstreamConnection) -> None:
        self._release_attempt()
        conn.abort()
        if self.head_sent:
            self.keep_alive = False
            self.client.abort()
            self._finish(False)
            return
        self._failed("timeout", None)

    def on_upstream_invalid(self, conn: UpstreamConnection, detail: str) -> None:
        """A response that breaks HTTP: 502 if nothing was relayed yet, else close the client."""
        self._release_attempt()
        conn.abort()
        if self.head_sent:
            self.client.abort()
            self._finish(False)
            return
        self.worker.log.warning(
            "upstream_invalid",
            request_id=self.req.request_id,
            address=conn.server.address,
            detail=detail,
        )
        self._answer_locally(502, "invalid response from upstream")

    def on_upstream_upgrade(self, conn: UpstreamConnection, rest: bytes) -> None:
        """101 relayed: the connection becomes a raw tunnel."""
        self._release_attempt()
        if self.done:
            conn.close()
            return
        self.flush_out()
        if rest:
            self.client.write(rest)
        self.client.start_tunnel(conn)
        self._finish(True, tunnel=True)

    # -- events from the client side -------------------------------------------------------------

    def request_complete(self) -> None:
        """The client finished sending the body; the upstream read deadline starts over."""
        conn = self.conn
        if conn is not None:
            conn.timer.set(self.worker.loop.time() + self.worker.read_timeout)

    def upstream_paused(self, paused: bool) -> None:
        self.client.upstream_paused(paused)
        conn = self.conn
        if conn is not None and paused:
            conn.timer.set(self.worker.loop.time() + self.worker.send_timeout)

    def client_paused(self, paused: bool) -> None:
        conn = self.conn
        if conn is not None:
            if paused:
                conn.pause_reading()
            else:
                conn.resume_reading()

    def client_gone(self) -> None:
        """The client disconnected: whatever is in flight upstream is abandoned."""
        if self.done:
            return
        conn = self.conn
        self._release_attempt()
        if conn is not None:
            conn.abort()
        if not self.head_sent:
            self.status = 499
        self._finish(False)

    def abort_request(self, error: BadRequest) -> None:
        """The body broke a rule mid-stream: the upstream must never get a complete request."""
        conn = self.conn
        self._release_attempt()
        if conn is not None:
            conn.abort()
        self.worker.log_client_error(self.client, error)
        if self.head_sent:
            self.client.abort()
            self._finish(False)
            return
        data = simple_response(error.status, error.detail, close=True)
        self.status = error.status
        self.bytes_sent = len(data)
        self.client.write(data)
        self._finish(False)

    # -- the end --------------------------------------------------------------------------------

    def _finish(self, keep_alive: bool, tunnel: bool = False) -> None:
        if self.done:
            return
        self.done = True
        self.worker.request_done(self)
        if not tunnel:
            self.client.exchange_done(self, keep_alive)

    def elapsed_ms(self) -> float:
        return int((_perf() - self.started) * 1_000_000) / 1000
