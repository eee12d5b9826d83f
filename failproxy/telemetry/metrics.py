"""Counters summed over every worker, written on the hot path without a lock or a syscall.

Each worker writes only its own slot: an anonymous shared mmap that the master maps before it
forks the worker, viewed as int64 counters ('q') and float64 sums ('d'). Aligned 8-byte stores
are single instructions, so the master reads live slots while workers write them. When the
master reaps a worker it folds the slot's final values into a `Totals` keyed by upstream
address text, so every counter stays monotonic across worker restarts, TTIN/TTOU and reloads
that change the server list. Server indexes on the hot path are positions in
`config.upstream.servers`, then the slots reserved for peers from DNS (`max_peers` per
`[[upstream.peers]]`, discovery/watch.py); reasons are positions in `reasons.REASONS`. A DNS slot
that passes to another address is folded first (`Totals.fold_server`), as a retired worker is.

Each worker also has a board, a second shared mmap: what it has learned (WorkerContext.learned)
as one JSON blob that a timer rewrites once a second and the master reads for /status. A
sequence number makes it a seqlock: odd while the blob is being written, so a reader that sees
it odd, or changed across its copy, drops the copy (`publish_learned`, `read_learned`).
"""

from __future__ import annotations

import asyncio
import mmap
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from failproxy.reasons import REASONS
from failproxy.telemetry import turnend
from failproxy.telemetry.slot import SlotWriter, SlotWriting

DURATION_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0
)
# tuple[float, ...], not a fixed-length tuple: mypyc 1.x inverts the is-it-set check of a
# fixed tuple of floats in `len()` ("value for final name ... was not set"), tests/test_discovery.py
CONNECT_BUCKETS: Final[tuple[float, ...]] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 1.0
)

_STATUSES: Final = 600  # slot per status code; anything outside 0..599 is counted under 0
_N_REASONS: Final = len(REASONS)
BOARD_BYTES: Final = 64 * 1024  # one worker's board: sequence, length, then the JSON blob
_BOARD_HEAD: Final = 16  # two int64: the sequence (odd while writing) and the blob's length
_READ_TRIES: Final = 4  # a write takes microseconds; a writer stopped mid-write is not awaited
# The `ready` slot: 0 starting, then READY (accepting), then STOPPED_ACCEPTING (draining).
READY: Final = 1
STOPPED_ACCEPTING: Final = 2


class _Layout:
    """Offsets of each counter inside one worker's slot."""

    __slots__ = (
        "active",
        "buffering",
        "connect",
        "core",
        "down",
        "duration",
        "exhausted",
        "failovers",
        "fails",
        "handovers",
        "held",
        "n_d",
        "n_q",
        "ready",
        "server_failovers",
        "server_requests",
        "status",
        "temp_bytes",
    )

    def __init__(self, n: int) -> None:
        offset = 0

        def take(count: int) -> int:
            nonlocal offset
            start, offset = offset, offset + count
            return start

        self.status = take(_STATUSES)
        self.duration = take(len(DURATION_BUCKETS) + 1)
        self.exhausted = take(1)
        self.core = take(1)
        self.handovers = take(1)
        self.active = take(1)
        self.ready = take(1)
        self.temp_bytes = take(1)
        self.buffering = take(1)
        self.held = take(1)
        self.server_requests = take(n)
        self.server_failovers = take(n)
        self.fails = take(n)
        self.down = take(n)
        self.failovers = take(n * n * _N_REASONS)
        self.connect = take(n * (len(CONNECT_BUCKETS) + 1))
        self.n_q = offset
        self.n_d = 1 + n  # duration sum, then one connect-time sum per server


class WorkerMetrics:
    """Counters of one worker, in shared memory the master can read (see module docstring).

    The hot path's writes go through `slot.SlotWriter`: one C store each into the slot in the
    compiled build, gathered in lists and written once per loop iteration (once a worker's loop
    is attached, `attach`) in the pure one. Either way the master sees a request's counts by the
    end of the loop iteration that answered it. Unattached (the master, tests), every change is
    written at once."""

    __slots__ = ("_bb", "_board", "_bq", "_count_connect", "_count_request",
                 "_count_upstream_request", "_d",
                 "_layout", "_learned", "_learned_seq", "_mm", "_q", "_w", "n_servers")

    def __init__(self, n_servers: int, writer: Callable[..., SlotWriting] = SlotWriter) -> None:
        """`writer`: which twin writes the hot path's changes (tests/test_slot.py runs both)."""
        layout = _Layout(n_servers)
        size = (layout.n_q + layout.n_d) * 8
        self._mm: mmap.mmap | None = mmap.mmap(-1, size)  # anonymous, MAP_SHARED: survives fork
        view = memoryview(self._mm)
        self._q = view[: layout.n_q * 8].cast("q")
        self._d = view[layout.n_q * 8 : size].cast("d")
        view.release()
        self._layout = layout
        self.n_servers = n_servers
        self._w: SlotWriting = writer(self._q, self._d, layout, n_servers, _N_REASONS,
                                      DURATION_BUCKETS, CONNECT_BUCKETS)
        # The writes of every request (and every new upstream connection), as bound methods
        # kept once: `self._w.request(...)` is a call by name, the method looked up on the
        # twin's type each time (~100 instructions, bench.profiles.realsock).
        self._count_request: Callable[[int, float], None] = self._w.request
        self._count_upstream_request: Callable[[int], None] = self._w.upstream_request
        self._count_connect: Callable[[int, float], None] = self._w.connect_duration
        # The board (module docstring): its own mmap, so the counters' layout stays as it is.
        self._board: mmap.mmap | None = mmap.mmap(-1, BOARD_BYTES)
        board = memoryview(self._board)
        self._bq = board[:_BOARD_HEAD].cast("q")  # [0] sequence, [1] blob length
        self._bb = board[_BOARD_HEAD:]
        board.release()
        self._learned: dict[str, Any] | None = None  # the reader's last whole blob, parsed
        self._learned_seq = 0

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """From now on, gather changes and write them once per iteration of `loop` (the pure
        twin; the compiled one writes each at once)."""
        self._w.attach(turnend.of(loop))

    def flush(self) -> None:
        """Write the gathered changes to shared memory (a stopping worker, last)."""
        if self._mm is not None:
            self._w.flush()

    # -- hot path ---------------------------------------------------------------------------

    def request(self, status: int, duration: float) -> None:
        self._count_request(status, duration)

    def upstream_request(self, server: int) -> None:
        self._count_upstream_request(server)

    def failover(self, from_server: int, to_server: int, reason: int) -> None:
        self._w.failover(from_server, to_server, reason)

    def exhausted(self) -> None:
        self._w.add(self._layout.exhausted, 1)

    def core_answered(self) -> None:
        """A request the C core answered itself (proxy/_core.pyx)."""
        self._w.add(self._layout.core, 1)

    def core_cells(self) -> tuple[SlotWriting, int, int]:
        """The C core's way in: the writer, and the cells of `core_answered` and
        `core_handed_over`. Where the writer is the compiled one the core makes its requests'
        counts as C calls into it (`request`, `upstream_request`, `connect_duration` and its
        own two), not Python calls into here; the cells are the same."""
        return self._w, self._layout.core, self._layout.handovers

    def core_handed_over(self) -> None:
        """A request the C core gave to the Python relay to answer, with its connection (at a
        request boundary, its head whole or not, or with the request in flight)."""
        self._w.add(self._layout.handovers, 1)

    def connect_duration(self, server: int, seconds: float) -> None:
        self._count_connect(server, seconds)

    def connection_opened(self) -> None:
        self._w.add(self._layout.active, 1)

    def connection_closed(self) -> None:
        self._w.add(self._layout.active, -1)

    def temp_file_bytes(self, delta: int) -> None:
        """Gauge: bytes this worker holds in temp files now (request and answer bodies)."""
        self._w.add(self._layout.temp_bytes, delta)

    def body_buffering(self, delta: int) -> None:
        """Gauge: request bodies being read whole before any upstream is contacted."""
        self._w.add(self._layout.buffering, delta)

    def held_requests(self, delta: int) -> None:
        """Gauge: requests held in this worker waiting for a free app worker (overflow)."""
        self._w.add(self._layout.held, delta)

    def server_state(self, server: int, up: bool, fails: int) -> None:
        """Gauges: written at once (rare)."""
        layout = self._layout
        self._q[layout.down + server] = 0 if up else 1
        self._q[layout.fails + server] = fails

    # -- process life -----------------------------------------------------------------------------

    def ready(self) -> None:
        """The worker accepts connections: the master may now retire what this one replaces."""
        self._q[self._layout.ready] = READY

    def stopped_accepting(self) -> None:
        """The worker has closed its accepting sockets for good (it drains): the master logs
        `reloaded` only once every older worker says this, so a connection made after that
        event is accepted under the new configuration, never by a worker about to leave."""
        self._q[self._layout.ready] = STOPPED_ACCEPTING

    def is_ready(self) -> bool:
        return self._mm is not None and self._q[self._layout.ready] >= READY

    def has_stopped_accepting(self) -> bool:
        return self._mm is not None and self._q[self._layout.ready] == STOPPED_ACCEPTING

    # -- the board: what the worker learned, for /status -------------------------------------

    def publish_learned(self, data: dict[str, Any]) -> None:
        """Write `data` (WorkerContext.learned()) to the board, as JSON; what does not fit is
        dropped (`_fit`). Called by a timer once a second, never on the request path. The
        sequence is odd from before the first byte changes until after the last one has."""
        if self._board is None:
            return
        blob = _fit(data, BOARD_BYTES - _BOARD_HEAD)
        bq = self._bq
        seq = bq[0]
        bq[0] = seq + 1
        bq[1] = len(blob)
        self._bb[: len(blob)] = blob
        bq[0] = seq + 2

    def read_learned(self) -> dict[str, Any] | None:
        """The worker's last whole blob, parsed; None before its first. A copy made while the
        worker writes (sequence odd, or not the same after the copy) is never parsed: the blob
        read before is returned instead. The JSON check is a last guard (a CPU that reorders
        stores; on x86 they stay in order)."""
        if self._board is None:
            return None
        bq = self._bq
        for _ in range(_READ_TRIES):
            seq = bq[0]
            if seq == self._learned_seq:
                break  # unchanged since the last read: no copy, no parse
            if seq & 1:
                continue
            length = bq[1]
            if not 0 < length <= BOARD_BYTES - _BOARD_HEAD:
                continue
            blob = bytes(self._bb[:length])
            if bq[0] != seq:
                continue
            try:
                data = orjson.loads(blob)
            except orjson.JSONDecodeError:
                continue
            if isinstance(data, dict):
                self._learned = data
                self._learned_seq = seq
            break
        return self._learned

    def close(self) -> None:
        """Unmap the slot (the master after folding it; a worker for its siblings' slots)."""
        if self._mm is None:
            return
        self._w.release()
        self._q.release()
        self._d.release()
        self._mm.close()
        self._mm = None
        if self._board is not None:
            self._bq.release()
            self._bb.release()
            self._board.close()
            self._board = None

    def snapshot(self) -> tuple[list[int], list[float]]:
        return self._q.tolist(), self._d.tolist()  # type: ignore[return-value]


def _fit(data: dict[str, Any], limit: int) -> bytes:
    """`data` as JSON of at most `limit` bytes. Too long, entries are dropped from the end of
    `routes` (the fastest: the list is slowest first), then of `upstreams`; `{}` as a last
    resort. Each round drops about the excess at once, so one or two encodings do."""
    blob = orjson.dumps(data)
    if len(blob) <= limit:
        return blob
    routes = list(data.get("routes") or [])
    upstreams = list(dict(data.get("upstreams") or {}).items())
    while len(blob) > limit:
        excess = len(blob) - limit
        if routes:
            while routes and excess > 0:
                excess -= len(orjson.dumps(routes.pop())) + 1  # and its comma
        elif upstreams:
            while upstreams and excess > 0:
                excess -= len(orjson.dumps(dict([upstreams.pop()]))) - 1  # braces less comma
        else:
            return b"{}"
        blob = orjson.dumps({**data, "upstreams": dict(upstreams), "routes": routes})
    return blob


Snapshot = tuple[list[int], list[float]]  # one worker's int64 and float64 cells


@dataclass
class Totals:
    """Figures summed over workers, keyed by label text rather than by index."""

    status: Counter[int] = field(default_factory=Counter)
    duration: list[int] = field(default_factory=lambda: [0] * (len(DURATION_BUCKETS) + 1))
    duration_sum: float = 0.0
    exhausted: int = 0
    server_requests: Counter[str] = field(default_factory=Counter)
    server_failovers: Counter[str] = field(default_factory=Counter)
    failovers: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    connect: dict[str, list[int]] = field(default_factory=dict)
    connect_sum: dict[str, float] = field(default_factory=dict)
    # Gauges: only live workers contribute.
    active: int = 0
    temp_bytes: int = 0
    buffering: int = 0
    held: int = 0
    fails: Counter[str] = field(default_factory=Counter)
    down: Counter[str] = field(default_factory=Counter)  # how many workers hold it down
    core: int = 0  # answered by the C core
    handovers: int = 0  # requests the C core handed to the relay

    def copy(self) -> Totals:
        return Totals(
            Counter(self.status), list(self.duration), self.duration_sum, self.exhausted,
            Counter(self.server_requests), Counter(self.server_failovers), Counter(self.failovers),
            {k: list(v) for k, v in self.connect.items()}, dict(self.connect_sum),
            self.active, self.temp_bytes, self.buffering, self.held, Counter(self.fails),
            Counter(self.down), self.core, self.handovers,
        )

    def add(self, metrics: WorkerMetrics, addresses: Sequence[str | None], *, gauges: bool,
            base: Snapshot | None = None) -> None:
        """Add one worker's slot; `addresses[i]` is the text of its server i (None: a slot no
        server ever used). `base`: counts already folded away (`fold_server`), subtracted."""
        q, d = metrics.snapshot()
        if base is not None:
            q = [a - b for a, b in zip(q, base[0], strict=True)]
            d = [a - b for a, b in zip(d, base[1], strict=True)]
        self._add(q, d, metrics.n_servers, addresses, gauges)

    def fold_server(self, metrics: WorkerMetrics, addresses: Sequence[str | None], server: int,
                    base: Snapshot | None) -> Snapshot:
        """Server slot `server` is about to count for another address: add what it counted so
        far (for `addresses[server]`) and return the new `base` that keeps it from being
        counted again. The worker's own memory is only read, never reset (it may be writing)."""
        q, d = metrics.snapshot()
        n = metrics.n_servers
        base_q, base_d = base if base is not None else ([0] * len(q), [0.0] * len(d))
        base_q, base_d = list(base_q), list(base_d)
        delta_q, delta_d = [0] * len(q), [0.0] * len(d)
        cells, sums = _server_cells(_Layout(n), n, server)
        for c in cells:
            delta_q[c] = q[c] - base_q[c]
            base_q[c] = q[c]
        for c in sums:
            delta_d[c] = d[c] - base_d[c]
            base_d[c] = d[c]
        self._add(delta_q, delta_d, n, addresses, False)
        return base_q, base_d

    def _add(self, q: list[int], d: list[float], n: int, addresses: Sequence[str | None],
             gauges: bool) -> None:
        layout = _Layout(n)
        for status in range(_STATUSES):
            if q[status]:
                self.status[status] += q[status]
        for i in range(len(self.duration)):
            self.duration[i] += q[layout.duration + i]
        self.duration_sum += d[0]
        self.exhausted += q[layout.exhausted]
        self.core += q[layout.core]
        self.handovers += q[layout.handovers]
        width = len(CONNECT_BUCKETS) + 1
        named = [(i, a) for i, a in enumerate(addresses[:n]) if a is not None]
        for i, address in named:
            self.server_requests[address] += q[layout.server_requests + i]
            self.server_failovers[address] += q[layout.server_failovers + i]
            hist = self.connect.setdefault(address, [0] * width)
            base = layout.connect + i * width
            for b in range(width):
                hist[b] += q[base + b]
            self.connect_sum[address] = self.connect_sum.get(address, 0.0) + d[1 + i]
            for j, to_address in named:
                base = layout.failovers + (i * n + j) * _N_REASONS
                for r, reason in enumerate(REASONS):
                    if q[base + r]:
                        self.failovers[(address, to_address, reason)] += q[base + r]
            if gauges:
                self.fails[address] += q[layout.fails + i]
                self.down[address] += q[layout.down + i]
        if gauges:
            self.active += q[layout.active]
            self.temp_bytes += q[layout.temp_bytes]
            self.buffering += q[layout.buffering]
            self.held += q[layout.held]


def _server_cells(layout: _Layout, n: int, server: int) -> tuple[list[int], list[int]]:
    """The counter cells (int64, float64) that belong to server `server`: its requests,
    failovers away, connect histogram and time, and the failover matrix row and column."""
    width = len(CONNECT_BUCKETS) + 1
    cells = [layout.server_requests + server, layout.server_failovers + server]
    cells += range(layout.connect + server * width, layout.connect + (server + 1) * width)
    for other in range(n):
        row = layout.failovers + (server * n + other) * _N_REASONS
        cells += range(row, row + _N_REASONS)
        if other != server:
            col = layout.failovers + (other * n + server) * _N_REASONS
            cells += range(col, col + _N_REASONS)
    return cells, [1 + server]


# -- Prometheus text exposition (format 0.0.4) ---------------------------------------------------

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**labels: str) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


class _Page:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float, **labels: str) -> None:
        self.lines.append(f"{name}{_labels(**labels)} {_number(value)}")

    def histogram(self, name: str, bounds: Sequence[float], counts: Sequence[int], total: float,
                  **labels: str) -> None:
        cumulative = 0
        for bound, count in zip(bounds, counts, strict=False):
            cumulative += count
            self.sample(f"{name}_bucket", cumulative, **labels, le=repr(bound))
        cumulative += counts[len(bounds)]
        self.sample(f"{name}_bucket", cumulative, **labels, le="+Inf")
        self.sample(f"{name}_sum", total, **labels)
        self.sample(f"{name}_count", cumulative, **labels)


def render(totals: Totals, servers: Iterable[str], workers: int) -> str:
    """The /metrics page. `servers`: current upstream addresses, in config order (for gauges)."""
    servers = list(servers)
    known = list(dict.fromkeys([*servers, *totals.server_requests]))
    page = _Page()
    page.family("failproxy_requests_total", "counter", "Client requests answered, by status.")
    for status in sorted(totals.status):
        page.sample("failproxy_requests_total", totals.status[status], status=str(status))
    page.family("failproxy_request_duration_seconds", "histogram",
                "Time from request head to the end of the response.")
    page.histogram("failproxy_request_duration_seconds", DURATION_BUCKETS, totals.duration,
                   totals.duration_sum)
    page.family("failproxy_upstream_requests_total", "counter",
                "Requests sent to each upstream server (attempts that connected).")
    for address in known:
        page.sample("failproxy_upstream_requests_total", totals.server_requests[address],
                    upstream=address)
    page.family("failproxy_failovers_total", "counter",
                "Requests moved from one server to the next, by reason.")
    for (src, dst, reason), count in sorted(totals.failovers.items()):
        page.sample("failproxy_failovers_total", count, **{"from": src, "to": dst}, reason=reason)
    page.family("failproxy_upstream_exhausted_total", "counter",
                "Requests that reached no server (answered 502/504).")
    page.sample("failproxy_upstream_exhausted_total", totals.exhausted)
    page.family("failproxy_core_requests_total", "counter",
                "Requests the C core answered itself (0 with FAILPROXY_CORE=0), of all requests.")
    page.sample("failproxy_core_requests_total", totals.core)
    page.family("failproxy_core_handovers_total", "counter",
                "Requests the C core handed to the Python relay to answer, with their "
                "connection: whole, in part, or in flight (0 with FAILPROXY_CORE=0).")
    page.sample("failproxy_core_handovers_total", totals.handovers)
    page.family("failproxy_upstream_connect_duration_seconds", "histogram",
                "Time to connect to an upstream server.")
    for address in known:
        counts = totals.connect.get(address) or [0] * (len(CONNECT_BUCKETS) + 1)
        page.histogram("failproxy_upstream_connect_duration_seconds", CONNECT_BUCKETS, counts,
                       totals.connect_sum.get(address, 0.0), upstream=address)
    page.family("failproxy_connections_active", "gauge", "Open client connections.")
    page.sample("failproxy_connections_active", totals.active)
    page.family("failproxy_temp_file_bytes", "gauge",
                "Request and answer body bytes held in temp files now.")
    page.sample("failproxy_temp_file_bytes", totals.temp_bytes)
    page.family("failproxy_request_bodies_buffering", "gauge",
                "Request bodies being read whole before an upstream is contacted.")
    page.sample("failproxy_request_bodies_buffering", totals.buffering)
    page.family("failproxy_held_requests", "gauge",
                "Requests held in failproxy waiting for a free worker (overflow policy).")
    page.sample("failproxy_held_requests", totals.held)
    # With fail_timeout = 0 (the default, and SPEC 1's policy for the local socket) a server is
    # never held down, so this stays 1 whatever its state: its failures are in
    # failproxy_failovers_total{from=...} and its accept queue in failproxy_accept_queue_depth.
    page.family("failproxy_upstream_up", "gauge",
                "0 while some worker holds the server down after max_fails failures within "
                "fail_timeout; always 1 with fail_timeout = 0, which never marks it down "
                "(see failproxy_failovers_total).")
    for address in servers:
        page.sample("failproxy_upstream_up", 0 if totals.down[address] else 1, upstream=address)
    page.family("failproxy_upstream_fails", "gauge",
                "Failures counted towards max_fails, summed over workers.")
    for address in servers:
        page.sample("failproxy_upstream_fails", totals.fails[address], upstream=address)
    page.family("failproxy_workers", "gauge", "Live worker processes.")
    page.sample("failproxy_workers", workers)
    return "\n".join(page.lines) + "\n"


__all__ = ["BOARD_BYTES", "CONNECT_BUCKETS", "CONTENT_TYPE", "DURATION_BUCKETS", "REASONS",
           "Snapshot", "Totals", "WorkerMetrics", "render"]
