"""What every connection of a worker shares: settings read once from the config, the peers in
order, the events, the request-id source, and whether the worker is draining.

The config is read into plain attributes here once, so the hot path never walks the config's
dataclasses. This module sits under the client connection and the exchange: what it needs from
the worker above it (pausing and resuming accept) it declares as `AcceptControl`.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Sequence
from typing import Any, Final, Protocol

from failproxy.config import Address, CompressConfig, Config, Upstream
from failproxy.proxy import rawtransport
from failproxy.proxy.compress import Gzipper, header_list, header_value, should_gzip
from failproxy.proxy.events import Events
from failproxy.proxy.headers import (
    RequestHeadBuilder,
    page_response,
    request_kind_names,
    simple_response,
)
from failproxy.proxy.requestparser import Names
from failproxy.proxy.static import StaticFiles
from failproxy.routing import policy
from failproxy.routing.balance import Room
from failproxy.routing.loadshare import LoadSharing
from failproxy.routing.peer import Peer, build_peers
from failproxy.routing.routes import RouteTable
from failproxy.telemetry.metrics import WorkerMetrics

# The last three hex digits of a request id's counter (WorkerContext.new_request_id).
_LOW_DIGITS: Final = tuple(f"{i:03x}" for i in range(4096))


class Connection(Protocol):
    """A client connection, as the worker stops it (downstream.ClientConnection)."""

    def drain(self, grace: float) -> None: ...

    def abort(self) -> None: ...


class WorkerHooks(Protocol):
    """What the connections' comings and goings tell the worker (worker.Worker)."""

    def pause_accepting(self) -> None:
        """`max_connections` are open: accept waits."""

    def resume_accepting(self) -> None: ...

    def drained(self) -> None:
        """Draining, and the last connection closed."""


class WorkerContext:
    """Per-process state shared by every connection (one instance per worker)."""

    def __init__(
        self,
        cfg: Config,
        metrics: WorkerMetrics,
        loop: asyncio.AbstractEventLoop,
        share: LoadSharing | None = None,
    ) -> None:
        """`share`: the other workers' load (several worker processes; loadshare.py)."""
        self.cfg = cfg
        self.loop = loop
        # The loop's upstream epoll set: its batches are what a client connection's writes wait
        # for the end of (downstream.ClientConnection.write), looked up once, not per connection.
        self.poller = rawtransport.poller(loop)
        metrics.attach(loop)  # counters reach shared memory once per loop iteration
        server = cfg.server
        up = cfg.upstream
        # -- the client side
        self.header_timeout = server.header_timeout
        self.body_timeout = server.body_timeout
        self.client_send_timeout = server.send_timeout
        self.keepalive_timeout = server.keepalive_timeout
        self.keepalive_requests = server.keepalive_requests
        self.max_header_bytes = server.max_header_bytes
        self.max_uri_bytes = server.max_uri_bytes
        self.max_body_bytes = server.max_body_bytes
        self.max_connections = server.max_connections
        # -- bodies held by failproxy (SPEC 9, spool.py)
        self.request_buffering = server.request_buffering
        self.request_buffer_bytes = server.request_buffer_bytes
        self.temp_dir = server.temp_dir
        self.response_buffering = up.response_buffering
        self.response_buffer_bytes = up.response_buffer_bytes
        self.max_temp_file_bytes = up.max_temp_file_bytes
        self.metrics = metrics  # spool.TempBytes: counts the bytes in temp files
        # -- static files, error pages, gzip (SPEC 10): None / empty when off
        self.static: StaticFiles | None = StaticFiles(cfg.static) if cfg.static.root else None
        self.error_statuses = frozenset(s for s, _ in cfg.static.error_pages)
        self.intercept_errors = cfg.static.intercept_errors and bool(self.error_statuses)
        self.compress: CompressConfig | None = cfg.compress if cfg.compress.gzip else None
        head_builder = RequestHeadBuilder(cfg.headers)
        # The upstream head's writer (the Cython twin's where it runs), called once a request.
        self.build_head = head_builder.writer()
        self.rid_header = head_builder.request_id_header
        replaced = set()
        if cfg.headers.x_forwarded_proto:
            replaced.add(b"x-forwarded-proto")
        if cfg.headers.x_forwarded_host:
            replaced.add(b"x-forwarded-host")
        # The request parser's name table (requestparser.Names: the twin's own kind of table).
        self.request_names: object = Names(
            request_kind_names(self.rid_header, cfg.headers.x_forwarded_for, frozenset(replaced)),
            underscore=True,
        )
        self.upstream_header = cfg.headers.upstream_header
        # -- route learning (SPEC 4.4): which requests are slow
        rc = cfg.routes
        self.routes = RouteTable(rc.learn, rc.slow_ms, rc.slow, rc.fast, rc.max_routes)
        # -- the walk
        self.share = share
        self.peers: list[Peer] = build_peers(up)
        for peer in self.peers:
            peer.share_load(share)
        by_address = {p.address: p for p in self.peers}
        ordered = policy.server_order(up.servers, up.self)
        self.order: list[Peer] = [by_address[s.address.text] for s in ordered]
        self.room: Room | None = None
        self._set_room(up.self)
        self.retry_on = policy.expand_retry_on(up.retry_on)
        self.tries = up.tries
        self.retry_timeout = up.retry_timeout
        self.retry_non_idempotent = up.retry_non_idempotent
        self.retry_body_bytes = up.retry_body_bytes
        self.connect_timeout = up.connect_timeout
        self.read_timeout = up.read_timeout
        self.send_timeout = up.send_timeout
        # -- events, state
        self.first: Peer | None = self.order[0] if self.order else None
        self.events = Events(
            metrics,
            access=cfg.log.access,  # not log.level: the access log is no level (logs.py)
            first=self.first,
        )
        self.draining = False
        self.idle_grace = 0.0  # set when draining starts: see downstream.ClientConnection.drain
        self.connections: set[Connection] = set()
        self.hooks: WorkerHooks | None = None
        self._accept_paused = False
        self._rid_prefix = os.urandom(8).hex()
        # Starts at 2**60 so that its hex has 16 digits. An id is `_rid_head` (the prefix and all
        # but the counter's last three digits, made once per 4096 ids) + one of `_LOW_DIGITS`.
        self._rid_counter = 1 << 60
        self._rid_head = self._rid_prefix + hex(self._rid_counter >> 12)[2:]

    def apply_peers(
        self, dynamic: Sequence[tuple[int, Upstream]], self_address: Address | None
    ) -> tuple[list[str], list[str]]:
        """Swap in a new list of backups from DNS, `(metric slot, server)` each, and the address
        taken as this box's own; returns the (added, removed) address texts.

        Called between two requests (a timer of the worker's loop), never during one. A peer that
        stays keeps its Peer object: its health, in-flight count and pool. An exchange in flight
        keeps the Peer objects it holds; a removed peer's idle connections are closed and the ones
        still busy are not pooled again (keepalive 0). An exchange in the middle of its walk goes
        on through the order it started with (exchange.Exchange.order).
        """
        up = self.cfg.upstream
        static = len(up.servers)
        old = {p.address: p for p in self.peers[static:]}
        peers = self.peers[:static]
        added: list[str] = []
        for slot, conf in dynamic:
            text = conf.address.text
            peer = old.get(text)
            if peer is not None and peer.index == slot:
                del old[text]
            else:
                host = conf.address.host
                family = int(socket.AF_INET6 if ":" in host else socket.AF_INET)
                peer = Peer(slot, conf, up, (family, (host, conf.address.port)))
                self.events.metrics.server_state(slot, True, 0)  # the slot's last owner's gauges
                added.append(text)
            peers.append(peer)
        again = set(added)  # an address that moved to another slot was not removed
        removed = [p.address for p in old.values() if p.address not in again]
        for peer in old.values():
            peer.keepalive = 0
            peer.close_idle()
        by_address = {p.address: p for p in peers}
        servers = [*up.servers, *[conf for _, conf in dynamic]]
        ordered = policy.server_order(servers, self_address)
        for peer in peers:
            peer.share_load(self.share)
        self.peers = peers
        self.order = [by_address[s.address.text] for s in ordered]
        self._set_room(self_address)
        first = self.order[0] if self.order else None
        if first is not self.first:
            self.first = first
            self.events = Events(self.events.metrics, access=self.events.access, first=first)
        return added, removed

    def _set_room(self, self_address: Address | None) -> None:
        """The `room` overflow policy (balance.py), for a UNIX primary with backups; None under
        `overflow = "ring"` or another shape of server list, which walks the order as listed."""
        up = self.cfg.upstream
        order = self.order
        local = order[0] if order else None
        backups = [p for p in order if p.backup]
        if (
            up.overflow != "room"
            or local is None
            or not local.is_unix
            or local.backup
            or len(order) != 1 + len(backups)
            or not backups
        ):
            self.room = None
            return
        own_text = self_address.text if self_address is not None else None
        own = next((p for p in backups if p.address == own_text), None)
        peers = [p for p in backups if p is not own]
        room = self.room
        if room is None:
            self.room = Room(self.loop, local, own, peers, up.hold_timeout, self.share is not None,
                             up.slow_after, self.cfg.routes.shed_after, self.metrics)
        else:
            room.configure(local, own, peers)  # a new list from DNS: keep what was learned, held

    def learned(self) -> dict[str, Any]:
        """What this worker has learned, as /status shows it: per upstream address its
        `concurrency` and `service_ms` (those the overflow policy has figures for), and the
        slowest routes."""
        upstreams: dict[str, dict[str, Any]] = {}
        room = self.room
        if room is not None:
            upstreams = room.learned()
        return {"upstreams": upstreams, "routes": self.routes.slowest()}

    def error_page(self, status: int, *, close: bool, head: bool,
                   extra: bytes = b"") -> bytes | None:
        """The whole answer made from static.error_pages' page for `status`, or None: no page
        is configured for it, or it cannot be read (SPEC 10: then the plain-text answer)."""
        static = self.static
        if static is None or status not in self.error_statuses:
            return None
        page = static.error_page(status)
        if page is None:
            return None
        return page_response(status, page[0], page[1], close=close, head=head, extra=extra)

    def error_response(self, status: int, text: str, *, close: bool, head: bool,
                       extra: bytes = b"") -> bytes:
        """An answer failproxy makes itself: the error page for `status` when there is one, else
        a short plain-text one. `extra`: whole header lines to add (e.g. Retry-After)."""
        if self.error_statuses:
            page = self.error_page(status, close=close, head=head, extra=extra)
            if page is not None:
                return page
        return simple_response(status, text, close=close, head=head, extra=extra)

    def gzipper(self, status: int, head: bool, request_lines: list[bytes],
                lines: list[bytes], has_length: bool) -> Gzipper | None:
        """A Gzipper when this answer is compressed on its way to the client (SPEC 10);
        `has_length`: the answer is framed by its Content-Length (one of `lines`)."""
        comp = self.compress
        if comp is None:
            return None
        accept = header_list(request_lines, b"accept-encoding")
        length = None
        if has_length:
            value = header_value(lines, b"content-length")
            length = int(value) if value is not None and value.strip().isdigit() else None
        if not should_gzip(comp, status, head, accept, lines, length):
            return None
        return Gzipper(comp.level)

    def new_request_id(self) -> str:
        """32 hex digits, unique without a syscall: a random per-process prefix and a counter
        (os.urandom per request would cost a getrandom() call each). The counter's hex is
        formatted once per 4096 ids, its last three digits come from a table: one
        concatenation a request, where hex() and a slice cost ~1.5k instructions."""
        n = self._rid_counter + 1
        self._rid_counter = n
        low = n & 0xFFF
        if low == 0:
            self._rid_head = self._rid_prefix + hex(n >> 12)[2:]
        return self._rid_head + _LOW_DIGITS[low]

    def request_id_prefix(self) -> str:
        """The prefix of this worker's ids, for the C core, which makes its own after it with a
        counter of its own from 2**63 (this one counts from 2**60: the two never meet)."""
        return self._rid_prefix

    # -- connections ---------------------------------------------------------------------------

    def connection_opened(self, conn: Connection) -> None:
        self.connections.add(conn)
        self.events.connection_opened()
        if len(self.connections) >= self.max_connections and not self._accept_paused:
            self._accept_paused = True
            if self.hooks is not None:
                self.hooks.pause_accepting()

    def connection_replaced(self, old: Connection, new: Connection) -> None:
        """The C core handed a connection to the Python relay: the same connection, so no
        event and no count changes (proxy/_core.pyx)."""
        self.connections.discard(old)
        self.connections.add(new)

    def connection_closed(self, conn: Connection) -> None:
        self.connections.discard(conn)
        self.events.connection_closed()
        hooks = self.hooks
        if self._accept_paused and len(self.connections) < self.max_connections:
            self._accept_paused = False
            if hooks is not None and not self.draining:
                hooks.resume_accepting()
        if self.draining and not self.connections and hooks is not None:
            hooks.drained()
