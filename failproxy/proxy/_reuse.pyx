# cython: language_level=3
"""An ended upstream connection taken back for the next one, only when nothing else holds it.

Behind unicorn, which closes every connection, each request makes and frees an
upstream.UpstreamConnection, its rawtransport.SocketTransport and its parser: ~3k instructions
of allocation, setting up and tearing down a request (bench.profiles.lockstep), as nginx avoids
by taking a request's structures from pools. Reusing an object is safe only where no one else
can see it change: here, where its reference count says that the list of ended connections
holds the connection alone, and the connection its transport and its parser alone. A count is
exact in C only, so this has no pure-Python twin: without it (upstream.py's `_take_ended` is
None) every connection is made new.
"""

from cpython.ref cimport PyObject

cdef extern from "Python.h":
    Py_ssize_t Py_REFCNT(PyObject* o)
    PyObject* PyTuple_GET_ITEM(object t, Py_ssize_t i)  # borrowed: counts nothing itself


def take_ended(list ended):
    """The newest connection of `ended` that nothing else holds, or None. `ended` holds
    (connection, its transport, its parser) triples; every one looked at leaves the list (a
    connection still held elsewhere is freed by its last holder, as usual)."""
    cdef tuple entry
    cdef PyObject* conn
    while ended:
        entry = ended.pop()
        conn = PyTuple_GET_ITEM(entry, 0)
        # the connection: the triple's reference alone; its transport and its parser: the
        # triple's and the connection's
        if (Py_REFCNT(conn) == 1 and Py_REFCNT(PyTuple_GET_ITEM(entry, 1)) == 2
                and Py_REFCNT(PyTuple_GET_ITEM(entry, 2)) == 2):
            return <object>conn
    return None
