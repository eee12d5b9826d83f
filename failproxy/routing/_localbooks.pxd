# The C entries of _localbooks.pyx, for the C core (_core.pyx): its requests entered and ended
# in the same books as the relay's, with C calls.

cdef struct Entry:
    void* key  # a strong reference, held while the entry is (as the pure twin's dict holds it)
    double sent
    double end  # INFINITY: not known
    bint unsure


cdef class LocalBooks:
    cdef Entry* _entries
    cdef Py_ssize_t _n, _cap, _unsure
    cdef public double slow_after
    cdef public long long fast_run
    cdef public double slow_at

    cdef Py_ssize_t _find(self, object key) noexcept
    cdef void _slowed(self, double now) noexcept
    cdef int enter(self, object key, double now, int kind, double route_ms) except -1
    cdef double leave(self, object key) except? -2.0
    cdef int done(self, object key, double now) except -1
    cdef int gone(self, object key, double now) except -1
