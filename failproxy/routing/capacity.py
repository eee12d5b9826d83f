"""What one destination can take, learned from its answers (SPEC 4.3): its service time and its
concurrency, how many requests it serves at once without slowing down.

Nothing here does I/O or reads a clock: the caller passes `now` and each answer's figures, so
the learning is tested by pushing answers (tests/test_capacity.py).

Concurrency is learned as TCP learns a window, on latency instead of loss (the Vegas idea, as
Netflix's concurrency-limits applies it to servers): an answer that came within GROW_TOL times
its route's learned time, sent while the limit was in use (ours in flight there at least half
of it, the same application-limited check as concurrency-limits'), adds one to the limit until
the first slowdown (slow start: a peer serving 40 at once is given 40 within a few round trips,
the limit growing by half or more per round trip), then 1/limit (about one per round trip, as
TCP's congestion avoidance); an answer slower than that says the request queued there, and the
limit drops to SHRINK of what was in flight when it was sent (if that is lower). The latency
is read against the route's own time (routes.RouteTable), so a slow route is not taken for a
queue. The limit settles where answers take up to GROW_TOL times their route's time: a few
fast-route requests may queue there behind each other (milliseconds), a slow one not for long
(the gate below). A peer is never assumed to have this box's worker count.

Slow-route requests have a second gate. A slow-route request that waited at a peer (answered
later than SLOW_TOL times its route's time) closes the peer to slow-route requests for a
back-off (1 s, doubling to BACKOFF_MAX while it keeps happening): at capacity every box is busy
with its own slow work, and a slow request dropped into a peer's accept queue would sit in front
of that box's fast requests, which failproxy there cannot reorder. Fast-route requests still go.
The overflow simulation (bench/sim, policy M) chose the thresholds.
"""

from __future__ import annotations

from typing import Final

GROW_TOL: Final = 3.0  # an answer within this many times its route's time did not queue
SLOW_TOL: Final = 1.5  # ... for a slow-route answer: the gate for slow-route requests
SLACK_MS: Final = 2.0  # added to both: a hop, a scheduler's jitter
SHRINK: Final = 0.75
BACKOFF: Final = 1.0
BACKOFF_MAX: Final = 16.0
SERVICE_WEIGHT: Final = 0.1  # the service time is an average over about the last 10 answers


class Capacity:
    """One destination as one worker has learned it."""

    __slots__ = ("_backoff", "closed_until", "concurrency", "service_ms", "slow_start")

    def __init__(self, concurrency: float) -> None:
        self.concurrency = concurrency  # a float: it shrinks by factors, it is used whole
        # No slowdown seen yet: grow fast. The limit is then how far the probing got, not a
        # size: balance.py weighs such peers by one common size (Room._frontier).
        self.slow_start = True
        self.service_ms = 0.0  # 0.0: no answer yet
        self.closed_until = 0.0  # slow-route requests wait for this time
        self._backoff = BACKOFF

    def limit(self, slow: bool, now: float) -> int:
        """How many requests of ours may await its answer at once; 0: none of this class now."""
        if slow and now < self.closed_until:
            return 0
        return int(self.concurrency)

    def answered(self, in_flight: int, ms: float, route_ms: float, slow: bool,
                 now: float) -> None:
        """An answer came `ms` after its request was sent, with `in_flight` of ours awaiting
        this destination at that moment (itself counted); `route_ms`: its route's learned
        time (0.0: unknown, which teaches the service time only)."""
        if self.service_ms:
            self.service_ms += (ms - self.service_ms) * SERVICE_WEIGHT
        else:
            self.service_ms = ms
        if route_ms <= 0.0:
            return
        if slow:
            if ms > SLOW_TOL * route_ms + SLACK_MS:
                self.closed_until = now + self._backoff
                self._backoff = min(2 * self._backoff, BACKOFF_MAX)
            else:
                self._backoff = BACKOFF
        if ms > GROW_TOL * route_ms + SLACK_MS:
            # SHRINK of what was in flight when it was sent, not of the limit: the answers of
            # one burst that all queued shrink it once, not once each
            shrunk = in_flight * SHRINK
            if shrunk < self.concurrency:
                self.concurrency = shrunk if shrunk > 1.0 else 1.0
            self.slow_start = False
        elif 2 * in_flight >= self.concurrency:
            self.concurrency += 1.0 if self.slow_start else 1.0 / self.concurrency

    def expected_wait(self, in_flight: int, size: float = 0.0) -> float:
        """Seconds a request sent now waits before it is served, roughly: (ours ahead of it
        beyond the limit + 1) x service time / `size` (0.0: the concurrency); 0.0 below the
        limit."""
        over = in_flight - int(self.concurrency)
        if over < 0:
            return 0.0
        return (over + 1) * self.service_ms / 1000.0 / (size or self.concurrency)
