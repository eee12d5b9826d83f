"""A deadline that is cheap to move: setting it later costs an attribute write, not a new timer.

As aiohttp's keep-alive timer: the callback fires at the scheduled time, sees the deadline moved
and reschedules itself, so per-request activity never cancels and re-creates timer handles.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Timer:
    __slots__ = ("_at", "_callback", "_handle", "_loop", "deadline")

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self._loop = loop
        self._callback = callback
        self._handle: asyncio.TimerHandle | None = None
        self._at = 0.0
        self.deadline: float | None = None

    def set(self, deadline: float) -> None:
        self.deadline = deadline
        if self._handle is None or self._at > deadline:
            if self._handle is not None:
                self._handle.cancel()
            self._at = deadline
            self._handle = self._loop.call_at(deadline, self._fire)

    def clear(self) -> None:
        self.deadline = None

    def close(self) -> None:
        self.deadline = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        deadline = self.deadline
        if deadline is None:
            return
        if self._loop.time() < deadline:
            self._at = deadline
            self._handle = self._loop.call_at(deadline, self._fire)
            return
        self.deadline = None
        self._callback()
