"""One worker process: its event loop, listeners, per-worker state, and the events it logs.

`Worker` holds what every connection of this process shares: the configuration read once into
plain attributes (no per-request lookups), the servers in order, the metrics, and the emitters
of the SPEC's log events (`failover`, `upstream_*`, `request`, `client_error`).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from typing import Any

import uvloop

from failproxy import logs, policy
from failproxy.client import ClientProtocol, header_kinds
from failproxy.config import Config
from failproxy.exchange import Exchange
from failproxy.headers import BadRequest, RequestHeadBuilder
from failproxy.metrics import WorkerMetrics
from failproxy.state import Server, build_servers
from failproxy.tls import server_context

QUICK_STOP_GRACE = 1.0  # TERM/INT: in-flight requests get at most this long (SPEC 6)


class Worker:
    """Per-process context shared by every connection."""

    def __init__(
        self, cfg: Config, metrics: WorkerMetrics, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.cfg = cfg
        self.loop = loop
        self.metrics = metrics
        self.log: Any = logs.get_logger().bind()
        self.server_cfg = cfg.server
        up = cfg.upstream
        self.servers: list[Server] = build_servers(up)
        by_address = {s.address: s for s in self.servers}
        ordered = policy.server_order(up.servers, up.self)
        self.order: tuple[Server, ...] = tuple(by_address[s.address.text] for s in ordered)
        self.first = self.order[0] if self.order else None
        self.retry_on = policy.expand_retry_on(up.retry_on)
        self.tries = up.tries
        self.retry_timeout = up.retry_timeout
        self.retry_non_idempotent = up.retry_non_idempotent
        self.retry_body_bytes = up.retry_body_bytes
        self.connect_timeout = up.connect_timeout
        self.read_timeout = up.read_timeout
        self.send_timeout = up.send_timeout
        self.head_builder = RequestHeadBuilder(cfg.headers)
        self.rid_header = self.head_builder.request_id_header
        self.xff_mode = cfg.headers.x_forwarded_for
        replaced = set()
        if cfg.headers.x_forwarded_proto:
            replaced.add(b"x-forwarded-proto")
        if cfg.headers.x_forwarded_host:
            replaced.add(b"x-forwarded-host")
        self.header_kinds = header_kinds(self.rid_header, self.xff_mode, frozenset(replaced))
        self.upstream_header = cfg.headers.upstream_header
        self.access_log = cfg.log.access and cfg.log.level in ("debug", "info")
        self.log_request = logs.event_logger("request", "info")
        self.log_failover_event = logs.event_logger("failover", "warning")
        self._rid_prefix = os.urandom(8).hex()
        self._rid_counter = 0
        self.draining = False
        self.connections: set[ClientProtocol] = set()
        self.servers_listening: list[asyncio.AbstractServer] = []
        self.accept_paused = False
        self._listeners: list[tuple[socket.socket, bool]] = []
        self._stopped: asyncio.Future[None] = loop.create_future()

    # -- connections ---------------------------------------------------------------------------

    def connection_opened(self, client: ClientProtocol) -> None:
        self.connections.add(client)
        self.metrics.connection_opened()
        if len(self.connections) >= self.server_cfg.max_connections and not self.accept_paused:
            self._pause_accepting()

    def connection_closed(self, client: ClientProtocol) -> None:
        self.connections.discard(client)
        self.metrics.connection_closed()
        if self.accept_paused and len(self.connections) < self.server_cfg.max_connections:
            self.accept_paused = False
            if not self.draining:
                self.loop.create_task(self._listen())
        if self.draining and not self.connections and not self._stopped.done():
            self._stopped.set_result(None)

    def new_request_id(self) -> str:
        """32 hex digits, unique without a syscall: a random per-process prefix and a counter
        (os.urandom per request would cost a getrandom() call each)."""
        self._rid_counter += 1
        return f"{self._rid_prefix}{self._rid_counter:016x}"

    # -- passive health ------------------------------------------------------------------------

    def server_failed(self, server: Server) -> None:
        if not server.fail_timeout:
            return
        if server.record_failure(self.loop.time()):
            self.log.warning("upstream_down", address=server.address, fails=server.fails)
        self.metrics.server_state(server.index, not server.down_until, server.fails)

    def server_ok(self, server: Server) -> None:
        """A success: clears a failure count or a down mark (callers check there is one)."""
        if server.down_until and server.record_success():
            self.log.info("upstream_up", address=server.address, fails=0)
            self.metrics.server_state(server.index, True, 0)
        elif server.fails:
            server.fails = 0
            self.metrics.server_state(server.index, True, 0)

    # -- log events (SPEC 5) ----------------------------------------------------------------------

    def log_skipped(self, ex: Exchange, server: Server) -> None:
        until = server.down_until - self.loop.time()
        self.log.info(
            "upstream_skipped",
            request_id=ex.req.request_id or None,
            address=server.address,
            until=_wall_iso(until),
        )

    def log_failover(
        self, ex: Exchange, server: Server, nxt: Server, reason: str, err: int | None
    ) -> None:
        self.metrics.failover(server.index, nxt.index, policy.REASON_INDEX[reason])
        fields = ex.req.log_fields()
        fields.update(
            {
                "from": server.address,
                "to": nxt.address,
                "reason": reason,
                "errno": policy.errno_name(err),
                "attempt": ex.attempt,
                "elapsed_ms": ex.elapsed_ms(),
            }
        )
        self.log_failover_event(fields)

    def log_exhausted(self, ex: Exchange, status: int) -> None:
        self.metrics.exhausted()
        self.log.error(
            "upstream_exhausted",
            **ex.req.log_fields(),
            tried=ex.tried,
            reasons=ex.reasons,
            status=status,
        )

    def log_client_error(self, client: ClientProtocol, error: BadRequest) -> None:
        self.log.info(
            "client_error", client=client.client_ip, status=error.status, detail=error.detail
        )
        self.metrics.request(error.status, 0.0)

    def request_done(self, ex: Exchange) -> None:
        duration = ex.elapsed_ms()
        self.metrics.request(ex.status, duration / 1000.0)
        if not self.access_log:
            return
        answered = ex.answered_by
        fields = ex.req.log_fields()
        fields.update(
            {
                "status": ex.status,
                "bytes_sent": ex.bytes_sent,
                "duration_ms": duration,
                "client": ex.client.client_ip,
                "upstream": answered.address if answered is not None else None,
                "upstreams": ex.tried,
                "tries": ex.attempt,
                "overflowed": answered is not None and answered is not self.first,
                "connect_ms": round(ex.connect_ms, 3) if ex.connect_ms is not None else None,
            }
        )
        self.log_request(fields)

    # -- listening -----------------------------------------------------------------------------

    async def start(self, listeners: list[socket.socket]) -> None:
        tls_addrs = {a.text for a in self.server_cfg.tls_listen}
        for sock in listeners:
            self._listeners.append((sock, _sock_address(sock) in tls_addrs))
        await self._listen()

    async def _listen(self) -> None:
        """Serve every listener. Each server gets a dup of the shared socket, so that closing it
        (to stop accepting) leaves the listening socket itself, and its queue, to the others."""
        ssl_ctx = None
        for sock, tls in self._listeners:
            if tls and ssl_ctx is None:
                ssl_ctx = server_context(self.server_cfg)
            dup = sock.dup()
            dup.setblocking(False)
            factory = _factory(self, tls)
            if dup.family == socket.AF_UNIX:
                srv = await self.loop.create_unix_server(
                    factory, sock=dup, ssl=ssl_ctx if tls else None, backlog=self.server_cfg.backlog
                )
            else:
                srv = await self.loop.create_server(
                    factory, sock=dup, ssl=ssl_ctx if tls else None, backlog=self.server_cfg.backlog
                )
            self.servers_listening.append(srv)

    def _pause_accepting(self) -> None:
        self.accept_paused = True
        self._close_listening()

    def _close_listening(self) -> None:
        for srv in self.servers_listening:
            srv.close()
        self.servers_listening.clear()

    # -- stopping --------------------------------------------------------------------------------

    def graceful_stop(self, timeout: float) -> None:
        """Stop accepting, let in-flight requests finish (keep-alive ones get Connection: close)."""
        if self.draining:
            return
        self.draining = True
        self.log.info("worker_stopping", worker_pid=os.getpid())
        self._close_listening()
        for client in list(self.connections):
            client.drain()
        if not self.connections and not self._stopped.done():
            self._stopped.set_result(None)
        self.loop.call_later(timeout, self._force_stop)

    def quick_stop(self) -> None:
        self.graceful_stop(QUICK_STOP_GRACE)

    def _force_stop(self) -> None:
        for client in list(self.connections):
            client.abort()
        if not self._stopped.done():
            self._stopped.set_result(None)

    async def wait_stopped(self) -> None:
        await self._stopped
        for server in self.servers:
            server.close_idle()
        await asyncio.sleep(0)


def _factory(worker: Worker, tls: bool) -> Any:
    def make() -> ClientProtocol:
        return ClientProtocol(worker, tls)

    return make


def _sock_address(sock: socket.socket) -> str:
    name = sock.getsockname()
    if isinstance(name, str):
        return "unix:" + name
    host, port = name[0], name[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _wall_iso(seconds_from_now: float) -> str:
    t = time.time() + max(0.0, seconds_from_now)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def worker_main(cfg: Config, listeners: list[socket.socket], metrics: WorkerMetrics) -> int:
    """Run one worker until a signal stops it; returns the exit code."""
    logs.configure(cfg.log)
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    worker = Worker(cfg, metrics, loop)
    parent = os.getppid()

    def watch_parent() -> None:
        if os.getppid() != parent:
            worker.graceful_stop(cfg.server.shutdown_timeout)
        else:
            loop.call_later(1.0, watch_parent)

    def on_loop_error(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        worker.log.error(
            "internal_error", detail=context.get("message"), exception=repr(exc) if exc else None
        )

    loop.set_exception_handler(on_loop_error)
    loop.add_signal_handler(signal.SIGQUIT, worker.graceful_stop, cfg.server.shutdown_timeout)
    loop.add_signal_handler(signal.SIGTERM, worker.quick_stop)
    loop.add_signal_handler(signal.SIGINT, worker.quick_stop)
    for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU):
        loop.add_signal_handler(sig, lambda: None)  # the master's business, not ours
    try:
        loop.run_until_complete(worker.start(listeners))
        metrics.ready()
        loop.call_later(1.0, watch_parent)
        loop.run_until_complete(worker.wait_stopped())
    finally:
        logs.flush()
        loop.close()
    return 0
