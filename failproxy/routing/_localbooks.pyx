# cython: language_level=3, boundscheck=False, wraparound=False
"""The `room` policy's local books as a C array (localbooks.py's `LocalBooks`).

The compiled twin of localbooks.py's `LocalBooksPy`, selected there at import: the same answers
to the same calls (tests/test_localbooks.py runs both). The entries sit in one array in the
order they were sent; a request is found by a scan from the oldest, which is where an answer
usually is (the books hold this worker's requests in service at the local socket: a few, its
app workers' worth, plus those a fast box queues at home). The C core enters and ends its
requests here with C calls (`_localbooks.pxd`: `enter`, `done`, `gone`), with no Python object
made, where the pure twin's dict stores a tuple of two floats and a set; the relay's Room calls
the Python methods of the same object.
"""

from cpython.mem cimport PyMem_Free, PyMem_Realloc
from cpython.ref cimport Py_DECREF, Py_INCREF
from libc.math cimport INFINITY
from libc.string cimport memmove

from failproxy.routing.routes import KNOWN_FAST as _KNOWN_FAST, UNKNOWN as _UNKNOWN

cdef int KNOWN_FAST = _KNOWN_FAST
cdef int UNKNOWN = _UNKNOWN


cdef class LocalBooks:

    def __init__(self, double slow_after):
        self.slow_after = slow_after
        self.fast_run = 0
        self.slow_at = -1e9

    def __dealloc__(self):
        cdef Py_ssize_t i
        for i in range(self._n):
            Py_DECREF(<object>self._entries[i].key)
        PyMem_Free(self._entries)

    def __len__(self):
        return self._n

    cdef Py_ssize_t _find(self, object key) noexcept:
        cdef Py_ssize_t i
        cdef void* k = <void*>key
        for i in range(self._n):
            if self._entries[i].key == k:
                return i
        return -1

    cdef int enter(self, object key, double now, int kind, double route_ms) except -1:
        """`sent`, from C."""
        cdef Py_ssize_t i = self._find(key)
        cdef Py_ssize_t size
        cdef Entry* grown
        cdef Entry* e
        # a route listed slow but not timed (routes.learn off, or no answer yet) may take any
        # time, as one not learned yet
        cdef bint unsure = kind == UNKNOWN or (kind != KNOWN_FAST and not route_ms)
        if i < 0:
            if self._n == self._cap:
                size = self._cap * 2 if self._cap else 8
                grown = <Entry*>PyMem_Realloc(self._entries, size * sizeof(Entry))
                if grown is NULL:
                    raise MemoryError()
                self._entries = grown
                self._cap = size
            i = self._n
            self._n += 1
            e = &self._entries[i]
            Py_INCREF(key)
            e.key = <void*>key
            e.unsure = False
        e = &self._entries[i]
        e.sent = now
        e.end = INFINITY if unsure else now + route_ms / 1000.0
        if kind != KNOWN_FAST and not e.unsure:  # as the pure twin's set: added, never taken
            e.unsure = True
            self._unsure += 1
        return 0

    cdef double leave(self, object key) except? -2.0:
        """Forget an attempt; when it was sent (-1.0: not known)."""
        cdef Py_ssize_t i = self._find(key)
        cdef double sent
        if i < 0:
            return -1.0
        sent = self._entries[i].sent
        if self._entries[i].unsure:
            self._unsure -= 1
        self._n -= 1
        if i < self._n:
            memmove(&self._entries[i], &self._entries[i + 1], (self._n - i) * sizeof(Entry))
        Py_DECREF(key)  # the entry's own reference (the caller holds another)
        return sent

    cdef int done(self, object key, double now) except -1:
        """`answered`, from C."""
        cdef double sent = self.leave(key)
        if sent < 0:
            return 0
        if now - sent > self.slow_after:
            self._slowed(now)
        else:
            self.fast_run += 1
        return 0

    cdef int gone(self, object key, double now) except -1:
        """`ended`, from C."""
        cdef double sent = self.leave(key)
        if sent >= 0 and now - sent > self.slow_after:
            self._slowed(now)
        return 0

    cdef void _slowed(self, double now) noexcept:
        self.slow_at = now
        self.fast_run = 0

    def sent(self, key, double now, int kind, double route_ms):
        self.enter(key, now, kind, route_ms)

    def answered(self, key, double now):
        self.done(key, now)

    def ended(self, key, double now):
        self.gone(key, now)

    def rekey(self, old, new):
        cdef Py_ssize_t i = self._find(old)
        if i < 0:
            return
        Py_INCREF(new)
        self._entries[i].key = <void*>new
        Py_DECREF(old)

    def may_probe(self, double now):
        cdef Py_ssize_t i
        cdef double margin = self.slow_after
        cdef Entry* e
        for i in range(self._n):
            e = &self._entries[i]
            if e.end == INFINITY:
                return False
            if now > e.end + margin + (e.end - e.sent):
                return False
        return True

    def fast_box(self, double now, long long evidence, double memory):
        if (self.slow_after <= 0 or self.fast_run < evidence or now - self.slow_at < memory
                or self._unsure):
            return False
        if self._n and now - self._entries[0].sent > self.slow_after:
            self._slowed(now)  # a slow one is in service now: do not queue behind it
            return False
        return True
