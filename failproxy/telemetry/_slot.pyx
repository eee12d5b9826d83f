# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""The hot path's counter writes into this worker's slot, as C stores (slot.py's `SlotWriter`).

The compiled twin of slot.py's `SlotWriterPy`, selected by slot.py at import: the same counts
in the same cells (tests/test_slot.py runs both on the same changes). The pure twin keeps the
slot in lists and writes changed cells through a memoryview at the end of the loop's turn,
because a memoryview store is a generic item set (~1.5k instructions); here the slot's buffer
is held for the writer's life and every change is one store through a C pointer, at once, so
there is nothing to gather and nothing to flush. Aligned 8-byte stores are single
instructions: the master reads the slot while the worker writes it (metrics.py).

Indexes are checked against the slot (IndexError), as the pure twin's list would. The C core
(proxy/_core.pyx) cimports the writer (`_slot.pxd`) and makes a request's counts as C calls
into the same cells.
"""

cdef class SlotWriter:
    # the C attributes are declared in _slot.pxd

    def __init__(self, q, d, layout, Py_ssize_t n_servers, Py_ssize_t n_reasons,
                 duration_bounds, connect_bounds):
        cdef Py_ssize_t i
        self._qv = q
        self._dv = d
        self._nq = self._qv.shape[0]
        self._nd = self._dv.shape[0]
        if self._nq == 0 or self._nd == 0:
            raise ValueError("an empty slot")
        self._q = &self._qv[0]
        self._d = &self._dv[0]
        self._statuses = layout.duration - layout.status
        self._dur_at = layout.duration
        self._sreq = layout.server_requests
        self._sfo = layout.server_failovers
        self._fo = layout.failovers
        self._c = layout.connect
        self._n = n_servers
        self._n_reasons = n_reasons
        if len(duration_bounds) > MAX_BOUNDS or len(connect_bounds) > MAX_BOUNDS:
            raise ValueError(f"more than {MAX_BOUNDS} histogram bounds")
        self._n_dur = len(duration_bounds)
        for i in range(self._n_dur):
            self._dur[i] = duration_bounds[i]
        self._n_conn = len(connect_bounds)
        for i in range(self._n_conn):
            self._conn[i] = connect_bounds[i]
        self._conn_w = self._n_conn + 1

    cdef int bump(self, Py_ssize_t index, long long n) except -1:
        if index < 0 or index >= self._nq:
            raise IndexError("counter index outside the slot")
        self._q[index] += n
        return 0

    cdef int _sum(self, Py_ssize_t index, double value) except -1:
        if index < 0 or index >= self._nd:
            raise IndexError("sum index outside the slot")
        self._d[index] += value
        return 0

    def attach(self, turn):
        """Nothing to gather: every change is in shared memory at once."""

    def add(self, Py_ssize_t index, long long n):
        self.bump(index, n)

    def request(self, Py_ssize_t status, double duration):
        self.count_request(status, duration)

    cdef int count_request(self, Py_ssize_t status, double duration) except -1:
        cdef Py_ssize_t bucket = 0
        # `not <=`, as the pure twin's loop: a NaN falls past the last bound there too
        while bucket < self._n_dur and not (duration <= self._dur[bucket]):
            bucket += 1
        self.bump(status if 0 <= status < self._statuses else 0, 1)
        self.bump(self._dur_at + bucket, 1)
        self._sum(0, duration)
        return 0

    def upstream_request(self, Py_ssize_t server):
        self.count_upstream_request(server)

    cdef int count_upstream_request(self, Py_ssize_t server) except -1:
        return self.bump(self._sreq + server, 1)

    def failover(self, Py_ssize_t from_server, Py_ssize_t to_server, Py_ssize_t reason):
        self.bump(self._fo + (from_server * self._n + to_server) * self._n_reasons + reason, 1)
        self.bump(self._sfo + from_server, 1)

    def connect_duration(self, Py_ssize_t server, double seconds):
        self.count_connect(server, seconds)

    cdef int count_connect(self, Py_ssize_t server, double seconds) except -1:
        cdef Py_ssize_t bucket = 0
        while bucket < self._n_conn and not (seconds <= self._conn[bucket]):
            bucket += 1
        self.bump(self._c + server * self._conn_w + bucket, 1)
        self._sum(1 + server, seconds)
        return 0

    def flush(self):
        """Nothing gathered, nothing to write."""

    def release(self):
        """The slot is being unmapped: let its buffer go; later changes raise IndexError."""
        self._q = NULL
        self._d = NULL
        self._nq = 0
        self._nd = 0
        self._qv = None
        self._dv = None
