"""What failproxy learns from answers (capacity.py, routes.RouteTable): pushed answers, an
injected clock, no I/O.

The concurrency tests drive a fake peer: it serves up to `size` requests at once in `base` ms
each and queues the rest (a pull-model app server's accept queue), and a closed loop keeps as
many of ours in flight as the learned limit allows. The estimate must climb to the peer's size
from a low guess, and follow it down when the peer shrinks (another box's traffic took it).
"""

from __future__ import annotations

import math

import pytest

from failproxy.routing import capacity, routes
from failproxy.routing.capacity import Capacity
from failproxy.routing.routes import KNOWN_FAST, UNKNOWN, RouteTable


class FakePeer:
    """`size` workers, `base` ms per request; the n-th request in flight beyond `size` waits
    for the ones ahead of it: ceil(n / size) service times in all."""

    def __init__(self, size: int, base: float) -> None:
        self.size = size
        self.base = base

    def answer_ms(self, in_flight: int) -> float:
        return math.ceil(in_flight / self.size) * self.base


def drive(cap: Capacity, peer: FakePeer, rounds: int, now: float = 0.0) -> float:
    """Rounds of a closed loop: each round sends as many as the limit allows (at least the
    limit, plus one: a held request's wait beyond it is what probes), and every answer comes
    back; returns the clock."""
    for _ in range(rounds):
        n = cap.limit(False, now) + 1
        for i in range(1, n + 1):
            cap.answered(i, peer.answer_ms(i), peer.base, False, now)
        now += peer.base / 1000
    return now


def test_concurrency_climbs_to_a_big_peer_within_a_few_round_trips() -> None:
    cap = Capacity(1.0)  # a one-worker box's guess for a peer that serves 40 at once
    peer = FakePeer(40, 5.0)
    rounds = 0
    while cap.limit(False, 0.0) < 40:
        drive(cap, peer, 1)
        rounds += 1
        assert rounds <= 10, f"still {cap.concurrency} after {rounds} round trips"
    drive(cap, peer, 20)
    # it settles where answers take up to GROW_TOL service times: a few queue, none for long
    assert 40 <= cap.concurrency <= capacity.GROW_TOL * 40 + 1
    assert 5.0 <= cap.service_ms <= capacity.GROW_TOL * 5.0


def test_concurrency_follows_a_peer_that_shrinks_and_grows_again() -> None:
    cap = Capacity(1.0)
    drive(cap, FakePeer(16, 5.0), 30)
    assert cap.concurrency >= 16
    drive(cap, FakePeer(4, 5.0), 30)
    assert 2 <= cap.limit(False, 0.0) <= capacity.GROW_TOL * 4 + 1, cap.concurrency
    drive(cap, FakePeer(12, 5.0), 30)
    assert 12 <= cap.limit(False, 0.0) <= capacity.GROW_TOL * 12 + 1, cap.concurrency


def test_a_slow_route_answer_is_not_taken_for_a_queue() -> None:
    cap = Capacity(4.0)
    # 800 ms, but the route takes 800 ms: no queueing, and the limit was in use: it grows
    cap.answered(4, 800.0, 800.0, True, 0.0)
    assert cap.concurrency == 5.0
    assert cap.limit(True, 0.0) == 5
    # an unknown route teaches the service time only
    cap.answered(5, 5000.0, 0.0, False, 0.0)
    assert cap.concurrency == 5.0
    # a limit not in use (1 of 5 in flight) is not grown: no evidence about it
    cap.answered(1, 800.0, 800.0, True, 0.0)
    assert cap.concurrency == 5.0


def test_a_slow_request_that_queued_closes_the_peer_to_slow_ones_with_backoff() -> None:
    cap = Capacity(4.0)
    t = 100.0
    cap.answered(1, 1500.0, 800.0, True, t)  # waited 700 ms there: the box is busy
    assert cap.limit(True, t) == 0, "no slow-route requests there for a while"
    assert cap.limit(False, t) >= 1, "fast-route ones still go"
    assert cap.limit(True, t + capacity.BACKOFF) > 0, "closed for the back-off only"
    cap.answered(1, 1500.0, 800.0, True, t + 2)
    assert cap.limit(True, t + 2 + capacity.BACKOFF) == 0, "again: the back-off doubled"
    assert cap.limit(True, t + 2 + 2 * capacity.BACKOFF) > 0
    for _ in range(10):
        cap.answered(1, 1500.0, 800.0, True, t + 3)
    assert cap.limit(True, t + 3 + capacity.BACKOFF_MAX) > 0, "bounded by BACKOFF_MAX"
    cap.answered(1, 810.0, 800.0, True, t + 30)  # in time: open, back-off reset
    assert cap.limit(True, t + 30) > 0
    cap.answered(1, 1500.0, 800.0, True, t + 31)
    assert cap.limit(True, t + 31 + capacity.BACKOFF) > 0


def test_expected_wait() -> None:
    cap = Capacity(4.0)
    cap.service_ms = 100.0
    assert cap.expected_wait(3) == 0.0, "below the limit: a free worker"
    assert cap.expected_wait(4) == pytest.approx(0.025), "first beyond: a quarter of a service"
    assert cap.expected_wait(7) == pytest.approx(0.1)


# -- routes ---------------------------------------------------------------------------------


def table(**kw: object) -> RouteTable:
    args: dict[str, object] = {"learn": True, "slow_ms": 200.0, "slow": (), "fast": (),
                               "max_routes": 100}
    args.update(kw)
    return RouteTable(**args)  # type: ignore[arg-type]


def test_a_route_is_slow_once_learned_above_slow_ms_and_unknown_ones_are_fast() -> None:
    t = table()
    assert not t.is_slow("GET /reports/:id", b"/reports/1"), "unknown: fast"
    t.answered("GET /reports/:id", 800.0, 0.0)
    assert t.is_slow("GET /reports/:id", b"/reports/2")
    assert t.expected_ms("GET /reports/:id") == 800.0, "starts at its first answer's time"
    t.answered("GET /items/:id", 5.0, 0.0)
    assert not t.is_slow("GET /items/:id", b"/items/3")


@pytest.mark.parametrize(
    ("answers", "lo", "hi"),
    [
        # (ms, seconds after the previous answer)...: the learned time after them
        ([(800, 0), (800, 0.001)], 799, 801),
        ([(800, 0), (10, 0.001)], 404, 406),  # two answers at once: their mean
        ([(800, 0)] + [(10, 0.01)] * 6000, 10, 30),  # a minute of 100/s faster answers
        ([(800, 0), (10, 60.0)], 10, 30),  # asked once a minute: 98 % of the way to it
    ],
)
def test_the_learned_time_starts_at_the_first_answer_and_follows_change_within_a_minute(
    answers: list[tuple[float, float]], lo: float, hi: float
) -> None:
    t = table()
    now = 0.0
    for ms, dt in answers:
        now += dt
        t.answered("GET /x", ms, now)
    assert lo <= t.expected_ms("GET /x") <= hi


def test_what_is_known_of_a_route_needs_learning_or_a_prefix() -> None:
    t = table(fast=("/health",), slow=("/reports/",))
    assert t.kind("GET /items/:id", b"/items/1") == routes.UNKNOWN, "fast, but not known to be"
    t.answered("GET /items/:id", 5.0, 0.0)
    t.answered("GET /big", 500.0, 0.0)
    assert t.kind("GET /items/:id", b"/items/2") == routes.KNOWN_FAST
    assert t.kind("GET /big", b"/big") == routes.KNOWN_SLOW
    assert t.kind("GET /health", b"/health") == routes.KNOWN_FAST
    assert t.kind("GET /r", b"/reports/") == routes.KNOWN_SLOW
    assert table(learn=False).kind("GET /x", b"/x") == routes.KNOWN_FAST, "learn = false"
    # known(): the kind and the learned time from one lookup, as the local socket asks for them
    t.answered("GET /r", 900.0, 0.0)
    t.answered("GET /health", 2.0, 0.0)
    for route, target in (("GET /items/:id", b"/items/2"), ("GET /big", b"/big"),
                          ("GET /health", b"/health"), ("GET /r", b"/reports/"),
                          ("GET /new", b"/new")):
        assert t.known(route, target) == (t.kind(route, target), t.expected_ms(route)), route
    assert t.known("GET /r", b"/reports/") == (routes.KNOWN_SLOW, 900.0), "a prefix keeps the time"
    assert t.known("GET /new", b"/new") == (routes.UNKNOWN, 0.0)
    # the overflow policy takes is_slow() from known() (exchange.start): the same answer
    for tab in (t, table(learn=False, slow=("/reports/",)), table(fast=("/big",))):
        for route, target in (("GET /items/:id", b"/items/2"), ("GET /big", b"/big"),
                              ("GET /health", b"/health"), ("GET /r", b"/reports/"),
                              ("GET /new", b"/new")):
            is_slow = tab.is_slow(route, target)
            assert is_slow == (tab.known(route, target)[0] == routes.KNOWN_SLOW), route


def test_answered_returns_the_learned_time_before_and_after_it() -> None:
    """What exchange._learn reads from the one lookup answered() makes: expected_ms() just
    before the answer and just after it, whatever the answer did (first, unclean, an outlier,
    learning off)."""
    t = table()
    now = 0.0
    steps = [("GET /a", 5.0, False), ("GET /a", 7.0, True), ("GET /a", 9.0, True),
             ("GET /a", 900.0, True), ("GET /a", 3.0, False), ("GET /b", 40.0, True)]
    steps += [("GET /a", 900.0, True)] * routes.OUTLIERS_IN_A_ROW
    for route, ms, clean in steps:
        now += 0.5
        before = t.expected_ms(route)
        got = t.answered(route, ms, now, clean)
        assert got == (before, t.expected_ms(route)), (route, ms, clean)
    assert t.expected_ms("GET /a") > 100.0, "the outliers in a row were learned at last"
    assert table(learn=False).answered("GET /a", 5.0, 0.0) == (0.0, 0.0)


def test_an_answer_that_waited_for_a_worker_is_not_the_routes_time() -> None:
    """At capacity a fast route's answers sometimes come a second late (they queued behind
    slow work): those do not teach its time, unless OUTLIERS_IN_A_ROW come in a row (then the
    route itself got slower, and is followed)."""
    t = table()
    now = 0.0
    t.answered("GET /items/:id", 2.0, now)
    for i in range(200):  # every other answer queued for a second
        now += 0.01
        t.answered("GET /items/:id", 1000.0 if i % 2 else 2.0, now)
    assert t.expected_ms("GET /items/:id") == pytest.approx(2.0)
    assert not t.is_slow("GET /items/:id", b"/items/1")
    for _ in range(routes.OUTLIERS_IN_A_ROW + 30):  # a deploy made it slow for good
        now += 1.0
        t.answered("GET /items/:id", 900.0, now)
    assert t.is_slow("GET /items/:id", b"/items/1")


def test_prefixes_override_learning_and_learn_false_keeps_every_route_fast() -> None:
    t = table(slow=("/exports/",), fast=("/reports/cheap",))
    assert t.is_slow("GET /exports/:id", b"/exports/9"), "listed slow, never learned"
    t.answered("GET /reports/cheap", 900.0, 0.0)
    assert not t.is_slow("GET /reports/cheap", b"/reports/cheap?x=1"), "listed fast"
    off = table(learn=False, slow=("/exports/",))
    off.answered("GET /reports/:id", 900.0, 0.0)
    assert not off.is_slow("GET /reports/:id", b"/reports/1")
    assert off.routes == {}, "nothing learned"
    assert off.is_slow("POST /exports", b"/exports/")


def test_at_most_max_routes_the_least_recently_answered_go_first() -> None:
    t = table(max_routes=3)
    for name in ("a", "b", "c"):
        t.answered(f"GET /{name}", 1.0, 0.0)
    t.answered("GET /a", 1.0, 1.0)  # a is used again: b is now the oldest
    t.answered("GET /d", 1.0, 2.0)
    assert set(t.routes) == {"GET /a", "GET /c", "GET /d"}
    # the route answered last answered again keeps its place at the end, in place
    t.answered("GET /d", 1.0, 3.0)
    t.answered("GET /c", 1.0, 4.0)
    t.answered("GET /c", 1.0, 5.0)
    assert list(t.routes) == ["GET /a", "GET /d", "GET /c"]
    assert t.routes["GET /c"].count == 3 and t.routes["GET /d"].count == 2
    t.answered("GET /e", 1.0, 6.0)
    assert list(t.routes) == ["GET /d", "GET /c", "GET /e"]


def test_slowest_lists_routes_by_learned_time_with_class_and_count() -> None:
    t = table(slow=("/always",))
    t.answered("GET /items/:id", 4.0, 0.0)
    t.answered("GET /items/:id", 6.0, 0.0)
    t.answered("GET /reports/:id", 900.0, 0.0)
    t.answered("GET /always", 1.0, 0.0)
    assert t.slowest() == [
        {"route": "GET /reports/:id", "class": "slow", "ms": 900.0, "count": 1},
        {"route": "GET /items/:id", "class": "fast", "ms": 5.0, "count": 2},
        {"route": "GET /always", "class": "slow", "ms": 1.0, "count": 1},
    ]
    assert len(t.slowest(limit=1)) == 1


def test_count_is_every_answer_but_only_clean_ones_teach_the_time() -> None:
    """/status's `count` is what an operator counts (answers), not the samples the average
    took: an outlier or an answer that may have waited for a worker (not `clean`) is counted
    and teaches nothing; a route first answered unclean is not learned from that answer."""
    t = table()
    t.answered("GET /items/:id", 900.0, 0.0, clean=False)
    assert t.expected_ms("GET /items/:id") == 0.0, "a first answer that may have queued..."
    assert t.kind("GET /items/:id", b"/items/1") == UNKNOWN, "... is not the route's time"
    assert not t.is_slow("GET /items/:id", b"/items/1")
    t.answered("GET /reports/:id", 300.0, 0.05)
    assert t.slowest() == [
        {"route": "GET /reports/:id", "class": "slow", "ms": 300.0, "count": 1},
        {"route": "GET /items/:id", "class": "fast", "ms": 900.0, "count": 1},
    ], "counted, listed after the learned routes"
    t.answered("GET /items/:id", 2.0, 0.1)
    t.answered("GET /items/:id", 2.0, 0.2)
    t.answered("GET /items/:id", 500.0, 0.3)  # an outlier
    t.answered("GET /items/:id", 700.0, 0.4, clean=False)
    assert t.expected_ms("GET /items/:id") == pytest.approx(2.0)
    assert t.slowest()[1] == {"route": "GET /items/:id", "class": "fast", "ms": 2.0, "count": 5}
    assert t.kind("GET /items/:id", b"/items/1") == KNOWN_FAST
