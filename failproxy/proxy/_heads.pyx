# cython: language_level=3, boundscheck=False, wraparound=False
"""The two heads failproxy writes for every request, the upstream request head and the client's
response head, written in C: their pieces' sizes summed, one bytes object made, each piece
copied into it once.

The compiled twins of headers.py's `RequestHeadBuilder.build` and `response_head_py`, selected
there at import (as aiohttp's `_http_parser.pyx` beside `http_parser.py`). The pure twins put
the pieces in a list and join it: the list made, ~12 appends (each ~100 instructions, a
realloc every few), the forwarded lines extended into it, then the join walking it again and
the list freed: ~5.5k instructions for the request head and ~3.9k for the response head
(bench/PROFILE.md). Here the pieces that are not the forwarded lines are C pointers in a small
array on the stack, and the lines are read in place from their list.

Anything that is not what the fast path reads (a piece or a value that is not exactly bytes, a
request id that is not exactly str, a status without a status line of its own) is handed to
the pure twin itself, so results and errors are the same (tests/test_heads.py).
"""

from libc.string cimport memcpy

cdef extern from "Python.h":
    ctypedef struct PyObject
    Py_ssize_t PyList_GET_SIZE(object o)
    PyObject* PyList_GET_ITEM(object o, Py_ssize_t i)
    PyObject* PyDict_GetItem(object d, object key)
    bint Bytes_CheckExact "PyBytes_CheckExact"(PyObject* o)
    bint PyBytes_CheckExact(object o)
    bint PyUnicode_CheckExact(object o)
    bint PyList_CheckExact(object o)
    Py_ssize_t Bytes_GET_SIZE "PyBytes_GET_SIZE"(PyObject* o)
    char* Bytes_AS_STRING "PyBytes_AS_STRING"(PyObject* o)
    Py_ssize_t PyBytes_GET_SIZE(object o)
    char* PyBytes_AS_STRING(object o)
    object PyBytes_FromStringAndSize(const char* v, Py_ssize_t n)
    const char* PyUnicode_AsUTF8AndSize(object s, Py_ssize_t* size) except NULL

# The most pieces a head has besides its forwarded lines (the request head's: 4 before them, at
# most 21 after).
cdef enum:
    _MOST = 32

cdef struct _Pieces:
    const char* at[_MOST]
    Py_ssize_t size[_MOST]
    int n
    Py_ssize_t total


cdef inline void _add(_Pieces* p, const char* at, Py_ssize_t size) noexcept:
    p.at[p.n] = at
    p.size[p.n] = size
    p.n += 1
    p.total += size


cdef inline void _add_bytes(_Pieces* p, object b) noexcept:
    _add(p, PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b))


cdef inline Py_ssize_t _lines_size(object lines) noexcept:
    """The bytes in `lines`, or -1 when it is not a list of exact bytes."""
    cdef Py_ssize_t i, total = 0
    cdef PyObject* piece
    if not PyList_CheckExact(lines):
        return -1
    for i in range(PyList_GET_SIZE(lines)):
        piece = PyList_GET_ITEM(lines, i)
        if not Bytes_CheckExact(piece):
            return -1
        total += Bytes_GET_SIZE(piece)
    return total


cdef inline char* _copy(char* dst, const char* src, Py_ssize_t size) noexcept:
    cdef Py_ssize_t j
    if size <= 4:  # b": ", b"\r\n", short values: a call to memcpy costs more
        for j in range(size):
            dst[j] = src[j]
    else:
        memcpy(dst, src, size)
    return dst + size


cdef inline char* _copy_pieces(char* dst, _Pieces* p, int start, int end) noexcept:
    cdef int k
    for k in range(start, end):
        dst = _copy(dst, p.at[k], p.size[k])
    return dst


cdef inline char* _copy_lines(char* dst, object lines) noexcept:
    cdef Py_ssize_t i
    cdef PyObject* piece
    # No Python code runs between the sizing and this: the list is the one measured.
    for i in range(PyList_GET_SIZE(lines)):
        piece = PyList_GET_ITEM(lines, i)
        dst = _copy(dst, Bytes_AS_STRING(piece), Bytes_GET_SIZE(piece))
    return dst


cdef object _write(_Pieces* p, int before, object lines, Py_ssize_t lines_size):
    """The head: pieces [0, before), then `lines`, then pieces [before, n)."""
    out = PyBytes_FromStringAndSize(NULL, p.total + lines_size)
    cdef char* dst = PyBytes_AS_STRING(out)
    dst = _copy_pieces(dst, p, 0, before)
    dst = _copy_lines(dst, lines)
    _copy_pieces(dst, p, before, p.n)
    return out


# X-Forwarded-For modes (config.HeadersConfig.x_forwarded_for), compared once per worker.
cdef enum:
    _XFF_OFF, _XFF_REPLACE, _XFF_APPEND


cdef class RequestHead:
    """The upstream request head for one worker's header settings: `build` takes what
    headers.RequestHeadBuilder.build takes, in the same order, and returns the same bytes."""

    cdef int _xff
    cdef bytes _proto_http, _proto_https, _rid_name
    cdef bint _xfh, _via
    cdef object _pure

    def __init__(self, str xff, bytes proto_http, bytes proto_https, bint xfh, bint via,
                 bytes rid_name, pure):
        self._xff = _XFF_REPLACE if xff == "replace" else _XFF_APPEND if xff == "append" else _XFF_OFF
        self._proto_http = proto_http
        self._proto_https = proto_https
        self._xfh = xfh
        self._via = via
        self._rid_name = rid_name
        self._pure = pure

    def build(self, method, target, lines, host, client_ip, tls, request_id, framing, upgrade,
              xff_prior, via_prior, /):
        cdef _Pieces p
        cdef Py_ssize_t lines_size, rid_size
        cdef const char* rid
        cdef int before
        if not (PyBytes_CheckExact(method) and PyBytes_CheckExact(target)
                and PyBytes_CheckExact(host) and PyBytes_CheckExact(client_ip)
                and PyUnicode_CheckExact(request_id) and PyBytes_CheckExact(framing)
                and PyBytes_CheckExact(upgrade) and PyBytes_CheckExact(xff_prior)
                and PyBytes_CheckExact(via_prior)):
            return self._pure(method, target, lines, host, client_ip, tls, request_id,
                              framing, upgrade, xff_prior, via_prior)
        lines_size = _lines_size(lines)
        if lines_size < 0:
            return self._pure(method, target, lines, host, client_ip, tls, request_id,
                              framing, upgrade, xff_prior, via_prior)
        p.n = 0
        p.total = 0
        _add_bytes(&p, method)
        _add(&p, b" ", 1)
        _add_bytes(&p, target)
        _add(&p, b" HTTP/1.1\r\n", 11)
        before = p.n
        # the lines go here
        if self._xff == _XFF_REPLACE or (self._xff == _XFF_APPEND and not PyBytes_GET_SIZE(xff_prior)):
            _add(&p, b"X-Forwarded-For: ", 17)
            _add_bytes(&p, client_ip)
            _add(&p, b"\r\n", 2)
        elif self._xff == _XFF_APPEND:
            _add(&p, b"X-Forwarded-For: ", 17)
            _add_bytes(&p, xff_prior)
            _add(&p, b", ", 2)
            _add_bytes(&p, client_ip)
            _add(&p, b"\r\n", 2)
        _add_bytes(&p, self._proto_https if tls else self._proto_http)
        if self._xfh and PyBytes_GET_SIZE(host):
            _add(&p, b"X-Forwarded-Host: ", 18)
            _add_bytes(&p, host)
            _add(&p, b"\r\n", 2)
        if self._via:
            if PyBytes_GET_SIZE(via_prior):
                _add(&p, b"Via: ", 5)
                _add_bytes(&p, via_prior)
                _add(&p, b", 1.1 failproxy\r\n", 17)
            else:
                _add(&p, b"Via: 1.1 failproxy\r\n", 20)
        elif PyBytes_GET_SIZE(via_prior):
            _add(&p, b"Via: ", 5)
            _add_bytes(&p, via_prior)
            _add(&p, b"\r\n", 2)
        if PyBytes_GET_SIZE(self._rid_name):
            rid = PyUnicode_AsUTF8AndSize(request_id, &rid_size)  # str.encode()'s bytes
            _add_bytes(&p, self._rid_name)
            _add(&p, b": ", 2)
            _add(&p, rid, rid_size)
            _add(&p, b"\r\n", 2)
        if PyBytes_GET_SIZE(upgrade):
            _add(&p, b"Connection: upgrade\r\nUpgrade: ", 30)
            _add_bytes(&p, upgrade)
            _add(&p, b"\r\n", 2)
        _add_bytes(&p, framing)
        _add(&p, b"\r\n", 2)
        return _write(&p, before, lines, lines_size)


cdef class ResponseHead:
    """The client's response head: `write` takes what headers.response_head_py takes, in the
    same order, and returns the same bytes. `status_lines` is headers.STATUS_LINES."""

    cdef dict _status_lines
    cdef object _pure

    def __init__(self, dict status_lines, pure):
        self._status_lines = status_lines
        self._pure = pure

    def write(self, status, reason, lines, framing, keep_alive, http10, extra, /):
        cdef _Pieces p
        cdef Py_ssize_t lines_size
        cdef PyObject* line = PyDict_GetItem(self._status_lines, status)
        if line == NULL or not (Bytes_CheckExact(line) and PyBytes_CheckExact(framing)
                                and PyBytes_CheckExact(extra)):
            return self._pure(status, reason, lines, framing, keep_alive, http10, extra)
        lines_size = _lines_size(lines)
        if lines_size < 0:
            return self._pure(status, reason, lines, framing, keep_alive, http10, extra)
        p.n = 0
        p.total = 0
        _add(&p, Bytes_AS_STRING(line), Bytes_GET_SIZE(line))
        _add_bytes(&p, framing)
        _add_bytes(&p, extra)
        if not keep_alive:
            _add(&p, b"Connection: close\r\n\r\n", 21)
        elif http10:
            _add(&p, b"Connection: keep-alive\r\n\r\n", 26)
        else:
            _add(&p, b"\r\n", 2)
        return _write(&p, 1, lines, lines_size)
