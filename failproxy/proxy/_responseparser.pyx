# cython: language_level=3, boundscheck=False, wraparound=False
"""The response parser over llhttp's C callbacks (responseparser.py has the pure twin and the
contract both keep).

httptools calls back into Python for every header (a bytes object for the name and for the
value, a call, then failproxy's name lookup: ~1.5k instructions a header). Here llhttp's spans
are gathered in C buffers, each header's name is classified by a C table made at import from
headers.response_kind_names(), and Python sees one call per head, one per body piece and one
per message end. llhttp is the version httptools bundles (vendor/llhttp), so both twins accept
and refuse the same bytes; the errors are httptools' classes with httptools' messages.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from libc.stdint cimport uint8_t, uint16_t
from libc.string cimport memcpy

from httptools import (
    HttpParserCallbackError,
    HttpParserError,
    HttpParserInvalidMethodError,
    HttpParserInvalidStatusError,
    HttpParserInvalidURLError,
    HttpParserUpgrade,
)

from failproxy.proxy.headers import (
    H_ACCEL,
    H_CONNECTION,
    H_KEEPALIVE,
    H_LENGTH,
    H_PLAIN,
    H_TE,
    H_UPGRADE,
    response_kind_names,
)

cdef extern from "llhttp.h":
    ctypedef struct llhttp_t:
        void* data
        uint8_t upgrade
        uint16_t status_code
    ctypedef int (*llhttp_data_cb)(llhttp_t*, const char* at, size_t length) noexcept
    ctypedef int (*llhttp_cb)(llhttp_t*) noexcept
    ctypedef struct llhttp_settings_t:
        llhttp_data_cb on_status
        llhttp_data_cb on_header_field
        llhttp_data_cb on_header_value
        llhttp_cb on_headers_complete
        llhttp_data_cb on_body
        llhttp_cb on_message_complete
        llhttp_cb on_header_field_complete
        llhttp_cb on_header_value_complete
    ctypedef enum llhttp_type_t:
        HTTP_RESPONSE
    ctypedef enum llhttp_errno_t:
        HPE_OK
        HPE_INVALID_STATUS
        HPE_INVALID_METHOD
        HPE_INVALID_URL
        HPE_CB_MESSAGE_BEGIN
        HPE_CB_HEADERS_COMPLETE
        HPE_CB_MESSAGE_COMPLETE
        HPE_CB_CHUNK_HEADER
        HPE_CB_CHUNK_COMPLETE
        HPE_PAUSED_UPGRADE
        HPE_USER
    void llhttp_settings_init(llhttp_settings_t* settings)
    void llhttp_init(llhttp_t* parser, llhttp_type_t type, const llhttp_settings_t* settings)
    llhttp_errno_t llhttp_execute(llhttp_t* parser, const char* data, size_t len)
    int llhttp_should_keep_alive(const llhttp_t* parser)
    const char* llhttp_get_error_reason(const llhttp_t* parser)
    void llhttp_set_error_reason(llhttp_t* parser, const char* reason)
    const char* llhttp_get_error_pos(const llhttp_t* parser)
    void llhttp_resume_after_upgrade(llhttp_t* parser)


# -- the name table: lower-cased names of the headers that are not plain, and their kinds ------

cdef enum:
    MAX_NAMES = 32
    MAX_NAME = 32

cdef int _PLAIN = H_PLAIN
cdef int _LENGTH = H_LENGTH
cdef int _CONNECTION = H_CONNECTION
cdef int _TE = H_TE
cdef int _KEEPALIVE = H_KEEPALIVE
cdef int _UPGRADE = H_UPGRADE
cdef int _ACCEL = H_ACCEL

cdef char _names[MAX_NAMES][MAX_NAME]
cdef size_t _lengths[MAX_NAMES]
cdef int _kinds[MAX_NAMES]
cdef int _count = 0
# The table's entries by name length: those of length n are _first[n] .. _first[n + 1] - 1,
# so a name is compared only with the one or two of its own length.
cdef int _first[MAX_NAME + 2]
cdef unsigned char _lower[256]


cdef void _load_names() except *:
    global _count
    cdef int i
    cdef size_t n
    cdef bytes name
    for i in range(256):
        _lower[i] = i + 32 if 65 <= i <= 90 else i
    names = sorted(response_kind_names().items(), key=lambda item: len(item[0]))
    for name, kind in names:
        if _count == MAX_NAMES or len(name) > MAX_NAME:
            raise ValueError(f"the response name table outgrew the C one at {name!r}")
        memcpy(_names[_count], PyBytes_AS_STRING(name), len(name))
        _lengths[_count] = len(name)
        _kinds[_count] = kind
        _count += 1
    i = 0
    for n in range(MAX_NAME + 2):
        while i < _count and _lengths[i] < n:
            i += 1
        _first[n] = i


_load_names()


cdef int _kind_of(const char* p, size_t n) noexcept:
    cdef int i
    cdef size_t j
    if n > MAX_NAME:
        return _PLAIN
    for i in range(_first[n], _first[n + 1]):
        j = 0
        while j < n and _lower[<unsigned char>p[j]] == <unsigned char>_names[i][j]:
            j += 1
        if j == n:
            return _kinds[i]
    return _PLAIN


# -- a span gathered across reads ----------------------------------------------------------------

cdef struct Buf:
    char* p
    size_t n
    size_t cap


cdef int _add(Buf* b, const char* at, size_t n) noexcept:
    cdef size_t want = b.n + n
    cdef size_t cap
    cdef char* grown
    if want > b.cap:
        cap = b.cap * 2 if b.cap else 256
        while cap < want:
            cap *= 2
        grown = <char*>PyMem_Realloc(b.p, cap)
        if grown is NULL:
            return -1
        b.p = grown
        b.cap = cap
    memcpy(b.p + b.n, at, n)
    b.n = want
    return 0


# -- llhttp's callbacks -----------------------------------------------------------------------

cdef llhttp_settings_t _SETTINGS
llhttp_settings_init(&_SETTINGS)


cdef int _gather(llhttp_t* p, Buf* b, const char* at, size_t n) noexcept:
    """A span callback's whole work: the span added to its buffer, or llhttp told why not."""
    if _add(b, at, n) < 0:
        llhttp_set_error_reason(p, "out of memory")
        return HPE_USER
    return 0


cdef int _on_status(llhttp_t* p, const char* at, size_t n) noexcept:
    return _gather(p, &(<ResponseParser>p.data)._reason, at, n)


cdef int _on_header_field(llhttp_t* p, const char* at, size_t n) noexcept:
    return _gather(p, &(<ResponseParser>p.data)._name, at, n)


cdef int _on_header_value(llhttp_t* p, const char* at, size_t n) noexcept:
    return _gather(p, &(<ResponseParser>p.data)._value, at, n)


cdef int _on_header_field_complete(llhttp_t* p) noexcept:
    cdef ResponseParser self = <ResponseParser>p.data
    self._kind = _kind_of(self._name.p, self._name.n)
    return 0


cdef int _on_header_value_complete(llhttp_t* p) noexcept:
    cdef ResponseParser self = <ResponseParser>p.data
    try:
        self._header()
    except BaseException as exc:
        self._error = exc
        llhttp_set_error_reason(p, "`on_header` callback error")
        return HPE_USER
    return 0


cdef int _on_headers_complete(llhttp_t* p) noexcept:
    cdef ResponseParser self = <ResponseParser>p.data
    try:
        self._head()
    except BaseException as exc:
        self._error = exc
        return -1
    return 1 if p.upgrade else 0


cdef int _on_body(llhttp_t* p, const char* at, size_t n) noexcept:
    cdef ResponseParser self = <ResponseParser>p.data
    if self._closed:
        return 0
    try:
        self._on_body(PyBytes_FromStringAndSize(at, n))
    except BaseException as exc:
        self._error = exc
        llhttp_set_error_reason(p, "`on_body` callback error")
        return HPE_USER
    return 0


cdef int _on_message_complete(llhttp_t* p) noexcept:
    cdef ResponseParser self = <ResponseParser>p.data
    self._in_trailers = False
    if self._closed:
        return 0
    try:
        self._on_complete()
    except BaseException as exc:
        self._error = exc
        return -1
    return 0


_SETTINGS.on_status = _on_status
_SETTINGS.on_header_field = _on_header_field
_SETTINGS.on_header_value = _on_header_value
_SETTINGS.on_header_field_complete = _on_header_field_complete
_SETTINGS.on_header_value_complete = _on_header_value_complete
_SETTINGS.on_headers_complete = _on_headers_complete
_SETTINGS.on_body = _on_body
_SETTINGS.on_message_complete = _on_message_complete

cdef bytes _SEP = b": "
cdef bytes _CRLF = b"\r\n"
cdef bytes _EMPTY = b""


cdef class ResponseParser:
    """The compiled twin of responseparser.ResponseParserPy: same calls, same errors."""

    cdef llhttp_t _p
    cdef Buf _reason, _name, _value
    cdef int _kind
    cdef bint _in_trailers, _closed
    cdef object _on_head, _on_body, _on_complete, _error
    cdef list _lines, _connection
    cdef object _length, _accel
    cdef bytes _te, _upgrade, _keepalive

    def __cinit__(self, sink):
        llhttp_init(&self._p, HTTP_RESPONSE, &_SETTINGS)
        self._p.data = <void*>self
        self._on_head = sink.on_head
        self._on_body = sink.on_body
        self._on_complete = sink.on_message_complete
        self._lines = []
        self._connection = []
        self._te = self._upgrade = self._keepalive = _EMPTY

    def __dealloc__(self):
        PyMem_Free(self._reason.p)
        PyMem_Free(self._name.p)
        PyMem_Free(self._value.p)

    def close(self):
        """Done with: what it is fed after this is dropped, and the sink's methods let go."""
        self._closed = True
        self._on_head = self._on_body = self._on_complete = None

    def feed_data(self, data):
        cdef Py_buffer view
        cdef const char* base
        cdef llhttp_errno_t err
        # A reference of our own while llhttp runs: a callback may drop the caller's last one.
        cdef ResponseParser keep = self
        if self._closed:
            return
        if PyBytes_CheckExact(data):
            base = PyBytes_AS_STRING(data)
            err = llhttp_execute(&self._p, base, <size_t>PyBytes_GET_SIZE(data))
        else:
            PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
            base = <const char*>view.buf
            err = llhttp_execute(&self._p, base, <size_t>view.len)
            PyBuffer_Release(&view)  # only the offset is computed from `base` below
        if err != HPE_OK:
            self._raise(err, base)

    cdef _raise(self, llhttp_errno_t err, const char* base):
        cdef const char* pos
        if self._p.upgrade == 1 and err == HPE_PAUSED_UPGRADE:
            pos = llhttp_get_error_pos(&self._p)
            llhttp_resume_after_upgrade(&self._p)
            raise HttpParserUpgrade(pos - base)
        reason = (<bytes>llhttp_get_error_reason(&self._p)).decode("latin-1")
        if err in (HPE_CB_MESSAGE_BEGIN, HPE_CB_HEADERS_COMPLETE, HPE_CB_MESSAGE_COMPLETE,
                   HPE_CB_CHUNK_HEADER, HPE_CB_CHUNK_COMPLETE, HPE_USER):
            exc = HttpParserCallbackError(reason)
            if self._error is not None:
                exc.__context__ = self._error
                self._error = None
        elif err == HPE_INVALID_STATUS:
            exc = HttpParserInvalidStatusError(reason)
        elif err == HPE_INVALID_METHOD:
            exc = HttpParserInvalidMethodError(reason)
        elif err == HPE_INVALID_URL:
            exc = HttpParserInvalidURLError(reason)
        else:
            exc = HttpParserError(reason)
        raise exc

    cdef _header(self):
        """One header's value is complete: relayed, read, or dropped by its name's kind."""
        cdef int kind = self._kind
        cdef size_t name_n = self._name.n
        cdef bytes value
        self._name.n = 0
        if self._in_trailers or self._closed:
            self._value.n = 0
            return  # trailers are not relayed
        if kind == _PLAIN or kind == _LENGTH:
            value = PyBytes_FromStringAndSize(self._value.p, self._value.n)
            self._value.n = 0
            lines = self._lines
            lines.append(PyBytes_FromStringAndSize(self._name.p, name_n))
            lines.append(_SEP)
            lines.append(value)
            lines.append(_CRLF)
            if kind == _LENGTH:
                self._length = value
            return
        value = PyBytes_FromStringAndSize(self._value.p, self._value.n)
        self._value.n = 0
        if kind == _CONNECTION:
            self._connection.append(value)
        elif kind == _TE:
            self._te = self._te + b", " + value if self._te else value
        elif kind == _KEEPALIVE:
            self._keepalive = self._keepalive + b"," + value if self._keepalive else value
        elif kind == _UPGRADE:
            self._upgrade = value
        elif kind == _ACCEL:
            self._accel = value
        # other hop-by-hop headers are dropped

    cdef _head(self):
        reason = PyBytes_FromStringAndSize(self._reason.p, self._reason.n)
        self._reason.n = 0
        lines = self._lines
        connection = self._connection
        length = self._length
        te = self._te
        upgrade = self._upgrade
        keepalive = self._keepalive
        accel = self._accel
        self._lines = []
        self._connection = []
        self._length = None
        self._te = self._upgrade = self._keepalive = _EMPTY
        self._accel = None
        self._in_trailers = True
        if self._closed:
            return
        self._on_head(self._p.status_code, reason, lines, length, te, connection, upgrade,
                      keepalive, accel, llhttp_should_keep_alive(&self._p) != 0)
