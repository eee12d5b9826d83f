"""The `room` policy's books of this worker's requests in service at the local socket: when
each was sent, when its route's learned time says it ends, whether its route is known to be
fast, and the run of fast local answers (balance.Room reads them for `_fast_box` and
`_may_probe`).

Two twins behind one name (`LocalBooks`), as loadshare.py's and telemetry/slot.py's: the
compiled build's is `_localbooks.pyx`, the entries in a C array, so the C core
(proxy/_core.pyx) enters and ends its requests there with C calls (`_localbooks.pxd`) while the
relay's Room calls the same object's methods: one set of books, whichever side sent the
request. `LocalBooksPy` (here) keeps them in a dict, the pure build's. tests/test_localbooks.py
runs both on the same calls.

Keys are the callers' own objects (an exchange, the core's connection), compared by identity;
the entries stay in the order they were sent (a key sent again keeps its place), the oldest
first, which is what `fast_box` reads.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

from failproxy.routing.routes import KNOWN_FAST, UNKNOWN


class LocalBooking(Protocol):
    """Either twin, as balance.Room uses it."""

    slow_after: float  # a local answer slower than this makes the box slow (0: never fast)
    fast_run: int  # local answers in a row that came within slow_after
    slow_at: float  # when a local answer last took longer than slow_after

    def sent(self, key: object, now: float, kind: int, route_ms: float) -> None: ...
    def answered(self, key: object, now: float) -> None: ...
    def ended(self, key: object, now: float) -> None: ...
    def rekey(self, old: object, new: object) -> None: ...
    def may_probe(self, now: float) -> bool: ...
    def fast_box(self, now: float, evidence: int, memory: float) -> bool: ...
    def __len__(self) -> int: ...


class LocalBooksPy:
    """The pure twin (module docstring)."""

    __slots__ = ("_sent", "_unsure", "fast_run", "slow_after", "slow_at")

    def __init__(self, slow_after: float) -> None:
        self.slow_after = slow_after  # a local answer slower than this makes the box slow
        # when each was sent, and when it is expected to end (its route's learned time after
        # it was sent; never, for a route not learned yet). One dict of pairs, not two dicts: a
        # request then stores and deletes once (~0.2k instructions each).
        self._sent: dict[object, tuple[float, float]] = {}
        # ... those of a route not known to be fast (learned slow, or not learned yet)
        self._unsure: set[object] = set()
        self.fast_run = 0
        self.slow_at = -1e9

    def __len__(self) -> int:
        return len(self._sent)

    def sent(self, key: object, now: float, kind: int, route_ms: float) -> None:
        """An attempt took a slot on the local socket; `kind`: what is known of its route
        (routes.KNOWN_FAST, KNOWN_SLOW or UNKNOWN), `route_ms` its learned time."""
        # a route listed slow but not timed (routes.learn off, or no answer yet) may take any
        # time, as one not learned yet
        unsure = kind == UNKNOWN or (kind != KNOWN_FAST and not route_ms)
        self._sent[key] = (now, math.inf if unsure else now + route_ms / 1000.0)
        if kind != KNOWN_FAST:
            self._unsure.add(key)

    def answered(self, key: object, now: float) -> None:
        """That attempt's response head arrived (its worker is done with it)."""
        sent = self._gone(key)
        if sent < 0:
            return
        if now - sent > self.slow_after:
            self._slowed(now)
        else:
            self.fast_run += 1

    def ended(self, key: object, now: float) -> None:
        """That attempt ended with no response head (failed, or its client left)."""
        sent = self._gone(key)
        if sent >= 0 and now - sent > self.slow_after:
            self._slowed(now)

    def rekey(self, old: object, new: object) -> None:
        """An attempt changed hands (the C core's request, taken over by the relay's exchange:
        Exchange.adopt): its entry follows it, in the same place."""
        books = self._sent
        if old not in books:
            return
        items = [(new if key is old else key, sent) for key, sent in books.items()]
        books.clear()
        books.update(items)
        unsure = self._unsure
        if old in unsure:
            unsure.discard(old)
            unsure.add(new)

    def may_probe(self, now: float) -> bool:
        """Is the time of each of ours in service known (balance.Room._may_probe says why):
        none of a route not learned yet, none overdue (in service for twice its route's time
        and slow_after more)."""
        margin = self.slow_after
        for sent, end in self._sent.values():
            if end == math.inf:
                return False
            if now > end + margin + (end - sent):
                return False
        return True

    def fast_box(self, now: float, evidence: int, memory: float) -> bool:
        """`evidence` local answers in a row came within slow_after, none slower for `memory`
        seconds, none of ours in service has been there longer, and each of those is of a
        route known to be fast (balance.Room._fast_box says why)."""
        if (
            self.slow_after <= 0
            or self.fast_run < evidence
            or now - self.slow_at < memory
            or self._unsure
        ):
            return False
        for sent, _end in self._sent.values():  # the oldest first (insertion order)
            if now - sent > self.slow_after:
                self._slowed(now)  # a slow one is in service now: do not queue behind it
                return False
            break
        return True

    def _slowed(self, now: float) -> None:
        self.slow_at = now
        self.fast_run = 0

    def _gone(self, key: object) -> float:
        """Forget an attempt; when it was sent (-1.0: not known). `get` and `del`, not `pop`:
        the compiled build has the first two as C calls, `pop` only by name."""
        books = self._sent
        attempt = books.get(key)
        if attempt is None:
            return -1.0
        del books[key]
        unsure = self._unsure
        if unsure:
            unsure.discard(key)
        return attempt[0]


def _select() -> tuple[Callable[[float], LocalBooking], str]:
    try:
        from failproxy.routing._localbooks import (  # type: ignore[import-not-found]
            LocalBooks as compiled,
        )
    except ImportError:
        return LocalBooksPy, "pure"
    return compiled, "cython"


# The twin this build runs (tests/test_localbooks.py runs both).
LocalBooks, BUILT = _select()
