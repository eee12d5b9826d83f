"""Route keys (SPEC 4.4): the method and the path with the query dropped and every segment that
looks like an identifier replaced by `:id`, so `/users/42/posts` and `/users/7/posts` learn
together as `GET /users/:id/posts`.

An identifier segment is all digits, hex of 8 or more characters, or a UUID. The key is logged
on every `request` event and is what route learning reads, so it is computed for every answered
request: a bounded cache keyed by method and raw target makes a repeated request two dict lookups.
"""

from __future__ import annotations

import math
import re
from typing import Final

_ID: Final = re.compile(
    rb"(?<=/)(?:[0-9]+|[0-9A-Fa-f]{8,}|"
    rb"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12})(?=/|$)"
)
_CACHED: Final = 4096  # targets remembered per method and worker; a full cache starts over

# method -> target -> route: a repeated request is two dict lookups, no bytes built.
_cache: Final[dict[bytes, dict[bytes, str]]] = {}


# The method object asked for last and its targets: the parsers hand a method over as the same
# bytes object each time (their table of names), so a run of GETs finds its dict by identity,
# not by a lookup (~120 instructions, bench.profiles.lockstep).
_last_method: Final[list[bytes]] = [b""]
_last_targets: Final[list[dict[bytes, str]]] = [{}]


def route_key(method: bytes, target: bytes) -> str:
    """`GET /users/:id/posts` for method b"GET" and target b"/users/42/posts?page=2"."""
    if method is _last_method[0]:
        targets = _last_targets[0]
    else:
        found = _cache.get(method)
        if found is None:
            if len(_cache) >= 64:  # methods are few; a flood of odd ones must not grow it
                _cache.clear()
            found = _cache[method] = {}
        targets = found
        _last_method[0] = method
        _last_targets[0] = targets
    route = targets.get(target)
    if route is not None:
        return route
    path = target
    cut = path.find(b"?")
    if cut >= 0:
        path = path[:cut]
    route = (method + b" " + _ID.sub(b":id", path)).decode("latin-1")
    if len(targets) >= _CACHED:
        targets.clear()
    targets[target] = route
    return route


# What is known of a route (RouteTable.kind).
KNOWN_FAST: Final = 0
KNOWN_SLOW: Final = 1
UNKNOWN: Final = 2
TAU: Final = 15.0  # seconds: a route's learned time follows a change within a minute (4 TAU: 98 %)


OUTLIER: Final = 3.0  # an answer this many times its route's time (+ OUTLIER_MS) waited
OUTLIER_MS: Final = 2.0
OUTLIERS_IN_A_ROW: Final = 8  # ... unless this many come in a row: the route got slower


class Learned:
    """What one worker knows of one route: its app time (an average that starts at the first
    answer's time), how many answers it saw (`count`, what /status shows: an operator counts
    requests, not samples), how many of them taught the average, and how many in a row it did
    not learn from. With `taught` 0 (every answer so far may have waited for a worker) `ms` is
    only the last such answer's time, an upper bound: the route counts as not learned yet."""

    __slots__ = ("at", "count", "ms", "outliers", "taught")

    def __init__(self, ms: float, at: float, taught: int = 1) -> None:
        self.ms = ms
        self.count = 1
        self.taught = taught
        self.at = at
        self.outliers = 0


class RouteTable:
    """Which routes are slow (SPEC 4.4): learned from `upstream_ms`, or listed by prefix.

    The average weighs a new answer by the larger of 1/count (so the first answers set it
    quickly) and 1 - exp(-dt/TAU) (so a route asked once a minute follows its last answers, and
    a busy one averages over TAU seconds). An answer more than OUTLIER times the learned time
    is left out unless OUTLIERS_IN_A_ROW come in a row (the time it waited for a worker is not
    the route's). At most `max_routes` keys; the least recently answered goes first (a dict
    keeps insertion order: an answered route is moved to its end).
    """

    __slots__ = ("_fast", "_newest", "_slow", "learn", "max_routes", "routes", "slow_ms")

    def __init__(self, learn: bool, slow_ms: float, slow: tuple[str, ...],
                 fast: tuple[str, ...], max_routes: int) -> None:
        self.learn = learn
        self.slow_ms = slow_ms
        self._slow = tuple(p.encode("latin-1") for p in slow)
        self._fast = tuple(p.encode("latin-1") for p in fast)
        self.max_routes = max_routes
        self.routes: dict[str, Learned] = {}
        self._newest = ""  # the route answered last: already at the end of `routes`

    def is_slow(self, route: str, target: bytes) -> bool:
        """Slow when the path starts with a `slow` prefix, or its route is learned above
        `slow_ms` and no `fast` prefix says otherwise; unknown routes are fast."""
        if self._slow and target.startswith(self._slow):
            return True
        if self._fast and target.startswith(self._fast):
            return False
        if not self.learn:
            return False
        learned = self.routes.get(route)
        return learned is not None and learned.taught > 0 and learned.ms > self.slow_ms

    def kind(self, route: str, target: bytes) -> int:
        """What is known of a route: KNOWN_FAST (under a `fast` prefix, or learned below
        `slow_ms`), KNOWN_SLOW (under a `slow` prefix, or learned above), or UNKNOWN (not
        learned yet: treated as fast, but not known to be)."""
        return self.known(route, target)[0]

    def known(self, route: str, target: bytes) -> tuple[int, float]:
        """`kind` and `expected_ms` from one lookup: a request sent to the local socket needs
        both (a tuple of two is returned unboxed between compiled functions)."""
        learned = self.routes.get(route)
        ms = learned.ms if learned is not None and learned.taught else 0.0
        if self._slow and target.startswith(self._slow):
            return KNOWN_SLOW, ms
        if self._fast and target.startswith(self._fast):
            return KNOWN_FAST, ms
        if not self.learn:
            return KNOWN_FAST, ms  # every route not listed slow is fast, by the operator's word
        if learned is None or not learned.taught:
            return UNKNOWN, ms
        return (KNOWN_FAST if learned.ms <= self.slow_ms else KNOWN_SLOW), ms

    def expected_ms(self, route: str) -> float:
        """The route's learned app time; 0.0 when it has none yet."""
        learned = self.routes.get(route)
        return learned.ms if learned is not None and learned.taught else 0.0

    def answered(self, route: str, ms: float, now: float,
                 clean: bool = True) -> tuple[float, float]:
        """An answer of `route` took `ms`. Only a `clean` one (sent where a worker was free)
        may teach the route's time; every answer is counted. Returns the route's learned time
        before and after it (`expected_ms`, 0.0 for none), from the one lookup this makes."""
        if not self.learn:
            return 0.0, 0.0
        routes = self.routes
        learned = routes.get(route)
        if learned is None:
            if len(routes) >= self.max_routes:
                del routes[next(iter(routes))]  # the least recently answered
            # an unclean first time may include a wait for a worker: counted, not learned
            learned = routes[route] = Learned(ms, now, 1 if clean else 0)
            self._newest = route
            return 0.0, (learned.ms if learned.taught else 0.0)
        before = learned.ms if learned.taught else 0.0
        if route != self._newest:
            # Taken out and put back, as the most recently answered (get and del are native
            # dict operations in the compiled build; .pop(route, None) is a method call by
            # name). The route answered last is the last already: it stays where it is, and
            # what follows changes its Learned in place (no store: ~170 instructions).
            del routes[route]
            routes[route] = learned
            self._newest = route
        learned.count += 1
        if not clean:
            if not learned.taught:
                learned.ms = ms
            return before, before
        if learned.taught and ms > OUTLIER * learned.ms + OUTLIER_MS:
            # Most likely time spent waiting for a worker (an accept queue behind someone else's
            # work), not the route's own: at capacity, fast routes whose answers queued were
            # learned slow and held behind the slow ones. A route that really got slower
            # answers so every time, and is learned after OUTLIERS_IN_A_ROW.
            learned.outliers += 1
            if learned.outliers < OUTLIERS_IN_A_ROW:
                return before, before
        else:
            learned.outliers = 0
        taught = learned.taught + 1
        weight = 1.0 / taught
        dt = now - learned.at
        if dt > 0.0:
            decay = 1.0 - math.exp(-dt / TAU)
            if decay > weight:
                weight = decay
        learned.ms += (ms - learned.ms) * weight
        learned.taught = taught
        learned.at = now
        return before, learned.ms

    def slowest(self, limit: int = 50) -> list[dict[str, object]]:
        """The slowest routes, as /status lists them; those not learned yet (no answer sent
        where a worker was free) after the learned ones, their `ms` only an upper bound."""
        ranked = sorted(self.routes.items(),
                        key=lambda item: (not item[1].taught, -item[1].ms))[:limit]
        return [
            {"route": route, "class": "slow" if self.is_slow(route, _path(route)) else "fast",
             "ms": round(learned.ms, 3), "count": learned.count}
            for route, learned in ranked
        ]


def _path(route: str) -> bytes:
    """The path of a route key (`GET /users/:id` -> b"/users/:id"), for the prefix rules."""
    return route.partition(" ")[2].encode("latin-1")
