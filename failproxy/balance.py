"""Where a request goes: the overflow policy `room` (the default, SPEC 4.3).

The local app server is a pull-model preforking server: each of its W workers takes one
connection at a time, so a connection queued in its UNIX listener means every worker is busy.
A request goes to the local UNIX socket while the box has an idle worker as far as failproxy can
tell; otherwise to a peer with a known free worker, least loaded first; otherwise it is *held*
in failproxy (FIFO, bounded by `hold_timeout`) until one of those frees up, and past the bound it
queues at home, on the box's own TCP port, never cross-host (at capacity, moving queues between
boxes only adds hops). Chosen by simulation of the seed cluster against nginx's seed config,
today's ring and late binding (see bench/RESULTS.md and the README's "How failover decides").

What failproxy knows, cheaply and only locally:
- its requests awaiting an answer per destination (connected, no response head yet), summed
  over its worker processes (loadshare.py); the local UNIX socket and the own TCP port count
  together: they feed the same workers;
- the local listener's accept-queue depth (sock_diag, ~12-28 us: read at most once per loop
  turn, and only when the count says the last idle worker may be taken);
- W, learned: never configured. It starts at 1 and only grows. Past W a *probe* (a request
  sent locally while the queue is empty) tests for more workers, at most once per back-off
  interval (1 s, doubling to 64 s while it finds none). The queue is read every loop turn for
  PROBE_SPIN after it, then every PROBE_POLL up to PROBE_VERIFY; when two readings in a row
  see more requests in service than W (`awaiting - queued`: a pull-model server serves
  exactly what is not queued), W grows to that. Every turn, because a fast request can end
  before any fixed delay, taking the evidence with it (W stayed 1 under light load of
  millisecond requests, and 7 % of them left an idle box); two in a row, because a request
  whose answer is in our socket buffer, not yet read, still counts as awaiting while its
  worker takes the probe.
Connect errors still move the request on at once, with their reasons (exchange.py).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from typing import Final

from mypy_extensions import trait

from failproxy.peer import Peer
from failproxy.queue_depth import QueueProbe

# Called on the hot path, so held as module constants: in the compiled build a Final is a C
# static, where a from-import or a module attribute is a dict lookup per call (~150-300
# instructions each, bench.realsock).
monotonic: Final = time.monotonic

PROBE_VERIFY: Final = 0.02  # after a probe connects, how long to look whether a worker takes it
PROBE_SPIN: Final = 0.002  # ... every loop turn for this long (millisecond requests), then each
PROBE_POLL: Final = 0.001  # ... this often (an idle worker may wake late on a loaded box)
PROBE_RETRY: Final = 0.1  # nothing learned (the others ended first): the next probe after this
BACKOFF_MAX: Final = 64.0
RECENT_DECAY: Final = 1.0  # seconds: "sent lately", the load measure that breaks in-flight ties
RETRY_TICK: Final = 0.005  # several workers: another's completion may free a slot; look this often
SLOW_MEMORY: Final = 10.0  # seconds a slow local answer keeps the box from queueing at home
FAST_EVIDENCE: Final = 32  # fast local answers in a row before the box is trusted to be fast


@trait
class Holdable:
    """A request the policy may hold and send later (exchange.Exchange implements it)."""

    __slots__ = ()

    def resume(self, peer: Peer, reason: str, now: float) -> None:
        """Go to `peer` now; `reason` names why it is not the local socket ("" if it is)."""
        raise NotImplementedError


class Room:
    """The `room` policy of one worker (state: learned W, the held FIFO, recent sends)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        local: Peer,
        own: Peer | None,
        peers: list[Peer],
        hold_timeout: float,
        shared: bool,
        slow_after: float = 0.05,
    ) -> None:
        self._loop = loop
        self.local = local  # the UNIX socket
        self.own = own  # this box's own TCP port (`upstream.self`), if known
        self.peers = peers  # the other backups, in ring order
        self.hold_timeout = hold_timeout
        self._shared = shared  # several worker processes: look at held requests on a tick
        self._probe = QueueProbe(local.sockaddr if isinstance(local.sockaddr, str) else "")
        self.workers = 1  # W, learned
        self._probe_at = 0.0
        self._backoff = 1.0
        self._probing = False
        self._probe_until = 0.0  # a probe is watched until then
        self._probe_spin_until = 0.0
        self._seen = 0  # the last watch reading's requests in service (0: none counted)
        self._queued = -1  # the accept queue read this loop turn (-1: not read), plus connects
        self._recent = [0.0] * len(peers)
        self._recent_at = [0.0] * len(peers)
        self.held: deque[tuple[float, Holdable]] = deque()  # (deadline, request), FIFO
        self._timer: asyncio.TimerHandle | None = None
        self.slow_after = slow_after  # a local answer slower than this makes the box slow
        self._local_sent: dict[object, float] = {}  # this worker's local attempts: when sent
        self._fast_run = 0  # local answers in a row that came within slow_after
        self._slow_at = -1e9  # when a local answer last took longer than slow_after

    def configure(self, local: Peer, own: Peer | None, peers: list[Peer]) -> None:
        """A new server list (peers from DNS): the learned W and the held requests stay."""
        if local is not self.local:
            self.local = local
            self._probe = QueueProbe(local.sockaddr if isinstance(local.sockaddr, str) else "")
        self.own = own
        old = {p.address: (self._recent[i], self._recent_at[i]) for i, p in enumerate(self.peers)}
        self.peers = peers
        self._recent = [old.get(p.address, (0.0, 0.0))[0] for p in peers]
        self._recent_at = [old.get(p.address, (0.0, 0.0))[1] for p in peers]

    # -- the decision ---------------------------------------------------------------------------

    def busy(self, peer: Peer) -> int:
        """Requests of this failproxy (every worker) awaiting `peer`'s answer."""
        return peer.waiting + peer.others()

    def choose(self, now: float) -> tuple[Peer | None, str]:
        """A destination with a free worker as far as failproxy can tell, and why it is not the
        local socket ("" when it is); None when there is none anywhere."""
        local = self.local
        n = self.busy(local)
        own = self.own
        if own is not None:
            n += self.busy(own)
        workers = self.workers
        if n == 0 or n < workers - 1:
            return self._local()
        if n == workers - 1:
            # On a fast box a queued connection is most likely a worker lagging on its way back
            # to accept(): no need to read the queue (12-28 us) to send the request home.
            if self._fast_box(now) or self._queue(now) == 0:
                return self._local()
            reason = "queued"  # someone else's request holds a worker: maybe a slow one
        else:
            reason = "workers_busy"
            if now >= self._probe_at and not self._probing and self._queue(now) == 0:
                self._probing = True  # more workers than W? one request finds out
                self._probe_until = now + PROBE_VERIFY
                self._probe_spin_until = now + PROBE_SPIN
                self._seen = 0
                self._loop.call_soon(self._verify)  # after its connect (synchronous on UNIX)
                return self._local()
            if self._fast_box(now):
                return self._local()  # every worker busy with our fast requests: wait for one
        return self._best_peer(now, ()), reason

    # -- fast or slow: is queueing at home cheap? ---------------------------------------------

    def _fast_box(self, now: float) -> bool:
        """Every local answer lately came within `slow_after`, and none of ours in service
        has been there longer: a request queued at home waits a fraction of that, less than
        a hop costs (on a box serving only fast requests, sending half of them to peers that
        are as busy only added TCP hops: 0.76x the throughput of queueing at home)."""
        if (
            self.slow_after <= 0
            or self._fast_run < FAST_EVIDENCE
            or now - self._slow_at < SLOW_MEMORY
        ):
            return False
        for sent in self._local_sent.values():  # the oldest first (insertion order)
            if now - sent > self.slow_after:
                self._slowed(now)  # a slow one is in service now: do not queue behind it
                return False
            break
        return True

    def _slowed(self, now: float) -> None:
        self._slow_at = now
        self._fast_run = 0

    def local_sent(self, key: object, now: float) -> None:
        """An attempt of this worker took a slot on the local socket."""
        self._local_sent[key] = now

    def local_answered(self, key: object, now: float) -> None:
        """That attempt's response head arrived (its worker is done with it)."""
        sent = self._local_sent.pop(key, -1.0)
        if sent < 0:
            return
        if now - sent > self.slow_after:
            self._slowed(now)
        else:
            self._fast_run += 1

    def local_ended(self, key: object, now: float) -> None:
        """That attempt ended with no response head (failed, or its client left)."""
        sent = self._local_sent.pop(key, -1.0)
        if sent >= 0 and now - sent > self.slow_after:
            self._slowed(now)

    def _local(self) -> tuple[Peer | None, str]:
        if self._queued >= 0:
            self._queued += 1  # this turn's reading, less stale: our connect queues or is taken
        return self.local, ""

    def _best_peer(self, now: float, tried: list[str] | tuple[str, ...]) -> Peer | None:
        """Fewest awaiting answers, then fewest sent lately, then ring order; at most W busy."""
        workers = self.workers
        best: Peer | None = None
        best_busy = 0
        best_recent = 0.0
        for i, peer in enumerate(self.peers):
            if peer.address in tried or peer.is_down(now):
                continue
            busy = self.busy(peer)
            if busy >= workers:
                continue
            recent = self._recent_now(i, now)
            if best is None or busy < best_busy or (busy == best_busy and recent < best_recent):
                best, best_busy, best_recent = peer, busy, recent
        return best

    def _recent_now(self, i: int, now: float) -> float:
        value = self._recent[i] * math.exp((self._recent_at[i] - now) / RECENT_DECAY)
        return 0.0 if value < 0.05 else value

    def sent(self, peer: Peer, now: float) -> None:
        """A request went to `peer` (a backup): it counts as sent lately."""
        for i, p in enumerate(self.peers):
            if p is peer:
                self._recent[i] = self._recent_now(i, now) + 1.0
                self._recent_at[i] = now
                return

    def after_failure(self, failed: Peer, reason: str, tried: list[str], now: float) -> Peer | None:
        """Where a request goes after `failed` failed with `reason`: a peer with a free worker,
        else the own TCP port, else the next untried server; None: every one was tried."""
        if failed is self.local:
            if reason == "refused" or reason == "missing":
                self.forget()  # the app server is (re)starting: its worker count may change
            peer = self._best_peer(now, tried)
            if peer is not None:
                return peer
            own = self.own
            if own is not None and own.address not in tried:
                return own
        untried = [p for p in self.peers if p.address not in tried]
        own = self.own
        if own is not None and own.address not in tried:
            untried.append(own)
        for peer in untried:
            if not peer.is_down(now):
                return peer
        return untried[0] if untried else None  # every one is down: try them anyway

    def forget(self) -> None:
        self._fast_run = 0
        self.workers = 1
        self._backoff = 1.0
        self._probe_at = 0.0

    # -- the accept queue and what it teaches ----------------------------------------------------

    def _queue(self, now: float) -> int:
        """The local listener's accept-queue depth, read at most once per loop turn."""
        queued = self._queued
        if queued >= 0:
            return queued
        depth = self._probe.depth()
        queued = depth if depth is not None else 0
        self._queued = queued
        self._loop.call_soon(self._turn_over)
        return queued

    def _turn_over(self) -> None:
        self._queued = -1

    def _verify(self) -> None:
        """Watch a probe: in service beside the others (W grows), or queued behind them for the
        whole watch (back off), or the others ended first (nothing learned: try again soon)."""
        self._queued = -1
        now = monotonic()
        busy = self.busy(self.local)
        in_service = busy - self._queue(now)
        if in_service > self.workers:
            if self._seen == in_service:  # twice in a row, a loop turn's I/O between them
                self.workers = in_service
                self._probing = False
                self._probe_at = now  # it grew: the next one past W may probe for more
                self._backoff = 1.0
                return
            self._seen = in_service
        else:
            self._seen = 0
        if busy <= self.workers:
            self._probing = False  # the others ended before a worker took it: no evidence
            self._probe_at = now + PROBE_RETRY
            return
        if now < self._probe_until:
            if now < self._probe_spin_until:
                self._loop.call_soon(self._verify)  # a fast request's whole life is this short
            else:
                self._loop.call_later(PROBE_POLL, self._verify)
            return
        self._probing = False  # queued behind W in service the whole watch: W it is, for now
        self._probe_at = now + self._backoff
        self._backoff = min(2 * self._backoff, BACKOFF_MAX)

    # -- holding ----------------------------------------------------------------------------------

    def route(self, request: Holdable, now: float) -> tuple[Peer | None, str]:
        """Where a new request goes; (None, "") when it is held (resumed later)."""
        if self.held:
            self._hold(request, now)  # FIFO: a new request never overtakes a held one
            return None, ""
        peer, reason = self.choose(now)
        if peer is not None:
            return peer, reason
        if self.hold_timeout > 0:
            self._hold(request, now)
            return None, ""
        return self._home(), reason

    def _home(self) -> Peer:
        """Where a request with no known free worker anywhere queues: the box's own workers."""
        return self.own if self.own is not None else self.local

    def _hold(self, request: Holdable, now: float) -> None:
        self.held.append((now + self.hold_timeout, request))
        self._arm(now)

    def unhold(self, request: Holdable) -> None:
        """A held request whose client went away."""
        for entry in self.held:
            if entry[1] is request:
                self.held.remove(entry)
                return

    def release(self) -> None:
        """One of this worker's requests ended: a held one may go where a worker is free."""
        held = self.held
        if not held:
            return
        now = monotonic()
        while held:
            peer, reason = self.choose(now)
            if peer is None:
                break
            held.popleft()[1].resume(peer, "held" if reason else "", now)
        self._arm(now)

    def _arm(self, now: float) -> None:
        """One timer while anything is held: the first hold's deadline, or a short tick when
        another worker's completion may free a slot."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.held:
            return
        at = self.held[0][0]
        if self._shared:
            at = min(at, now + RETRY_TICK)
        self._timer = self._loop.call_at(at, self._tick)

    def _tick(self) -> None:
        self._timer = None
        now = monotonic()
        held = self.held
        while held and held[0][0] <= now:
            held.popleft()[1].resume(self._home(), "hold_timeout", now)
        self.release()
        self._arm(now)
