# cython: language_level=3, boundscheck=False, wraparound=False
"""`b"".join` of a list of bytes, as one allocation and a memcpy per piece (bytesjoin.py).

The compiled twin of bytesjoin.py's `join_py` (`b"".join` itself), selected there at import.
CPython's join asks every piece for its buffer and releases it (a PyObject_GetBuffer and a
PyBuffer_Release each, ~100 instructions a piece with the copy): for the ~30 pieces of a
request head and the ~20 of a response head that was ~5.4k instructions a request
(bench/PROFILE.md). Exact bytes pieces are read in place here; anything else (another buffer
type, a piece that is not bytes, a tuple) is handed to `b"".join`, so results and errors are
the same (tests/test_bytesjoin.py).
"""

from libc.string cimport memcpy

cdef extern from "Python.h":
    ctypedef struct PyObject
    bint PyList_CheckExact(object o)
    Py_ssize_t PyList_GET_SIZE(object o)
    PyObject* PyList_GET_ITEM(object o, Py_ssize_t i)
    bint Bytes_CheckExact "PyBytes_CheckExact"(PyObject* o)
    Py_ssize_t Bytes_GET_SIZE "PyBytes_GET_SIZE"(PyObject* o)
    char* Bytes_AS_STRING "PyBytes_AS_STRING"(PyObject* o)
    object PyBytes_FromStringAndSize(const char* v, Py_ssize_t n)
    char* PyBytes_AS_STRING(object o)
    Py_ssize_t PY_SSIZE_T_MAX

cdef object _pyjoin = b"".join


def join(parts):
    """The pieces of `parts` in one bytes object."""
    cdef Py_ssize_t n, i, j, size, total = 0
    cdef PyObject* piece
    cdef char* dst
    cdef const char* src
    if not PyList_CheckExact(parts):
        return _pyjoin(parts)
    n = PyList_GET_SIZE(parts)
    for i in range(n):
        piece = PyList_GET_ITEM(parts, i)
        if not Bytes_CheckExact(piece):
            return _pyjoin(parts)
        size = Bytes_GET_SIZE(piece)
        if size > PY_SSIZE_T_MAX - total:
            return _pyjoin(parts)  # its OverflowError
        total += size
    out = PyBytes_FromStringAndSize(NULL, total)
    dst = PyBytes_AS_STRING(out)
    # No Python code runs between the two loops: the list is the one measured.
    for i in range(n):
        piece = PyList_GET_ITEM(parts, i)
        size = Bytes_GET_SIZE(piece)
        src = Bytes_AS_STRING(piece)
        if size <= 4:  # b": ", b"\r\n", short values: a call to memcpy costs more
            for j in range(size):
                dst[j] = src[j]
        else:
            memcpy(dst, src, size)
        dst += size
    return out
