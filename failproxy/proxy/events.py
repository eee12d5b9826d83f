"""Where every SPEC 5 event of a worker is emitted, together with its metric.

One call per event does both, so silencing a log line (level, `log.access = false`) never drops
a counter, and a reader finds where a failover is logged and counted in one place. The hot
events (`request`, `failover`) go through a `jsonlog.Emitter`, which renders straight to JSON;
the rare ones go through structlog.

What an event needs of a request's walk is declared below as an abstract interface
(`ExchangeView`), so this module sits under the exchange and never imports it.
"""

from __future__ import annotations

import os
import time
from typing import Any, Final

import orjson
from mypy_extensions import trait

from failproxy.proxy.request import Request
from failproxy.routing import policy
from failproxy.routing.peer import Peer
from failproxy.telemetry import logs
from failproxy.telemetry.accessline import Render, render
from failproxy.telemetry.jsonlog import stamp
from failproxy.telemetry.metrics import WorkerMetrics

# Called once per request: held as module constants (a C static in the compiled build, where a
# module attribute is a dict lookup per call).
_render: Final[Render] = render
_loads: Final = orjson.loads


@trait
class ExchangeView:
    """One request's walk, as its events need it (exchange.Exchange implements it; a mypyc
    trait, so compiled code reads these attributes natively, see upstream.ResponseSink)."""

    __slots__ = ()

    req: Request
    client_ip: str
    attempt: int
    tried: tuple[str, ...]
    reasons: tuple[str, ...]
    status: int
    bytes_sent: int
    answered_by: Peer | None
    connect_ms: float | None
    started: float  # monotonic() when the request head began to arrive
    held_ms: float | None  # how long the overflow policy held it (None: not held)
    upstream_ms: float | None  # the app's own time: first byte sent to last byte read
    spilled: int  # request and answer bytes that went to temp files
    static: bool  # served from static.root
    route: str  # SPEC 4.4's route key
    slow: bool  # a slow route, as the overflow policy saw it

    def elapsed_ms(self) -> float:
        raise NotImplementedError


def request_fields(req: Request) -> dict[str, Any]:
    """The fields every log event about a request starts with."""
    return {
        "request_id": req.request_id or None,
        "method": req.method.decode("latin-1"),
        "path": req.url.decode("latin-1"),
    }


class Events:
    """This worker's log events and their metrics (SPEC 5 and 7)."""

    __slots__ = ("_failover", "_first", "_record", "_request", "access", "log", "metrics")

    def __init__(self, metrics: WorkerMetrics, *, access: bool, first: Peer | None) -> None:
        self.metrics = metrics
        self.log: Any = logs.get_logger().bind()
        self.access = access
        # `overflowed`: a server other than the first in order answered.
        self._first = first
        self._request = logs.emitter("request", "info")
        self._failover = logs.emitter("failover", "warning")

    # -- the walk ---------------------------------------------------------------------------

    def failover(
        self, ex: ExchangeView, src: Peer, dst: Peer, reason: str, err: int | None
    ) -> None:
        """Logged when decided, before the next attempt starts (SPEC 5)."""
        self.metrics.failover(src.index, dst.index, policy.REASON_INDEX[reason])
        emitter = self._failover
        if not emitter.enabled:
            return
        req = ex.req
        emitter.emit(
            {
                "event": "failover",
                "level": "warning",
                "timestamp": stamp(),
                "pid": emitter.pid,
                "request_id": req.request_id or None,
                "method": req.method.decode("latin-1"),
                "path": req.url.decode("latin-1"),
                "from": src.address,
                "to": dst.address,
                "reason": reason,
                "errno": policy.errno_name(err),
                "attempt": ex.attempt,
                "elapsed_ms": ex.elapsed_ms(),
                "route": ex.route,
                "route_class": "slow" if ex.slow else "fast",
            }
        )

    def shed(self, ex: ExchangeView) -> None:
        """A slow-route request held past routes.shed_after: answered 503 (SPEC 4.4)."""
        req = ex.req
        self.log.warning(
            "shed",
            request_id=req.request_id or None,
            method=req.method.decode("latin-1"),
            path=req.url.decode("latin-1"),
            route=ex.route,
            held_ms=ex.held_ms,
        )

    def skipped(self, ex: ExchangeView, peer: Peer, now: float) -> None:
        self.log.info(
            "upstream_skipped",
            request_id=ex.req.request_id or None,
            address=peer.address,
            until=_wall_iso(peer.down_until - now),
        )

    def exhausted(self, ex: ExchangeView, status: int) -> None:
        self.metrics.exhausted()
        self.log.error(
            "upstream_exhausted",
            **request_fields(ex.req),
            tried=list(ex.tried),
            reasons=list(ex.reasons),
            status=status,
        )

    def upstream_request(self, peer: Peer) -> None:
        """An attempt that reached a server (a connection carries the request)."""
        self.metrics.upstream_request(peer.index)

    def connected(self, peer: Peer, seconds: float) -> None:
        self.metrics.connect_duration(peer.index, seconds)

    def upstream_invalid(self, ex: ExchangeView, peer: Peer, detail: str) -> None:
        self.log.warning(
            "upstream_invalid", request_id=ex.req.request_id or None, address=peer.address,
            detail=detail,
        )

    def internal_error(self, ex: ExchangeView | None, exc: BaseException, where: str) -> None:
        """A bug met by a handler (the catch-all): with its traceback, and what it cost."""
        fields = request_fields(ex.req) if ex is not None else {}
        self.log.error("internal_error", where=where, exc_info=exc, **fields)

    # -- passive health ---------------------------------------------------------------------

    def peer_down(self, peer: Peer) -> None:
        self.log.warning("upstream_down", address=peer.address, fails=peer.fails)
        self.metrics.server_state(peer.index, False, peer.fails)

    def peer_up(self, peer: Peer) -> None:
        self.log.info("upstream_up", address=peer.address, fails=0)
        self.metrics.server_state(peer.index, True, 0)

    def peer_fails(self, peer: Peer) -> None:
        """The failure count changed without a change of state."""
        self.metrics.server_state(peer.index, not peer.down_until, peer.fails)

    # -- the client side --------------------------------------------------------------------

    def temp_file_error(self, side: str, exc: OSError, req: Request) -> None:
        """A temp file could not be written or read back (SPEC 9): `side` is "request" (the
        client gets 503) or "response" (back-pressure instead, or the answer is cut)."""
        self.log.error(
            "temp_file_error", request_id=req.request_id or None, side=side,
            errno=policy.errno_name(exc.errno), detail=exc.strerror or str(exc),
        )

    def client_error(self, client_ip: str, status: int, detail: str, counted: bool = True) -> None:
        """Bad input, logged. Counted here unless an exchange carries it (`counted=False`):
        its end counts it then, once, with its real duration."""
        self.log.info("client_error", client=client_ip, status=status, detail=detail)
        if counted:
            self.metrics.request(status, 0.0)

    def request(self, ex: ExchangeView, now: float) -> None:
        """The access-log line and the request counters, once per answered request."""
        req = ex.req
        self.answered(now, ex.started, ex.status, req.request_id, req.method, req.url,
                      ex.bytes_sent, ex.client_ip, ex.answered_by, ex.tried, ex.attempt,
                      ex.connect_ms, ex.held_ms, ex.upstream_ms, ex.route, ex.spilled, ex.static)

    def answered(self, now: float, started: float, status: int, request_id: str, method: bytes,
                 url: bytes, bytes_sent: int, client_ip: str, answered: Peer | None,
                 tried: tuple[str, ...], attempt: int, connect_ms: float | None,
                 held_ms: float | None, upstream_ms: float | None, route: str, spilled: int,
                 static: bool) -> None:
        """`request` from the values themselves, with no walk to read them from: a request the
        C core let go of with its client (corebooks.py, logged 499). One it answered it renders
        itself (`rendered`)."""
        duration = int((now - started) * 1_000_000) / 1000
        self.metrics.request(status, duration / 1000.0)
        emitter = self._request
        if not self.access or not emitter.enabled:
            return
        # times are whole µs already (round(x, 3) costs ~2.5k instructions); the timestamp,
        # None, is the render's own (now)
        line = _render(None, emitter.pid, request_id or None, method, url, status, bytes_sent,
                       duration, client_ip, answered.address if answered is not None else None,
                       tried, attempt, answered is not None and answered is not self._first,
                       connect_ms, held_ms, upstream_ms, route, spilled, static)
        sink = emitter.sink
        if sink is not None:
            sink.write(line)
        else:  # the console format: structlog renders the event's fields
            emitter.emit(_loads(line))

    @property
    def lines(self) -> bool:
        """Is a `request` line written for each request (the access log on, and its event
        emitted)? Read once a worker by the C core, which renders its lines itself."""
        return self.access and self._request.enabled

    @property
    def pid(self) -> int:
        """The pid a `request` line names."""
        return self._request.pid

    def rendered(self, line: bytes) -> None:
        """`request`'s line for a request the C core answered, rendered there (`lines`), written.
        The core counts the request itself, into the same cells (WorkerMetrics.core_cells)."""
        emitter = self._request
        sink = emitter.sink
        if sink is not None:
            sink.write(line)
        else:  # the console format: structlog renders the event's fields
            emitter.emit(_loads(line))

    def connection_opened(self) -> None:
        self.metrics.connection_opened()

    def connection_closed(self) -> None:
        self.metrics.connection_closed()

    # -- the process ------------------------------------------------------------------------

    def worker_stopping(self) -> None:
        self.log.info("worker_stopping", worker_pid=os.getpid())


def _wall_iso(seconds_from_now: float) -> str:
    t = time.time() + max(0.0, seconds_from_now)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"
