"""Where a request goes: the overflow policy `room` (the default, SPEC 4.3 and 4.4).

The local app server is a pull-model preforking server: each of its W workers takes one
connection at a time, so a connection queued in its UNIX listener means every worker is busy.
A request goes to the local UNIX socket while the box has an idle worker as far as failproxy can
tell; otherwise to a peer with room (fewer of ours awaiting it than its learned concurrency,
capacity.py), least loaded first; otherwise it is *held* in failproxy until one of those frees
up. Requests of slow routes (routes.py) are held apart from fast ones and go only after every
held fast one: a fast request never waits behind a slow one in failproxy, and a slow one never
queues in an app server's accept queue (FIFO and blind), so the next free worker goes to a
fast request. A fast request is held at most `hold_timeout`, then goes where its expected wait
is least (never stranded by a peer's underestimated capacity); a slow one waits its turn, or
with `routes.shed_after` is answered 503. Chosen by simulation of the seed cluster against
nginx's seed config (bench/sim: policy M; bench/RESULTS.md, the README's "How failover decides").

What failproxy knows, cheaply and only locally:
- its requests awaiting an answer per destination (connected, no response head yet), summed
  over its worker processes (loadshare.py); the local UNIX socket and the own TCP port count
  together: they feed the same workers;
- the local listener's accept-queue depth (sock_diag, ~12-28 us: read at most once per loop
  turn, and only when the count says the last idle worker may be taken);
- W, learned: never configured. It starts at 1 and only grows. Past W a *probe* (a fast-route
  request sent locally while the queue is empty and every one of ours in service there is near
  its expected end, _may_probe) tests for more workers, at most once per back-off interval
  (1 s, doubling to 64 s while it finds none). The queue is read every loop turn for
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
from random import randrange
from typing import Final, Protocol

from mypy_extensions import trait

from failproxy.routing.capacity import Capacity
from failproxy.routing.localbooks import LocalBooking, LocalBooks
from failproxy.routing.peer import Peer
from failproxy.routing.queue_depth import QueueProbe
from failproxy.routing.routes import KNOWN_FAST

# Called on the hot path, so held as module constants: in the compiled build a Final is a C
# static, where a from-import or a module attribute is a dict lookup per call (~150-300
# instructions each, bench.profiles.realsock).
monotonic: Final = time.monotonic

PROBE_VERIFY: Final = 0.02  # after a probe connects, how long to look whether a worker takes it
PROBE_SPIN: Final = 0.002  # ... every loop turn for this long (millisecond requests), then each
PROBE_POLL: Final = 0.001  # ... this often (an idle worker may wake late on a loaded box)
PROBE_RETRY: Final = 0.1  # nothing learned (the others ended first): the next probe after this
BACKOFF_MAX: Final = 64.0
RECENT_DECAY: Final = 1.0  # seconds: "sent lately", the load measure that breaks in-flight ties
RETRY_TICK: Final = 0.005  # while anything is held: work we do not see may end; look this often
SLOW_MEMORY: Final = 10.0  # seconds a slow local answer keeps the box from queueing at home
FAST_EVIDENCE: Final = 32  # fast local answers in a row before the box is trusted to be fast

# The local socket's verdict (home_verdict), from what failproxy knows of the box.
HOME: Final = 0  # a worker is free as far as known: send it home
HOME_WAIT: Final = 1  # every worker busy with fast work on a fast box: wait for one at home
PROBE: Final = 2  # past W with an empty queue: home, as the probe for a worker beyond W
AWAY_QUEUED: Final = 3  # the last worker is taken by someone else's request: elsewhere
AWAY_BUSY: Final = 4  # every worker busy: elsewhere (a peer with room, or held)
READ_QUEUE: Final = 5  # the verdict needs the accept queue's depth: read it, ask again
UNREAD: Final = -1  # `queued` when the accept queue was not read (12-28 us: only on demand)


def home_verdict(busy: int, workers: int, slow: bool, fast_box: bool, may_probe: bool,
                 queued: int) -> int:
    """Whether a request goes to the local socket, as a pure function of what is known (no
    I/O, no clock: table-tested): `busy` of ours awaiting the box (both its sockets),
    `workers` (W, learned), a slow-route request, a fast box (_fast_box: a queued request
    waits less than a hop costs), a probe allowed now (_may_probe and its back-off), and the
    accept queue's depth (UNREAD until a verdict needs it: READ_QUEUE, as h11 asks its caller
    for more data instead of reading)."""
    if busy == 0 or busy < workers - 1:
        return HOME
    fast = fast_box and not slow
    if busy == workers - 1:
        # On a fast box a queued connection is most likely a worker lagging on its way back
        # to accept(): no need to read the queue to send the request home.
        if fast:
            return HOME
        if queued == UNREAD:
            return READ_QUEUE
        return HOME if queued == 0 else AWAY_QUEUED
    if may_probe and not slow:
        if queued == UNREAD:
            return READ_QUEUE
        if queued == 0:
            return PROBE  # more workers than W? one request finds out
    return HOME_WAIT if fast else AWAY_BUSY


def _sample2(n: int) -> tuple[int, int]:
    """Two distinct indexes below `n` (n >= 2), drawn at random."""
    a = randrange(n)
    b = randrange(n - 1)
    return a, (b + 1 if b >= a else b)


@trait
class Holdable:
    """A request the policy may hold and send later (exchange.Exchange implements it)."""

    __slots__ = ()

    def resume(self, peer: Peer, reason: str, now: float) -> None:
        """Go to `peer` now; `reason` names why it is not the local socket ("" if it is)."""
        raise NotImplementedError

    def shed(self, now: float) -> None:
        """A slow-route request held past `routes.shed_after`: answer 503 with Retry-After."""
        raise NotImplementedError


class HeldGauge(Protocol):
    """Told how many requests are held (metrics.WorkerMetrics implements it)."""

    def held_requests(self, delta: int) -> None: ...


class _NoGauge:
    __slots__ = ()

    def held_requests(self, delta: int) -> None:
        pass


class Room:
    """The `room` policy of one worker (state: learned W, each peer's learned capacity, the
    held queues, recent sends)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        local: Peer,
        own: Peer | None,
        peers: list[Peer],
        hold_timeout: float,
        shared: bool,
        slow_after: float = 0.05,
        shed_after: float = 0.0,
        gauge: HeldGauge | None = None,
    ) -> None:
        self._loop = loop
        self.local = local  # the UNIX socket
        self.own = own  # this box's own TCP port (`upstream.self`), if known
        self.peers = peers  # the other backups, in ring order
        self.hold_timeout = hold_timeout
        del shared  # (ticks run whenever anything is held, one worker or several)
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
        self.held: deque[tuple[float, Holdable]] = deque()  # fast routes: (deadline, request)
        self.held_slow: deque[tuple[float, Holdable]] = deque()  # slow routes, after them
        self.shed_after = shed_after
        self._gauge: HeldGauge = gauge if gauge is not None else _NoGauge()
        # Learned per destination address (kept across a new peer list from DNS).
        self.capacity: dict[str, Capacity] = {}
        self.local_capacity = Capacity(1.0)  # its concurrency is `workers`; its service time
        self._timer: asyncio.TimerHandle | None = None
        # Whether the last destination chosen had a free worker as far as failproxy knew (not
        # a probe, a fast box's wait at home, or a send beyond every destination's room): an
        # answer teaches its route's time only then, since time spent waiting for a worker is
        # not the route's (at capacity fast routes that queued were learned slow, and held
        # behind the slow ones).
        self.clean = True
        # this worker's local attempts: when each was sent, and when it is expected to end; a
        # probe waits behind them if it finds no worker, and a box is fast while they are
        # (localbooks.py: in C in the compiled build, where the C core keeps them too). They
        # keep `slow_after`: a local answer slower than this makes the box slow.
        self.books: LocalBooking = LocalBooks(slow_after)

    @property
    def slow_after(self) -> float:
        return self.books.slow_after

    @slow_after.setter
    def slow_after(self, value: float) -> None:
        self.books.slow_after = value

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

    def capacity_of(self, peer: Peer) -> Capacity:
        """What is learned of `peer`; a new one starts at this box's worker count (a guess the
        first answers correct, up or down)."""
        cap = self.capacity.get(peer.address)
        if cap is None:
            cap = self.capacity[peer.address] = Capacity(float(self.workers))
        return cap

    def choose(self, now: float, slow: bool = False) -> tuple[Peer | None, str]:
        """A destination with a free worker as far as failproxy can tell, and why it is not the
        local socket ("" when it is); None when there is none anywhere. `slow`: a slow-route
        request, which never waits for a worker in an accept queue and never probes."""
        n = self._local_busy()
        workers = self.workers
        self.clean = True  # unless a path below sends it where it may wait for a worker
        if n == 0 or n < workers - 1:
            return self._local()  # the common case, before anything else is looked at
        fast = not slow and self._fast_box(now)
        may_probe = (
            n >= workers  # (at W - 1 the verdict never probes: not worth _may_probe's loop)
            and now >= self._probe_at
            and not self._probing
            and self._may_probe(now, slow)
        )
        verdict = home_verdict(n, workers, slow, fast, may_probe, UNREAD)
        if verdict == READ_QUEUE:
            verdict = home_verdict(n, workers, slow, fast, may_probe, self._queue(now))
        if verdict == HOME:
            return self._local()
        if verdict == PROBE:
            self._probing = True
            self._probe_until = now + PROBE_VERIFY
            self._probe_spin_until = now + PROBE_SPIN
            self._seen = 0
            self._loop.call_soon(self._verify)  # after its connect (synchronous on UNIX)
            self.clean = False
            return self._local()
        if verdict == HOME_WAIT:
            self.clean = False
            return self._local()  # every worker busy with our fast requests: wait for one
        reason = "queued" if verdict == AWAY_QUEUED else "workers_busy"
        return self._best_peer(now, (), slow), reason

    def home_now(self, now: float) -> bool:
        """Would `route` send a fast-route request home now? True, with what `choose` does
        then (a probe started, `clean` set), for the C core (proxy/corebooks.py); False where
        it would hold it or send it elsewhere: the relay then asks `route` itself (`choose`'s
        reading of the queue is kept for the turn, its random draw is drawn again)."""
        if self.held:
            return False
        peer, _ = self.choose(now)
        return peer is self.local

    def _may_probe(self, now: float, slow: bool) -> bool:
        """May this request be the probe for a worker beyond W? A probe that finds none waits
        in the accept queue for the first of ours in service there to end, so only a fast-route
        request probes (a slow-route one never waits in an accept queue), and only while the
        time of each of ours in service there is known: not behind a route not learned yet, nor
        behind one overdue (in service for twice its route's time and slow_after more), either
        of which may take seconds more than anyone knows. Behind a known slow request it may
        probe: it then waits at most what is left of that one, once per back-off, and a box
        whose traffic is mostly slow, or that is at capacity, learns its second worker (one
        that never probed served its own requests with one worker and left the other to the
        peers: 34-44 % of fast requests over 1 s at 125 % load, bench seed capacity1s)."""
        return not slow and self.books.may_probe(now)

    # -- fast or slow: is queueing at home cheap? ---------------------------------------------

    def _fast_box(self, now: float) -> bool:
        """Every local answer lately came within `slow_after`, none of ours in service has
        been there longer, and each of those is of a route known to be fast: a request queued
        at home waits a fraction of that, less than a hop costs (on a box serving only fast
        requests, sending half of them to peers that are as busy only added TCP hops: 0.76x the
        throughput of queueing at home)."""
        return self.books.fast_box(now, FAST_EVIDENCE, SLOW_MEMORY)

    def local_sent(self, key: object, now: float, kind: int = KNOWN_FAST,
                   route_ms: float = 0.0) -> None:
        """An attempt of this worker took a slot on the local socket; `kind`: what is known of
        its route (routes.KNOWN_FAST, KNOWN_SLOW or UNKNOWN), `route_ms` its learned time."""
        self.books.sent(key, now, kind, route_ms)

    def rekey(self, old: object, new: object) -> None:
        """A local attempt changed hands (the C core's request, taken over by the relay's
        exchange: Exchange.adopt): its books follow it, in the same place (the oldest first is
        what _fast_box and _may_probe read)."""
        self.books.rekey(old, new)

    def local_answered(self, key: object, now: float) -> None:
        """That attempt's response head arrived (its worker is done with it)."""
        self.books.answered(key, now)

    def local_ended(self, key: object, now: float) -> None:
        """That attempt ended with no response head (failed, or its client left)."""
        self.books.ended(key, now)

    def _local(self) -> tuple[Peer | None, str]:
        if self._queued >= 0:
            self._queued += 1  # this turn's reading, less stale: our connect queues or is taken
        return self.local, ""

    def _frontier(self) -> int:
        """The size of every peer still in slow start: the largest limit the probing of any of
        them has reached. Such a limit is how far the probing got, not what the peer takes;
        weighed by its own limit, the peer that got ahead in the first round trips would take
        more from then on (each answer adds one to its limit), and two equal peers split a
        burst of 160 as unevenly as 103:57 (tests/test_learning.py). Weighed by one size they
        are probed alike, and the one behind, used more for its limit, grows to meet the other."""
        frontier = 1
        for peer in self.peers:
            cap = self.capacity_of(peer)
            if cap.slow_start and int(cap.concurrency) > frontier:
                frontier = int(cap.concurrency)
        return frontier

    def _best_peer(self, now: float, tried: tuple[str, ...],
                   slow: bool = False) -> Peer | None:
        """A peer with room: fewer of ours awaiting it than its learned concurrency (for this
        route class); the least loaded for its size first (a peer in slow start has the
        common size, _frontier), then the one sent to least lately, then ring order."""
        best: Peer | None = None
        best_load = 0.0
        best_recent = 0.0
        peers = self.peers
        if len(peers) > 2:
            return self._two_choices(now, tried, slow)
        frontier = self._frontier()
        for i, peer in enumerate(peers):
            if peer.address in tried or peer.is_down(now):
                continue
            busy = self.busy(peer)
            cap = self.capacity_of(peer)
            limit = cap.limit(slow, now)
            if busy >= limit:
                continue
            load = busy / (frontier if cap.slow_start else limit)
            recent = self._recent_now(i, now)
            if best is None or load < best_load or (load == best_load and recent < best_recent):
                best, best_load, best_recent = peer, load, recent
        return best

    def _two_choices(self, now: float, tried: tuple[str, ...],
                     slow: bool) -> Peer | None:
        """Among three or more peers with room, the less loaded of two drawn at random (power
        of two choices): what this failproxy knows of a peer is only its own share of the
        peer's load, and failproxies that all took the least loaded by that measure would herd
        onto the same peer. The earlier in ring order wins a tie."""
        room: list[tuple[float, int, Peer]] = []
        frontier = self._frontier()
        for i, peer in enumerate(self.peers):
            if peer.address in tried or peer.is_down(now):
                continue
            busy = self.busy(peer)
            cap = self.capacity_of(peer)
            limit = cap.limit(slow, now)
            if busy < limit:
                room.append((busy / (frontier if cap.slow_start else limit), i, peer))
        if len(room) <= 1:
            return room[0][2] if room else None
        a, b = _sample2(len(room))
        first, second = room[a], room[b]
        return first[2] if (first[0], first[1]) <= (second[0], second[1]) else second[2]

    def least_wait(self, now: float) -> Peer:
        """Where a request that found no room anywhere waits least, as learned: home or a peer,
        by (ours beyond its concurrency + 1) x service time / concurrency (a peer in slow
        start: / the common size, _frontier); home on ties."""
        return self._least_wait(now)[0]

    def _local_busy(self) -> int:
        """`busy` of the box's two sockets together (the UNIX socket and the own TCP port feed
        the same workers), with one call into the load table."""
        local = self.local
        own = self.own
        n = local.waiting + local.others_with(own)
        return n + own.waiting if own is not None else n

    def _least_wait(self, now: float) -> tuple[Peer, float]:
        self.clean = False  # beyond every destination's known room: it may wait there
        home = self._home()
        cap = self.local_capacity
        cap.concurrency = float(self.workers)
        best = home
        best_wait = cap.expected_wait(self._local_busy())
        frontier = self._frontier()
        for peer in self.peers:
            if peer.is_down(now):
                continue
            peer_cap = self.capacity_of(peer)
            wait = peer_cap.expected_wait(self.busy(peer),
                                          frontier if peer_cap.slow_start else 0.0)
            if wait < best_wait:
                best, best_wait = peer, wait
        return best, best_wait

    def _freeing_rate(self, now: float) -> float:
        """Workers that free up per second for our held requests, as learned: each destination's
        requests of ours in service (up to its concurrency) over its service time; 0.0 when a
        destination with ours in service has no service time learned (no estimate then)."""
        rate = 0.0
        local_ms = self.local_capacity.service_ms
        n = min(self._local_busy(), self.workers)
        if n:
            if not local_ms:
                return 0.0
            rate += n * 1000.0 / local_ms
        for peer in self.peers:
            busy = self.busy(peer)
            if not busy or peer.is_down(now):
                continue
            cap = self.capacity_of(peer)
            if not cap.service_ms:
                return 0.0
            rate += min(busy, int(cap.concurrency)) * 1000.0 / cap.service_ms
        return rate

    def _send_on_the_longest_waits(self, now: float) -> None:
        """SPEC 4.3: a held fast-route request goes on when its expected wait elsewhere is
        shorter than holding on. The k-th held one expects to wait about k / (workers freeing
        per second); sent beyond a destination's concurrency it expects (ours beyond it + 1) x
        service time / concurrency. Taken from the back of the queue (the longest expected
        holds), one at a time, each sent request counted where it went."""
        held = self.held
        if len(held) < 2:
            return
        rate = self._freeing_rate(now)
        if rate <= 0.0:
            return
        gauge = self._gauge
        while len(held) >= 2:
            dest, wait = self._least_wait(now)
            if len(held) / rate <= wait:
                return
            gauge.held_requests(-1)
            held.pop()[1].resume(dest, "least_wait", now)

    def answered(self, peer: Peer, in_flight: int, ms: float, route_ms: float, slow: bool,
                 now: float) -> None:
        """An answer from `peer` took `ms`; `in_flight`: ours awaiting it when it was sent."""
        if peer is self.local or peer is self.own:
            cap = self.local_capacity
            if cap.service_ms:
                cap.service_ms += (ms - cap.service_ms) * 0.1
            else:
                cap.service_ms = ms
            return
        self.capacity_of(peer).answered(in_flight, ms, route_ms, slow, now)

    def service_ms(self, peer: Peer) -> float:
        """`peer`'s learned service time; 0.0 before its first answer."""
        cap = self.capacity.get(peer.address)
        return cap.service_ms if cap is not None else 0.0

    def learned(self) -> dict[str, dict[str, float | int]]:
        """Per destination address: its learned concurrency and service time (/status)."""
        out: dict[str, dict[str, float | int]] = {}
        local = {"concurrency": self.workers,
                 "service_ms": round(self.local_capacity.service_ms, 3)}
        out[self.local.address] = local
        if self.own is not None:
            out[self.own.address] = local
        for peer in self.peers:
            cap = self.capacity.get(peer.address)
            if cap is not None:
                out[peer.address] = {"concurrency": int(cap.concurrency),
                                     "service_ms": round(cap.service_ms, 3)}
        return out

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

    def after_failure(self, failed: Peer, reason: str, tried: tuple[str, ...],
                      now: float) -> Peer | None:
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
        self.books.fast_run = 0
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

    def route(self, request: Holdable, now: float, slow: bool = False) -> tuple[Peer | None, str]:
        """Where a new request goes; (None, "") when it is held (resumed later). A new request
        never overtakes a held one of its class, and a slow one never a held fast one."""
        if slow:
            if self.held or self.held_slow:
                self._hold(request, now, True)
                return None, ""
            peer, reason = self.choose(now, True)
            if peer is not None:
                return peer, reason
            self._hold(request, now, True)  # never into an accept queue: it waits here
            return None, ""
        if self.held:
            self._hold(request, now, False)
            return None, ""
        peer, reason = self.choose(now)
        if peer is not None:
            return peer, reason
        if self.hold_timeout > 0:
            self._hold(request, now, False)
            return None, ""
        return self.least_wait(now), reason

    def _home(self) -> Peer:
        """Where a request with no known free worker anywhere queues: the box's own workers."""
        return self.own if self.own is not None else self.local

    def _hold(self, request: Holdable, now: float, slow: bool) -> None:
        if slow:
            deadline = now + self.shed_after if self.shed_after > 0 else math.inf
            self.held_slow.append((deadline, request))
        else:
            self.held.append((now + self.hold_timeout, request))
        self._gauge.held_requests(1)
        self._arm(now)

    def unhold(self, request: Holdable) -> None:
        """A held request whose client went away."""
        for queue in (self.held, self.held_slow):
            for entry in queue:
                if entry[1] is request:
                    queue.remove(entry)
                    self._gauge.held_requests(-1)
                    return

    def release(self) -> None:
        """One of this worker's requests ended: a held one may go where a worker is free, the
        fast ones first; a slow one only when no fast one waits."""
        held = self.held
        held_slow = self.held_slow
        if not held and not held_slow:
            return
        now = monotonic()
        gauge = self._gauge
        while held:
            peer, reason = self.choose(now)
            if peer is None:
                break
            gauge.held_requests(-1)
            held.popleft()[1].resume(peer, "held" if reason else "", now)
        while held_slow and not held:
            peer, reason = self.choose(now, True)
            if peer is None:
                break
            gauge.held_requests(-1)
            held_slow.popleft()[1].resume(peer, "held" if reason else "", now)
        self._arm(now)

    def _arm(self, now: float) -> None:
        """One timer while anything is held: a short tick, since work we do not see (another
        worker's, another box's on our TCP port) may end and free a worker, or the first hold's
        deadline if that is sooner."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.held and not self.held_slow:
            return
        at = now + RETRY_TICK
        if self.held and self.held[0][0] < at:
            at = self.held[0][0]
        if self.held_slow and self.held_slow[0][0] < at:
            at = self.held_slow[0][0]
        self._timer = self._loop.call_at(at, self._tick)

    def _tick(self) -> None:
        self._timer = None
        now = monotonic()
        held = self.held
        gauge = self._gauge
        while held and held[0][0] <= now:
            gauge.held_requests(-1)
            held.popleft()[1].resume(self.least_wait(now), "hold_timeout", now)
        self._send_on_the_longest_waits(now)
        held_slow = self.held_slow
        while held_slow and held_slow[0][0] <= now:
            gauge.held_requests(-1)
            held_slow.popleft()[1].shed(now)
        self.release()
        self._arm(now)
