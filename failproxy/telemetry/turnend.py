"""Work put off until the end of an event-loop turn, run by one loop callback for all of it.

The hot path gathers what is cheap to gather and dear to write out: log lines (one write() for
a turn's lines), counters in shared memory (a memoryview store costs ~1k instructions, a list
item a few dozen), this worker's share of the cross-worker load table. Each writer wants to run
once, after the callbacks already queued for the turn. With a `loop.call_soon` each, a turn paid
one uvloop Handle per writer (~1.5k instructions each to make, run and free,
bench.profiles.realsock), and behind unicorn a turn often carries a single request, so that was paid
per request. Here the writers share one Handle per turn.

A caller that runs a batch of callbacks and knows when it ends (rawtransport.Poller: every
upstream socket ready in one loop callback) can `hold()` the turn end for it: what is deferred
meanwhile runs at its `release()`, with no Handle at all. Behind unicorn the turn that reads an
answer writes the access line, the counters and the load table: one Handle per request saved
(~2k instructions). Work deferred outside the batch, in the same turn, still gets its Handle.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final, TypeVar

T = TypeVar("T")


def put(items: list[T], n: int, item: T) -> None:
    """`items[n] = item`, the list grown by one when it is `n` long: for a list kept with a
    count of its live entries, never emptied. An emptied list frees its storage, and the next
    append makes it again (~0.2k instructions for each list emptied and refilled a turn)."""
    if n < len(items):
        items[n] = item
    else:
        items.append(item)


def _nothing() -> None:
    """What a run writer's entry holds until the next turn's takes its place."""


# A function named as a value, not called, is a lookup in the module's dict in the compiled
# build (~150 instructions, for each writer run: bench.profiles.lockstep); a Final is a C static.
_NOTHING: Final[Callable[[], None]] = _nothing


class TurnEnd:
    """The end of the current turn of one loop (`of(loop)`)."""

    __slots__ = ("_due", "_ndue", "_run_bound", "_scheduled", "held", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        # The writers deferred this turn: the first `_ndue` entries (the list is kept: put()).
        self._due: list[Callable[[], None]] = []
        self._ndue = 0
        self._scheduled = False
        # In a batch (hold() .. release()): the loop is running, as a writer may need to know
        # (jsonlog.Sink), without asking it (a call by name, ~200 instructions).
        self.held = False
        self._run_bound = self._run  # bound once, not once a turn

    def hold(self) -> None:
        """A batch of callbacks begins; the caller calls `release()` when it ends (always: in a
        `finally`). Batches do not nest."""
        self.held = True

    def release(self) -> None:
        """The batch is over: run what it deferred, unless a Handle already waits for it (work
        deferred before the batch, in this turn: it runs all of it, once)."""
        self.held = False
        if self._ndue and not self._scheduled:
            self._run()

    def defer(self, flush: Callable[[], None]) -> None:
        """Run `flush` after the callbacks already queued for this turn, as `call_soon` would.
        The caller keeps its own flag, so each writer defers once per turn; `flush` is best a
        bound method the caller made once (binding one per call costs what is saved here)."""
        n = self._ndue
        put(self._due, n, flush)
        self._ndue = n + 1
        if not self._scheduled and not self.held:
            self._scheduled = True
            self.loop.call_soon(self._run_bound)

    def _run(self) -> None:
        """Run the deferred writers in order; one a writer defers meanwhile runs in this pass."""
        self._scheduled = False
        due = self._due
        i = 0
        while i < self._ndue:
            flush = due[i]
            due[i] = _NOTHING
            i += 1
            try:
                flush()
            except Exception as exc:  # one writer's failure must not leave the others unflushed
                self.loop.call_exception_handler(
                    {"message": "failproxy: end-of-turn flush failed", "exception": exc})
        self._ndue = 0


_CURRENT: Final[list[TurnEnd | None]] = [None]


def of(loop: asyncio.AbstractEventLoop) -> TurnEnd:
    """The TurnEnd of `loop`. Writers look it up once and keep it; a loop that is not the last
    one asked for gets a new TurnEnd (correct either way: a turn then costs one Handle more)."""
    current = _CURRENT[0]
    if current is None or current.loop is not loop:
        current = TurnEnd(loop)
        _CURRENT[0] = current
    return current
