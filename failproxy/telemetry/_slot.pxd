# The C entries of _slot.pyx: the hot path's counts as C calls, for the C core (_core.pyx),
# which then crosses into Python for none of a request's counters (the same cells the relay's
# calls write).

cdef enum:
    MAX_BOUNDS = 32


cdef class SlotWriter:
    cdef long long[::1] _qv  # held: the mapping cannot be closed under the pointers
    cdef double[::1] _dv
    cdef long long* _q
    cdef double* _d
    cdef Py_ssize_t _nq, _nd
    cdef Py_ssize_t _statuses, _dur_at, _sreq, _sfo, _fo, _c, _conn_w, _n, _n_reasons
    cdef double _dur[MAX_BOUNDS]
    cdef Py_ssize_t _n_dur
    cdef double _conn[MAX_BOUNDS]
    cdef Py_ssize_t _n_conn

    cdef int bump(self, Py_ssize_t index, long long n) except -1
    cdef int _sum(self, Py_ssize_t index, double value) except -1
    cdef int count_request(self, Py_ssize_t status, double duration) except -1
    cdef int count_upstream_request(self, Py_ssize_t server) except -1
    cdef int count_connect(self, Py_ssize_t server, double seconds) except -1
