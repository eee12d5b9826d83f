# The C side of _heads.pyx that the C core (_core.pyx) writes its heads with: each writer fills
# the pieces of a head around the forwarded lines, which the caller copies from wherever it
# holds them (a list of bytes for the relay, spans of the read buffer for the core). One
# place decides what failproxy adds to a head, whichever side forwards it.

from libc.string cimport memcpy

cdef enum:
    # The most pieces a head has besides its forwarded lines (the request head's: 4 before
    # them, at most 21 after).
    MOST_PIECES = 32

cdef struct Pieces:
    const char* at[MOST_PIECES]
    Py_ssize_t size[MOST_PIECES]
    int n
    Py_ssize_t total


cdef inline char* copy_bytes(char* dst, const char* src, Py_ssize_t size) noexcept:
    cdef Py_ssize_t j
    if size <= 4:  # b": ", b"\r\n", short values: a call to memcpy costs more
        for j in range(size):
            dst[j] = src[j]
    else:
        memcpy(dst, src, size)
    return dst + size


cdef inline char* copy_pieces(char* dst, Pieces* p, int start, int end) noexcept:
    cdef int k
    for k in range(start, end):
        dst = copy_bytes(dst, p.at[k], p.size[k])
    return dst


cdef class RequestHead:
    cdef int _xff
    cdef bytes _proto_http, _proto_https, _rid_name
    cdef bint _xfh, _via
    cdef object _pure

    cdef int pieces(self, Pieces* p, const char* method, Py_ssize_t method_n,
                    const char* target, Py_ssize_t target_n, const char* host,
                    Py_ssize_t host_n, const char* client_ip, Py_ssize_t client_ip_n, bint tls,
                    const char* rid, Py_ssize_t rid_n, const char* framing,
                    Py_ssize_t framing_n, const char* upgrade, Py_ssize_t upgrade_n,
                    const char* xff_prior, Py_ssize_t xff_prior_n, const char* via_prior,
                    Py_ssize_t via_prior_n) noexcept


cdef class ResponseHead:
    cdef dict _status_lines
    cdef object _pure
    cdef object _lines_by_status  # the status lines' bytes, kept alive for the table
    cdef const char* _line_at[600]
    cdef Py_ssize_t _line_n[600]

    cdef int pieces(self, Pieces* p, int status, const char* framing, Py_ssize_t framing_n,
                    const char* extra, Py_ssize_t extra_n, bint keep_alive,
                    bint http10) noexcept
