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

`_heads.pxd` gives the C core (`_core.pyx`) the same heads as pieces (`pieces`), with the
forwarded lines left for it to copy from its read buffer: what failproxy adds to a head is
decided here once, whichever side forwards the request.
"""


cdef extern from "Python.h":
    ctypedef struct PyObject
    Py_ssize_t PyList_GET_SIZE(object o)
    PyObject* PyList_GET_ITEM(object o, Py_ssize_t i)
    bint Bytes_CheckExact "PyBytes_CheckExact"(PyObject* o)
    bint PyBytes_CheckExact(object o)
    bint PyUnicode_CheckExact(object o)
    bint PyList_CheckExact(object o)
    bint PyLong_CheckExact(object o)
    Py_ssize_t Bytes_GET_SIZE "PyBytes_GET_SIZE"(PyObject* o)
    char* Bytes_AS_STRING "PyBytes_AS_STRING"(PyObject* o)
    Py_ssize_t PyBytes_GET_SIZE(object o)
    char* PyBytes_AS_STRING(object o)
    object PyBytes_FromStringAndSize(const char* v, Py_ssize_t n)
    const char* PyUnicode_AsUTF8AndSize(object s, Py_ssize_t* size) except NULL


cdef inline void _add(Pieces* p, const char* at, Py_ssize_t size) noexcept:
    p.at[p.n] = at
    p.size[p.n] = size
    p.n += 1
    p.total += size


cdef inline void _add_bytes(Pieces* p, object b) noexcept:
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


cdef inline char* _copy_lines(char* dst, object lines) noexcept:
    cdef Py_ssize_t i
    cdef PyObject* piece
    # No Python code runs between the sizing and this: the list is the one measured.
    for i in range(PyList_GET_SIZE(lines)):
        piece = PyList_GET_ITEM(lines, i)
        dst = copy_bytes(dst, Bytes_AS_STRING(piece), Bytes_GET_SIZE(piece))
    return dst


cdef object _write(Pieces* p, int before, object lines, Py_ssize_t lines_size):
    """The head: pieces [0, before), then `lines`, then pieces [before, n)."""
    out = PyBytes_FromStringAndSize(NULL, p.total + lines_size)
    cdef char* dst = PyBytes_AS_STRING(out)
    dst = copy_pieces(dst, p, 0, before)
    dst = _copy_lines(dst, lines)
    copy_pieces(dst, p, before, p.n)
    return out


# X-Forwarded-For modes (config.HeadersConfig.x_forwarded_for), compared once per worker.
cdef enum:
    _XFF_OFF, _XFF_REPLACE, _XFF_APPEND


cdef class RequestHead:
    """The upstream request head for one worker's header settings: `build` takes what
    headers.RequestHeadBuilder.build takes, in the same order, and returns the same bytes;
    `pieces` is the same head for a caller in C."""

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
        cdef Pieces p
        cdef Py_ssize_t lines_size, rid_size = 0
        cdef const char* rid = NULL
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
        if PyBytes_GET_SIZE(self._rid_name):
            rid = PyUnicode_AsUTF8AndSize(request_id, &rid_size)  # str.encode()'s bytes
        before = self.pieces(
            &p, PyBytes_AS_STRING(method), PyBytes_GET_SIZE(method), PyBytes_AS_STRING(target),
            PyBytes_GET_SIZE(target), PyBytes_AS_STRING(host), PyBytes_GET_SIZE(host),
            PyBytes_AS_STRING(client_ip), PyBytes_GET_SIZE(client_ip), bool(tls), rid, rid_size,
            PyBytes_AS_STRING(framing), PyBytes_GET_SIZE(framing), PyBytes_AS_STRING(upgrade),
            PyBytes_GET_SIZE(upgrade), PyBytes_AS_STRING(xff_prior),
            PyBytes_GET_SIZE(xff_prior), PyBytes_AS_STRING(via_prior),
            PyBytes_GET_SIZE(via_prior))
        return _write(&p, before, lines, lines_size)

    cdef int pieces(self, Pieces* p, const char* method, Py_ssize_t method_n,
                    const char* target, Py_ssize_t target_n, const char* host,
                    Py_ssize_t host_n, const char* client_ip, Py_ssize_t client_ip_n, bint tls,
                    const char* rid, Py_ssize_t rid_n, const char* framing,
                    Py_ssize_t framing_n, const char* upgrade, Py_ssize_t upgrade_n,
                    const char* xff_prior, Py_ssize_t xff_prior_n, const char* via_prior,
                    Py_ssize_t via_prior_n) noexcept:
        """The head's pieces in `p`; returns where the forwarded lines go among them. `rid`
        is read only when the request id header is on."""
        cdef int before
        p.n = 0
        p.total = 0
        _add(p, method, method_n)
        _add(p, b" ", 1)
        _add(p, target, target_n)
        _add(p, b" HTTP/1.1\r\n", 11)
        before = p.n
        # the lines go here
        if self._xff == _XFF_REPLACE or (self._xff == _XFF_APPEND and not xff_prior_n):
            _add(p, b"X-Forwarded-For: ", 17)
            _add(p, client_ip, client_ip_n)
            _add(p, b"\r\n", 2)
        elif self._xff == _XFF_APPEND:
            _add(p, b"X-Forwarded-For: ", 17)
            _add(p, xff_prior, xff_prior_n)
            _add(p, b", ", 2)
            _add(p, client_ip, client_ip_n)
            _add(p, b"\r\n", 2)
        _add_bytes(p, self._proto_https if tls else self._proto_http)
        if self._xfh and host_n:
            _add(p, b"X-Forwarded-Host: ", 18)
            _add(p, host, host_n)
            _add(p, b"\r\n", 2)
        if self._via:
            if via_prior_n:
                _add(p, b"Via: ", 5)
                _add(p, via_prior, via_prior_n)
                _add(p, b", 1.1 failproxy\r\n", 17)
            else:
                _add(p, b"Via: 1.1 failproxy\r\n", 20)
        elif via_prior_n:
            _add(p, b"Via: ", 5)
            _add(p, via_prior, via_prior_n)
            _add(p, b"\r\n", 2)
        if PyBytes_GET_SIZE(self._rid_name):
            _add_bytes(p, self._rid_name)
            _add(p, b": ", 2)
            _add(p, rid, rid_n)
            _add(p, b"\r\n", 2)
        if upgrade_n:
            _add(p, b"Connection: upgrade\r\nUpgrade: ", 30)
            _add(p, upgrade, upgrade_n)
            _add(p, b"\r\n", 2)
        _add(p, framing, framing_n)
        _add(p, b"\r\n", 2)
        return before


cdef class ResponseHead:
    """The client's response head: `write` takes what headers.response_head_py takes, in the
    same order, and returns the same bytes; `pieces` is the same head for a caller in C.
    `status_lines` is headers.STATUS_LINES."""

    def __init__(self, dict status_lines, pure):
        cdef int status
        self._status_lines = status_lines
        self._pure = pure
        for status in range(600):
            self._line_at[status] = NULL
            self._line_n[status] = 0
        kept = []
        for key, line in status_lines.items():
            if type(key) is int and 0 <= key < 600 and type(line) is bytes:
                status = key
                self._line_at[status] = PyBytes_AS_STRING(line)
                self._line_n[status] = PyBytes_GET_SIZE(line)
                kept.append(line)
        self._lines_by_status = kept

    def write(self, status, reason, lines, framing, keep_alive, http10, extra, /):
        cdef Pieces p
        cdef Py_ssize_t lines_size
        cdef int before
        if not (PyLong_CheckExact(status) and 0 <= status < 600 and PyBytes_CheckExact(framing)
                and PyBytes_CheckExact(extra)):
            return self._pure(status, reason, lines, framing, keep_alive, http10, extra)
        lines_size = _lines_size(lines)
        if lines_size < 0:
            return self._pure(status, reason, lines, framing, keep_alive, http10, extra)
        before = self.pieces(&p, status, PyBytes_AS_STRING(framing), PyBytes_GET_SIZE(framing),
                             PyBytes_AS_STRING(extra), PyBytes_GET_SIZE(extra),
                             bool(keep_alive), bool(http10))
        if before < 0:  # no status line of its own: the reason is the upstream's
            return self._pure(status, reason, lines, framing, keep_alive, http10, extra)
        return _write(&p, before, lines, lines_size)

    cdef int pieces(self, Pieces* p, int status, const char* framing, Py_ssize_t framing_n,
                    const char* extra, Py_ssize_t extra_n, bint keep_alive,
                    bint http10) noexcept:
        """The head's pieces in `p`; returns where the forwarded lines go among them, or -1
        when `status` has no status line of failproxy's own (the caller writes the
        upstream's)."""
        if status < 0 or status >= 600 or self._line_at[status] == NULL:
            return -1
        p.n = 0
        p.total = 0
        _add(p, self._line_at[status], self._line_n[status])
        _add(p, framing, framing_n)
        _add(p, extra, extra_n)
        if not keep_alive:
            _add(p, b"Connection: close\r\n\r\n", 21)
        elif http10:
            _add(p, b"Connection: keep-alive\r\n\r\n", 26)
        else:
            _add(p, b"\r\n", 2)
        return 1
