"""A deadline that is cheap to move: setting it later costs an attribute write, not a new timer.

As aiohttp's keep-alive timer: the callback fires at the scheduled time, sees the deadline moved
and reschedules itself, so per-request activity never cancels and re-creates timer handles.

The same holds across connections, client and upstream alike: a connection that ends gives
its timer back (`give_back`) with its loop handle still scheduled, and the next one takes it
(`take_timer`). Behind unicorn, which closes every connection, that saves a `loop.call_at` and a
cancel per request (~6k instructions of uvloop's TimerHandle, counted by bench.profiles.realsock
--mode close); clients that open a connection per request save the same.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final


class Timer:
    __slots__ = ("_at", "_callback", "_handle", "_loop", "_standin", "deadline")

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self._loop = loop
        self._callback = callback
        self._handle: asyncio.TimerHandle | None = None
        self._at = 0.0
        # monotonic() when it is due, 0.0 when unarmed (monotonic time is never 0): a float
        # kept unboxed in the compiled build, where `float | None` boxed one per set (~65
        # instructions, several sets a request).
        self.deadline = 0.0
        self._standin: Timer | None = None  # what give_back hands the ended connection

    def set(self, deadline: float) -> None:
        self.deadline = deadline
        if self._handle is None or self._at > deadline:
            if self._handle is not None:
                self._handle.cancel()
            self._at = deadline
            self._handle = self._loop.call_at(deadline, self._fire)

    def clear(self) -> None:
        self.deadline = 0.0

    def close(self) -> None:
        self.deadline = 0.0
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def hold(self) -> None:
        """Its connection ended and keeps it for its next life (upstream.open_connection): it
        is unarmed and calls nothing, so it keeps the connection alive no longer."""
        self.deadline = 0.0
        self._callback = _NOTHING

    def held_by(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Was it held (`hold`) on `loop`, so that `resume` may serve a connection there?"""
        return self._callback is _NOTHING and self._loop is loop

    def resume(self, callback: Callable[[], None]) -> None:
        """A held timer serves its connection's next life."""
        self._callback = callback

    def give_back(self) -> Timer:
        """Its connection ended: keep the timer (and its scheduled handle) for the next one.
        Returns an unarmed stand-in for the ended connection to hold instead: made once per
        timer and handed to each connection that gives it back (its callback does nothing, so
        ended connections may share it), not one made and freed per connection."""
        self.hold()  # the ended connection is not kept alive by its timer
        if len(_SPARE) < SPARE_MAX:
            _SPARE.append(self)
        elif self._handle is not None:
            self._handle.cancel()
            self._handle = None
        standin = self._standin
        if standin is None:
            standin = self._standin = Timer(self._loop, _NOTHING)
        return standin

    def _fire(self) -> None:
        self._handle = None
        deadline = self.deadline
        if not deadline:
            return
        if self._loop.time() < deadline:
            self._at = deadline
            self._handle = self._loop.call_at(deadline, self._fire)
            return
        self.deadline = 0.0
        self._callback()


def _nothing() -> None:
    pass


_NOTHING: Final = _nothing  # a static: a function used as a value is a dict lookup


SPARE_MAX: Final = 64  # timers kept for new connections (a few per concurrent new connection)
_SPARE: Final[list[Timer]] = []


def take_timer(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> Timer:
    """A timer for a new connection: one an ended connection gave back, else a new one."""
    while _SPARE:
        t = _SPARE.pop()
        if t._loop is loop:
            t._callback = callback
            return t
        t.close()  # another (a test's, or a closed) loop's
    return Timer(loop, callback)
