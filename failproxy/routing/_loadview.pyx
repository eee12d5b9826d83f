# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""A worker's side of the load table (loadshare.py's `LoadViewPy`), as C loads and stores.

The compiled twin, selected by loadshare.py at import. The pure twin gathers this worker's
changes and writes them at the end of the loop's turn, and reads its siblings' columns once a
turn, because a memoryview item costs ~1.5k instructions from Python; that deferral cost a
uvloop Handle in every turn that took or answered a request (~4k instructions a request behind
unicorn, where a turn carries one: `bench.profiles.lockstep`). Here the table's buffer is held
for the view's life: `publish` is one aligned 8-byte store, at once, and `others` sums the
siblings' cells as they are now. Nothing is gathered, so nothing is flushed: the siblings see a
count as soon as it changes, sooner than the pure twin's "at the end of the turn".
"""


cimport cython


cdef class LoadView:
    cdef long long[::1] _cells_view  # held: the mapping cannot be closed under the pointer
    cdef long long* _cells
    cdef Py_ssize_t _n, _slots, _column, _base, _columns_max

    def __init__(self, share, Py_ssize_t column, loop):
        self._cells_view = share.cells
        self._n = self._cells_view.shape[0]
        self._cells = &self._cells_view[0]
        self._slots = share.slots
        if self._slots < 1 or column < 0 or 1 + (column + 1) * self._slots > self._n:
            raise ValueError("a column outside the table")
        self._column = column
        self._base = 1 + column * self._slots
        self._columns_max = (self._n - 1) // self._slots

    # Plain C methods (binding=False), not cyfunctions: Peer holds them bound, and a bound
    # builtin method is called straight, where a bound cyfunction goes through a method object
    # and keyword-aware argument parsing (bench.profiles.lockstep --seed).
    @cython.binding(False)
    def publish(self, Py_ssize_t slot, long long count):
        """This worker now has `count` requests awaiting `slot`'s answer."""
        if 0 <= slot < self._slots:
            self._cells[self._base + slot] = count

    @cython.binding(False)
    def others(self, Py_ssize_t slot):
        """Requests the other workers have awaiting `slot`'s answer, as the table says now."""
        return self._others(slot)

    @cython.binding(False)
    def others_of(self, Py_ssize_t slot, Py_ssize_t also):
        """`others` of two slots at once, summed (`also` < 0: of `slot` alone): the overflow
        policy counts a box's two sockets together, one call a choice."""
        return self._others(slot) + (self._others(also) if also >= 0 else 0)

    cdef long long _others(self, Py_ssize_t slot) noexcept:
        cdef Py_ssize_t column, columns
        cdef long long total = 0
        if slot < 0 or slot >= self._slots:
            return 0
        columns = <Py_ssize_t>self._cells[0]
        if columns > self._columns_max:
            columns = self._columns_max
        for column in range(columns):
            if column != self._column:
                total += self._cells[1 + column * self._slots + slot]
        return total
