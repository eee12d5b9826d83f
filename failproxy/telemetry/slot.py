"""The hot path's counter writes into this worker's slot of shared memory (metrics.py).

Two twins behind one name, chosen at import as `accessline` chooses its renderer:

- `SlotWriter` from `_slot.pyx` (Cython), where it was built and the build runs compiled: each
  change is one C store into the mapped slot, at once. A store through a Python memoryview
  costs a generic item get and set (~1.5k instructions); through a C pointer, one instruction.
- `SlotWriterPy` (here) otherwise: it keeps the slot's values in lists and, attached to a loop,
  writes the changed counters at the end of the loop's turn (telemetry/turnend.py), so a turn
  of requests pays one memoryview store per changed counter, not one per change.

Either way the master reads exact counts once a turn has ended; the Cython twin's are exact
sooner. tests/test_slot.py runs both on the same changes and compares the slots. `BUILT` says
which one runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol


class Deferrer(Protocol):
    """telemetry.turnend.TurnEnd, as the pure twin uses it."""

    def defer(self, flush: Callable[[], None]) -> None: ...


class SlotWriting(Protocol):
    """What metrics.WorkerMetrics asks of either twin."""

    def attach(self, turn: Deferrer) -> None: ...
    def add(self, index: int, n: int) -> None: ...
    def request(self, status: int, duration: float) -> None: ...
    def upstream_request(self, server: int) -> None: ...
    def failover(self, from_server: int, to_server: int, reason: int) -> None: ...
    def connect_duration(self, server: int, seconds: float) -> None: ...
    def flush(self) -> None: ...
    def release(self) -> None: ...


class SlotLayout(Protocol):
    """Where the hot path's counters sit in a slot (metrics._Layout)."""

    status: int
    duration: int
    server_requests: int
    server_failovers: int
    failovers: int
    connect: int
    n_q: int
    n_d: int


class SlotWriterPy:
    """The pure-Python twin (module docstring). Unattached (the master, tests), every change is
    written at once."""

    __slots__ = (
        "_c",
        "_conn_bounds",
        "_conn_w",
        "_d",
        "_dd",
        "_ddirty",
        "_dirty",
        "_dq",
        "_dur",
        "_dur_at",
        "_flush",
        "_fo",
        "_n",
        "_n_reasons",
        "_q",
        "_scheduled",
        "_sfo",
        "_sreq",
        "_statuses",
        "_td",
        "_tq",
        "_turn",
    )

    def __init__(self, q: memoryview[int], d: memoryview[float], layout: SlotLayout, n_servers: int,
                 n_reasons: int, duration_bounds: Sequence[float],
                 connect_bounds: Sequence[float]) -> None:
        self._q = q
        self._d = d
        self._statuses = layout.duration - layout.status
        self._dur_at = layout.duration
        self._dur = tuple(duration_bounds)
        self._sreq = layout.server_requests
        self._sfo = layout.server_failovers
        self._fo = layout.failovers
        self._c = layout.connect
        self._conn_bounds = tuple(connect_bounds)
        self._conn_w = len(self._conn_bounds) + 1
        self._n = n_servers
        self._n_reasons = n_reasons
        # Only this worker writes its slot, so the slot's values are kept here too (`_tq`,
        # `_td`) and a flush stores each changed counter without reading shared memory back.
        # Changes not yet there: deltas by index and the indexes touched, for both kinds.
        self._tq: list[int] = [0] * layout.n_q
        self._td: list[float] = [0.0] * layout.n_d
        self._dq: list[int] = [0] * layout.n_q
        self._dd: list[float] = [0.0] * layout.n_d
        self._dirty: list[int] = []
        self._ddirty: list[int] = []
        self._turn: Deferrer | None = None
        self._flush = self.flush  # bound once: deferred every turn
        self._scheduled = False

    def attach(self, turn: Deferrer) -> None:
        """From now on, gather changes and write them at the end of each of `turn`'s turns."""
        self._turn = turn

    def add(self, index: int, n: int) -> None:
        turn = self._turn
        if turn is None:
            total = self._tq[index] + n
            self._tq[index] = total
            self._q[index] = total
            return
        dq = self._dq
        if not dq[index]:
            self._dirty.append(index)  # twice if it came back to 0 meanwhile: adds 0 again
        dq[index] += n
        if not self._scheduled:
            self._scheduled = True
            turn.defer(self._flush)

    def _add_float(self, index: int, value: float) -> None:
        turn = self._turn
        if turn is None:
            total = self._td[index] + value
            self._td[index] = total
            self._d[index] = total
            return
        dd = self._dd
        if not dd[index]:
            self._ddirty.append(index)
        dd[index] += value
        if not self._scheduled:
            self._scheduled = True
            turn.defer(self._flush)

    def request(self, status: int, duration: float) -> None:
        self.add(status if 0 <= status < self._statuses else 0, 1)
        self.add(self._dur_at + _bucket(self._dur, duration), 1)
        self._add_float(0, duration)

    def upstream_request(self, server: int) -> None:
        self.add(self._sreq + server, 1)

    def failover(self, from_server: int, to_server: int, reason: int) -> None:
        self.add(self._fo + (from_server * self._n + to_server) * self._n_reasons + reason, 1)
        self.add(self._sfo + from_server, 1)

    def connect_duration(self, server: int, seconds: float) -> None:
        self.add(self._c + server * self._conn_w + _bucket(self._conn_bounds, seconds), 1)
        self._add_float(1 + server, seconds)

    def flush(self) -> None:
        """Write the gathered changes to shared memory."""
        self._scheduled = False
        q = self._q
        tq = self._tq
        dq = self._dq
        for index in self._dirty:
            total = tq[index] + dq[index]
            tq[index] = total
            q[index] = total
            dq[index] = 0
        self._dirty.clear()
        d = self._d
        td = self._td
        dd = self._dd
        for index in self._ddirty:
            value = td[index] + dd[index]
            td[index] = value
            d[index] = value
            dd[index] = 0.0
        self._ddirty.clear()

    def release(self) -> None:
        """The slot is being unmapped: changes not written yet are dropped."""
        self._dirty.clear()
        self._ddirty.clear()
        self._turn = None


def _bucket(bounds: tuple[float, ...], value: float) -> int:
    """The histogram bucket of `value`: the first bound it does not exceed; a NaN falls past
    the last one."""
    bucket = 0
    for bound in bounds:
        if value <= bound:
            break
        bucket += 1
    return bucket


def _select() -> tuple[Callable[..., SlotWriting], str]:
    try:
        from failproxy.telemetry._slot import SlotWriter as compiled  # type: ignore[import-not-found]
    except ImportError:
        return SlotWriterPy, "pure"
    return compiled, "cython"


SlotWriter, BUILT = _select()
