"""Every worker's requests in flight to each peer, in shared memory: the overflow policy
(balance.py) decides on the whole box's load, not one worker's share of it.

One table per config generation: an anonymous shared mmap the master creates before it forks
that generation's workers, a column per worker (the master hands columns out at fork and clears
a column when its worker is gone), a row per peer slot; cell 0 holds how many columns were ever
handed out, so readers scan only those. A worker writes only its own column and reads the
others; aligned 8-byte stores need no lock.

Two twins behind one name (`LoadView`), as telemetry/slot.py's: the compiled build's is
`_loadview.pyx`, whose stores and sums are C loads and stores through the mapped buffer, at once.
The pure twin (`LoadViewPy`) batches both per event-loop turn, as the pure metrics do (a
memoryview item costs ~1.5k instructions): a worker's changes reach the table at the end of the
turn, and what it knows of its siblings is at most one turn old. Either way a sibling sees a
change by the end of the turn it was made in.
"""

from __future__ import annotations

import asyncio
import mmap
from collections.abc import Callable
from typing import Protocol

from failproxy.telemetry import turnend

COLUMNS = 64  # workers of one generation at once (TTIN past it shares a column: still a count)


class LoadShare:
    """The table, as the master holds it (it only hands out and clears columns)."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._mm: mmap.mmap | None = mmap.mmap(-1, 8 * (1 + slots * COLUMNS))
        self.cells = memoryview(self._mm).cast("q")
        self._free = list(range(COLUMNS - 1, -1, -1))

    def claim(self) -> int:
        """A column for a worker about to be forked."""
        column = self._free.pop() if self._free else COLUMNS - 1
        if column + 1 > self.cells[0]:
            self.cells[0] = column + 1
        return column

    def release(self, column: int) -> None:
        """The column's worker is gone: its requests in flight with it."""
        if self._mm is None:
            return
        base = 1 + column * self.slots
        self.cells[base : base + self.slots] = memoryview(bytes(8 * self.slots)).cast("q")
        if column not in self._free:
            self._free.append(column)

    def close(self) -> None:
        if self._mm is not None:
            self.cells.release()
            self._mm.close()
            self._mm = None


class LoadSharing(Protocol):
    """A worker's side of the table, either twin (`LoadView`)."""

    def publish(self, slot: int, count: int) -> None: ...
    def others(self, slot: int) -> int: ...
    def others_of(self, slot: int, also: int) -> int: ...


class LoadViewPy:
    """A worker's side of the table: its own column written, the others summed. The pure twin
    of `_loadview.pyx`'s LoadView (C stores at once), gathering per loop turn as the module
    docstring says."""

    __slots__ = ("_cells", "_column", "_dirty", "_flush_bound", "_fresh", "_mine", "_others",
                 "_scheduled", "_slots", "_turn")

    def __init__(self, share: LoadShare, column: int, loop: asyncio.AbstractEventLoop) -> None:
        self._cells = share.cells
        self._slots = share.slots
        self._column = column
        self._mine: list[int] = [0] * share.slots  # this worker's counts, as last published
        self._dirty: list[int] = []  # slots whose count changed this turn
        self._others: list[int] = [0] * share.slots  # the siblings' sums, as of `_fresh`
        self._fresh = False
        self._scheduled = False
        self._turn = turnend.of(loop)
        self._flush_bound = self._flush  # bound once: deferred every turn

    def publish(self, slot: int, count: int) -> None:
        """This worker now has `count` requests awaiting `slot`'s answer."""
        if slot >= self._slots:
            return
        if self._mine[slot] != count or slot in self._dirty:
            self._mine[slot] = count
            self._dirty.append(slot)
            self._turn_end()

    def others(self, slot: int) -> int:
        """Requests the other workers have awaiting `slot`'s answer (as of this loop turn)."""
        if slot >= self._slots:
            return 0
        if not self._fresh:
            self._refresh()
        return self._others[slot]

    def others_of(self, slot: int, also: int) -> int:
        """`others` of two slots at once, summed (`also` < 0: of `slot` alone): the overflow
        policy counts a box's two sockets together, and a call from the compiled build costs
        more than the sum."""
        n = self.others(slot)
        return n + self.others(also) if also >= 0 else n

    def _refresh(self) -> None:
        cells = self._cells
        slots = self._slots
        own = self._column
        others = [0] * slots
        for column in range(int(cells[0])):
            if column == own:
                continue
            base = 1 + column * slots
            counts: list[int] = cells[base : base + slots].tolist()
            for slot in range(slots):
                others[slot] += counts[slot]
        self._others = others
        self._fresh = True
        self._turn_end()

    def _turn_end(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self._turn.defer(self._flush_bound)

    def _flush(self) -> None:
        self._scheduled = False
        self._fresh = False
        base = 1 + self._column * self._slots
        for slot in self._dirty:
            self._cells[base + slot] = self._mine[slot]
        self._dirty.clear()


def _select() -> tuple[Callable[[LoadShare, int, asyncio.AbstractEventLoop], LoadSharing], str]:
    try:
        from failproxy.routing._loadview import LoadView as compiled  # type: ignore[import-not-found]
    except ImportError:
        return LoadViewPy, "pure"
    return compiled, "cython"


# The twin this build runs (tests/test_loadshare.py runs both).
LoadView, BUILT = _select()
