"""An asyncio event loop on a virtual clock, for tests of timing logic that must not depend on
how fast a (loaded) machine runs.

`VirtualClockLoop` is a plain `asyncio.SelectorEventLoop` whose `time()` is a counter: where the
loop would block in `select(timeout)` waiting for its next timer, the clock jumps by `timeout`
instead and the select polls without blocking. So timers fire in their order and at their exact
virtual times, `asyncio.sleep(0.05)` returns with `loop.time()` exactly 0.05 later, and nothing
that happens between two timers can be late. Real I/O still works (polled), but a test that
waits on a socket with no timer pending would spin: use it for timer logic only."""

from __future__ import annotations

import asyncio
import selectors
from typing import Any


class _JumpingSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    def __init__(self, clock: VirtualClockLoop) -> None:
        super().__init__()
        self._clock = clock

    def select(self, timeout: float | None = None) -> Any:
        if timeout is not None and timeout > 0:
            self._clock.now += timeout
        return super().select(0)


class VirtualClockLoop(asyncio.SelectorEventLoop):
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        super().__init__(selector=_JumpingSelector(self))

    def time(self) -> float:
        return self.now


def run(coro: Any, start: float = 1000.0) -> Any:
    """`asyncio.run(coro)` on a fresh VirtualClockLoop."""
    loop = VirtualClockLoop(start)
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()
