"""One worker process: its event loop, its listeners, and how it stops.

The master forks workers that inherit its listening sockets (master.py). A worker builds the
state its connections share (`context.WorkerContext`), serves every listener, and stops on a
signal: QUIT gracefully (finish in-flight requests, up to `shutdown_timeout`), TERM/INT quickly.
USR1, which the master passes on after logrotate, reopens the log file. While it serves, a
timer puts what it has learned on its board once a second, for the master's /status
(metrics.WorkerMetrics.publish_learned).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from typing import Any

import uvloop
from setproctitle import getproctitle, setproctitle

from failproxy.config import Config
from failproxy.discovery.peertable import PeerTable, PeerWatch
from failproxy.proxy import rawtransport
from failproxy.proxy.context import WorkerContext
from failproxy.proxy.core import connection_factory
from failproxy.routing.loadshare import LoadShare, LoadSharing, LoadView
from failproxy.telemetry import jsonlog, logs
from failproxy.telemetry.metrics import WorkerMetrics
from failproxy.tls import server_context

QUICK_STOP_GRACE = 1.0  # TERM/INT: in-flight requests get at most this long (SPEC 6)
# QUIT/reload: an idle keep-alive connection stays open this long (at most shutdown_timeout) so
# that a request its client is sending as the worker starts draining is answered, not dropped.
IDLE_GRACE = 1.5
PUBLISH_EVERY = 1.0  # seconds between two publications of what the worker learned (/status)


class Worker:
    """A worker's listeners and its stop; implements `context.WorkerHooks`."""

    def __init__(
        self,
        cfg: Config,
        metrics: WorkerMetrics,
        loop: asyncio.AbstractEventLoop,
        share: LoadSharing | None = None,
    ) -> None:
        self.cfg = cfg
        self.loop = loop
        self.metrics = metrics
        self.ctx = WorkerContext(cfg, metrics, loop, share)
        self.ctx.hooks = self
        self.log: Any = logs.get_logger().bind()
        self.servers_listening: list[asyncio.AbstractServer] = []
        self._listeners: list[tuple[socket.socket, bool]] = []
        self._stopped: asyncio.Future[None] = loop.create_future()
        self._forced = False
        self._publisher: asyncio.TimerHandle | None = None
        self._publish_failed = False

    # -- what it learned, for /status ---------------------------------------------------------

    def start_publishing(self) -> None:
        """Publish now, then every PUBLISH_EVERY seconds: a timer of its own, so the request
        path pays nothing and the master reads figures at most a second old."""
        self._publish()

    def stop_publishing(self) -> None:
        if self._publisher is not None:
            self._publisher.cancel()
            self._publisher = None

    def _publish(self) -> None:
        self._publisher = self.loop.call_later(PUBLISH_EVERY, self._publish)
        try:
            self.metrics.publish_learned(self.ctx.learned())
        except Exception as exc:  # /status must never cost a request; said once, not each second
            if not self._publish_failed:
                self._publish_failed = True
                self.log.warning("learned_publish_failed", detail=repr(exc),
                                 worker_pid=os.getpid())

    # -- listening -----------------------------------------------------------------------------

    async def start(self, listeners: list[socket.socket]) -> None:
        tls_addrs = {a.text for a in self.cfg.server.tls_listen}
        for sock in listeners:
            self._listeners.append((sock, _sock_address(sock) in tls_addrs))
        await self._listen()

    async def _listen(self) -> None:
        """Serve every listener. Each server gets a dup of the shared socket, so that closing it
        (to stop accepting) leaves the listening socket itself, and its queue, to the others."""
        server_cfg = self.cfg.server
        ssl_ctx = None
        for sock, tls in self._listeners:
            if tls and ssl_ctx is None:
                ssl_ctx = server_context(server_cfg)
            dup = sock.dup()
            dup.setblocking(False)
            factory = connection_factory(self.ctx, tls)
            if dup.family == socket.AF_UNIX:
                srv = await self.loop.create_unix_server(
                    factory, sock=dup, ssl=ssl_ctx if tls else None, backlog=server_cfg.backlog
                )
            else:
                srv = await self.loop.create_server(
                    factory, sock=dup, ssl=ssl_ctx if tls else None, backlog=server_cfg.backlog
                )
            if self.ctx.draining:  # stopped while a resume_accepting() was under way
                srv.close()
                return
            self.servers_listening.append(srv)

    def pause_accepting(self) -> None:
        self._close_listening()

    def resume_accepting(self) -> None:
        self.loop.create_task(self._listen())

    def drained(self) -> None:
        if not self._stopped.done():
            self._stopped.set_result(None)

    def _close_listening(self) -> None:
        for srv in self.servers_listening:
            srv.close()
        self.servers_listening.clear()

    # -- stopping --------------------------------------------------------------------------------

    def graceful_stop(self, timeout: float, idle_grace: float = IDLE_GRACE) -> None:
        """Stop accepting, let in-flight requests finish (keep-alive ones get Connection: close);
        idle connections are kept `idle_grace` for a request already on its way (SPEC 6 QUIT)."""
        ctx = self.ctx
        if ctx.draining:
            return
        ctx.draining = True
        ctx.idle_grace = min(idle_grace, timeout)
        ctx.events.worker_stopping()
        _title_stopping()
        self._close_listening()
        self.metrics.stopped_accepting()
        for conn in list(ctx.connections):
            conn.drain(ctx.idle_grace)
        if not ctx.connections:
            self.drained()
        self.loop.call_later(timeout, self._force_stop)

    def quick_stop(self) -> None:
        self.graceful_stop(QUICK_STOP_GRACE, idle_grace=0.0)

    def _force_stop(self) -> None:
        self._forced = True
        for conn in list(self.ctx.connections):
            conn.abort()
        self.drained()

    async def wait_stopped(self) -> None:
        while True:
            await self._stopped
            if self._forced:
                break
            # A connection the kernel handed over as draining began may still wait in uvloop's
            # queue (its connection_made not run yet): let it arrive before calling it a day,
            # or the process would exit under it and its client see a close without an answer.
            for _ in range(3):
                await asyncio.sleep(0)
            if not self.ctx.connections:
                break
            self._stopped = self.loop.create_future()
        for peer in self.ctx.peers:
            peer.close_idle()
        await asyncio.sleep(0)


def _title_stopping() -> None:
    """`ps` tells a draining worker from a serving one (nginx: "worker process is shutting
    down"). Only a title the master gave: a worker run in a test process leaves it alone."""
    title = getproctitle()
    if title.startswith("failproxy worker[") and not title.endswith(" (stopping)"):
        setproctitle(title + " (stopping)")


def _sock_address(sock: socket.socket) -> str:
    name = sock.getsockname()
    if isinstance(name, str):
        return "unix:" + name
    host, port = name[0], name[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _reopen_log(worker: Worker) -> None:
    """USR1: write the log to a new file at `log.file` (SPEC 6, after logrotate renamed it).
    Requests in flight are not touched: their lines, like every later one, go to the new file;
    a line gathered before the signal is written to the old one first. When the file cannot be
    opened (say, a dropped-privileges worker and a directory it cannot write), the old one is
    kept and the failure logged there."""
    try:
        path = logs.reopen()
    except OSError as exc:
        worker.log.warning("log_reopen_failed", detail=str(exc), worker_pid=os.getpid())
        return
    if path:
        worker.log.info("log_reopened", file=path, worker_pid=os.getpid())


def worker_main(cfg: Config, listeners: list[socket.socket], metrics: WorkerMetrics,
                peers: PeerTable | None = None,
                load: tuple[LoadShare, int] | None = None) -> int:
    """Run one worker until a signal stops it; returns the exit code.

    `peers`: the master's current peer list (peertable.py), applied before the first request
    and checked again now and then. `load`: the generation's load table and this worker's
    column in it (loadshare.py)."""
    logs.configure(cfg.log)
    if rawtransport.SOCKIO is not None:
        # write(2) with the GIL kept, as the upstream sockets' (its one thread is this one)
        jsonlog.use_writer(rawtransport.SOCKIO.write)
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    share = LoadView(load[0], load[1], loop) if load is not None else None
    worker = Worker(cfg, metrics, loop, share)
    if peers is not None:
        watch = PeerWatch(peers, cfg.upstream, worker.ctx, worker.log)
        watch.check()
        watch.start(loop)
    parent = os.getppid()

    def watch_parent() -> None:
        if os.getppid() != parent:
            worker.graceful_stop(cfg.server.shutdown_timeout)
        else:
            loop.call_later(1.0, watch_parent)

    def on_loop_error(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        # exc_info: `exception` then holds the whole traceback, not only the exception's repr.
        worker.log.error("internal_error", detail=context.get("message"),
                         exc_info=exc if isinstance(exc, BaseException) else None)

    loop.set_exception_handler(on_loop_error)
    loop.add_signal_handler(signal.SIGQUIT, worker.graceful_stop, cfg.server.shutdown_timeout)
    loop.add_signal_handler(signal.SIGTERM, worker.quick_stop)
    loop.add_signal_handler(signal.SIGINT, worker.quick_stop)
    loop.add_signal_handler(signal.SIGUSR1, _reopen_log, worker)
    for sig in (signal.SIGHUP, signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU):
        loop.add_signal_handler(sig, lambda: None)  # the master's business, not ours

    async def serve() -> None:
        # The master forks us with USR1 blocked (master.HELD), so that one it passed on before
        # the handler above existed waited instead of killing us. Let through only now: uvloop
        # hears of a signal through its self-pipe, which exists only while the loop runs (one
        # run, so never paused); one delivered before would be noted and left until the next.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1, signal.SIGQUIT,
                                                    signal.SIGTERM, signal.SIGINT})
        await worker.start(listeners)
        metrics.ready()
        worker.start_publishing()
        loop.call_later(1.0, watch_parent)
        await worker.wait_stopped()
        worker.stop_publishing()

    try:
        loop.run_until_complete(serve())
    finally:
        # Closing the loop puts USR1 back to its default action (death): one passed on by the
        # master as this worker exits must not turn a clean exit into a killed one.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        worker.stop_publishing()
        metrics.flush()
        logs.flush()
        loop.close()
    return 0
