# cython: language_level=3, boundscheck=False, wraparound=False
"""The request and response parsers over llhttp's C callbacks (requestparser.py and
responseparser.py have the pure twins and the contracts both keep).

httptools calls back into Python for every header (a bytes object for the name and for the
value, a call, then failproxy's name lookup: ~1.5k instructions a header). Here llhttp's spans
are gathered in C buffers, each header's name is classified by a C table (`Names`, made from
the same dict as the pure twin's table), and Python sees one call per head, one per body piece
and one per message end (and, for a request, one at its first byte). llhttp is the version
httptools bundles (vendor/llhttp), so both twins accept and refuse the same bytes; the errors
are httptools' classes with httptools' messages, raised where httptools raises them.

llhttp's declarations, `Names` and `_recent` are in _llhttp.pxd, for the C core
(proxy/_core.pyx) to parse with the same parser and classify with the same tables.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.ref cimport PyObject, Py_DECREF, Py_INCREF
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memchr, memcmp, memcpy

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
    H_DROP,
    H_EXPECT,
    H_HOST,
    H_KEEPALIVE,
    H_LENGTH,
    H_PLAIN,
    H_PROXY_CONNECTION,
    H_REQUEST_ID,
    H_TE,
    H_UNDERSCORE,
    H_UPGRADE,
    H_VIA,
    H_XFF,
    KNOWN_HOSTS,
    BadRequest,
    response_kind_names,
    valid_host,
)

cdef extern from "Python.h":
    list PyList_New(Py_ssize_t size)
    void _list_set "PyList_SET_ITEM"(list lst, Py_ssize_t i, PyObject* item)  # steals item


cdef int _PLAIN = H_PLAIN
cdef int _HOST = H_HOST
cdef int _LENGTH = H_LENGTH
cdef int _XFF = H_XFF
cdef int _VIA = H_VIA
cdef int _EXPECT = H_EXPECT
cdef int _REQUEST_ID = H_REQUEST_ID
cdef int _CONNECTION = H_CONNECTION
cdef int _TE = H_TE
cdef int _UPGRADE = H_UPGRADE
cdef int _DROP = H_DROP
cdef int _UNDERSCORE = H_UNDERSCORE
cdef int _KEEPALIVE = H_KEEPALIVE
cdef int _ACCEL = H_ACCEL
cdef int _PROXY_CONNECTION = H_PROXY_CONNECTION

cdef set _KNOWN_HOSTS = KNOWN_HOSTS  # headers.valid_host's memory: the same set object
cdef object _valid_host = valid_host

cdef bytes _SEP = b": "
cdef bytes _CRLF = b"\r\n"
cdef bytes _EMPTY = b""
cdef bytes _CONTINUE = b"100-continue"


# -- short strings seen lately -------------------------------------------------------------------
#
# An app server answers with the same few header names and values over and over (Content-Type,
# Content-Length: 2, the Date of this second, Connection: close, the reason OK), and a client
# asks with the same Host and User-Agent: a bytes object made for each, and freed with its head,
# is ~200 instructions of allocation a string, ~12 strings a proxied request. Up to _RECENT_LONGEST bytes, a string is
# looked up in a direct-mapped table of the last ones seen (its slot from its length and its
# first and last four bytes; two ways: a slot's pair keeps the last two strings of the slot)
# and the object there is handed over again when its bytes are the same. Bytes are immutable,
# and a kept object keeps its hash too (a Host is looked up in a set, a target in the route
# cache). A new string takes the slot. The table holds at most _RECENT_SLOTS strings of
# _RECENT_LONGEST bytes; what a client sends can only take slots.

cdef enum:
    _RECENT_SLOTS = 256  # the top 8 bits of a 64-bit hash
    _RECENT_LONGEST = 64

cdef PyObject* _recent_slots[_RECENT_SLOTS]  # owned references, NULL where empty


cdef inline uint64_t _load32(const char* p) noexcept:
    cdef uint32_t v
    memcpy(&v, p, 4)
    return v


cdef inline bint _same(PyObject* b, const char* p, size_t n) noexcept:
    return (<size_t>PyBytes_GET_SIZE(<object>b) == n
            and memcmp(PyBytes_AS_STRING(<object>b), p, n) == 0)


cdef bytes _recent(const char* p, size_t n):
    """The bytes at p, as the object handed over last time when they are the same."""
    cdef uint64_t v
    cdef size_t h
    cdef PyObject* old
    cdef PyObject* other
    cdef bytes made
    if n == 0:
        return _EMPTY
    if n > _RECENT_LONGEST:
        return PyBytes_FromStringAndSize(p, n)
    if n >= 4:
        v = _load32(p) | _load32(p + n - 4) << 32
    else:
        v = (<uint64_t><unsigned char>p[0] | <uint64_t><unsigned char>p[n >> 1] << 8
             | <uint64_t><unsigned char>p[n - 1] << 16)
    # Fibonacci hashing: the product's top bits depend on every bit of the key
    h = <size_t>(((v ^ (<uint64_t>n << 56)) * <uint64_t>0x9E3779B97F4A7C15u) >> 56)
    old = _recent_slots[h]
    if old is not NULL and _same(old, p, n):
        return <bytes>old
    other = _recent_slots[h ^ 1]  # two ways: the slot's pair holds the one it held before
    if other is not NULL and _same(other, p, n):
        return <bytes>other
    made = PyBytes_FromStringAndSize(p, n)
    Py_INCREF(made)
    _recent_slots[h] = <PyObject*>made
    _recent_slots[h ^ 1] = old  # its reference moves
    if other is not NULL:
        Py_DECREF(<object>other)
    return made


# -- the name table ----------------------------------------------------------------------------

cdef unsigned char _lower[256]
for _i in range(256):
    _lower[_i] = _i + 32 if 65 <= _i <= 90 else _i


cdef class Names:
    """Header name -> what to do with it, in C: headers.NameTable's twin, made from the same
    dict of lower-cased names (headers.request_kind_names(), response_kind_names()).

    The names are kept back to back, sorted by length; `_first[n]` .. `_first[n + 1] - 1` are
    the ones of length n, so a name is compared (folding ASCII case) only with the one or two of
    its own length: ~60 instructions a header, where a bounded dict of spellings as they arrived
    (NameTable) needs the name as a bytes object first."""

    def __cinit__(self, dict by_lower, bint underscore=False):
        cdef Py_ssize_t i
        cdef size_t n, total = 0
        items = sorted(by_lower.items(), key=lambda item: len(item[0]))
        count = len(items)
        self._underscore = underscore
        self._longest = len(items[count - 1][0]) if count else 0
        self._offsets = <size_t*>PyMem_Malloc((count + 1) * sizeof(size_t))
        self._kinds = <int*>PyMem_Malloc((count + 1) * sizeof(int))
        self._first = <int*>PyMem_Malloc((self._longest + 2) * sizeof(int))
        if self._offsets is NULL or self._kinds is NULL or self._first is NULL:
            raise MemoryError()
        for i in range(count):
            self._offsets[i] = total
            self._kinds[i] = items[i][1]
            total += len(items[i][0])
        self._offsets[count] = total
        self._store = b"".join([bytes(name).lower() for name, _ in items])
        i = 0
        for n in range(self._longest + 2):
            while i < count and <size_t>len(items[i][0]) < n:
                i += 1
            self._first[n] = i

    def __dealloc__(self):
        PyMem_Free(self._offsets)
        PyMem_Free(self._kinds)
        PyMem_Free(self._first)

    def kind(self, bytes name):
        """The kind of `name` (NameTable.kind's twin: the tests compare the two)."""
        return self._lookup(PyBytes_AS_STRING(name), <size_t>PyBytes_GET_SIZE(name))

    cdef int _lookup(self, const char* p, size_t n) noexcept:
        cdef int i
        cdef size_t j
        cdef const char* name
        if self._underscore and memchr(p, b"_", n) != NULL:
            return _UNDERSCORE  # as nginx: WSGI/Rack would read X_A as X-A
        if n > self._longest:
            return _PLAIN
        for i in range(self._first[n], self._first[n + 1]):
            name = PyBytes_AS_STRING(self._store) + self._offsets[i]
            j = 0
            while j < n and _lower[<unsigned char>p[j]] == <unsigned char>name[j]:
                j += 1
            if j == n:
                return self._kinds[i]
        return _PLAIN


cdef Names _RESPONSE_NAMES = Names(response_kind_names())


# -- a span gathered across reads ----------------------------------------------------------------

cdef struct Buf:
    char* p
    size_t n
    size_t cap


# The empty header buffers of parsers between heads, kept for the next head as nginx keeps its
# free buffers: a parser gives its buffers back when a feed leaves them empty (_Parser._trim), so
# an idle keep-alive connection holds none of them (four of SPARE_SIZE each, a quarter of what
# an idle connection cost: bench memory), and a head takes them from here without a malloc.
# One worker is one thread: no lock. Bigger ones (a long header grew them) are freed.
cdef enum:
    SPARE_SIZE = 256  # bytes: a buffer's first size, and the forwarded pieces' (32 pointers)
    SPARE_MOST = 64
cdef void* _spare[SPARE_MOST]
cdef int _nspare = 0


cdef inline void* _take_spare() noexcept:
    global _nspare
    if _nspare:
        _nspare -= 1
        return _spare[_nspare]
    return PyMem_Malloc(SPARE_SIZE)


cdef inline void _give_spare(void* p, size_t size) noexcept:
    global _nspare
    if size == SPARE_SIZE and _nspare < SPARE_MOST:
        _spare[_nspare] = p
        _nspare += 1
    else:
        PyMem_Free(p)


cdef inline void _give_back(Buf* b) noexcept:
    """An empty buffer's memory to the spares."""
    if b.cap and not b.n:
        _give_spare(b.p, b.cap)
        b.p = NULL
        b.cap = 0


cdef int _add(Buf* b, const char* at, size_t n) noexcept:
    cdef size_t want = b.n + n
    cdef size_t cap
    cdef char* grown
    if want > b.cap:
        if not b.cap and want <= SPARE_SIZE:
            grown = <char*>_take_spare()
            cap = SPARE_SIZE
        else:
            cap = b.cap * 2 if b.cap else SPARE_SIZE
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


cdef int _gather(llhttp_t* p, Buf* b, const char* at, size_t n) noexcept:
    """A span callback's whole work: the span added to its buffer, or llhttp told why not."""
    if _add(b, at, n) < 0:
        llhttp_set_error_reason(p, "out of memory")
        return HPE_USER
    return 0


# -- what both parsers share -----------------------------------------------------------------

# The last class seen by each kind of parser and its methods: a worker's sinks are of one class
# each (upstream.UpstreamConnection, downstream.ClientConnection); tests bring their own.
cdef PyObject* _response_class = NULL
cdef PyObject* _request_class = NULL
cdef PyObject* _response_methods = NULL
cdef PyObject* _request_methods = NULL
cdef dict _SINK_METHODS = {}  # class -> (on_message_begin or None, on_head, on_body, on_message_complete)


cdef tuple _methods(object sink, PyObject** last_class, PyObject** last_methods):
    """The four methods of `sink`'s class. Classes and tuples stay referenced by _SINK_METHODS, so
    the borrowed pointers in the last-seen pair stay valid."""
    cdef object cls = type(sink)
    if <PyObject*>cls is last_class[0]:
        return <tuple>last_methods[0]
    m = _SINK_METHODS.get(cls)
    if m is None:
        m = (getattr(cls, "on_message_begin", None), getattr(cls, "on_head"),
             getattr(cls, "on_body"), getattr(cls, "on_message_complete"))
        _SINK_METHODS[cls] = m
    last_class[0] = <PyObject*>cls
    last_methods[0] = <PyObject*>m
    return <tuple>m


cdef class _Parser:
    """llhttp, the buffers of a header being read, the sink's methods, and feeding with
    httptools' errors (as httptools' own HttpParser base class)."""

    cdef llhttp_t _p
    cdef Names _names
    cdef Buf _name, _value
    cdef int _kind
    cdef bint _in_trailers, _closed
    cdef bint _pending  # a request header's value is complete, not yet handed over
    # The sink and its class's methods (unbound: called with the sink first). A bound method
    # kept per parser costs an attribute lookup, an allocation and a free for each of them and
    # each new parser (~1.5k instructions a new upstream connection, bench.profiles.lockstep:
    # behind unicorn that is every request); the class's own are looked up once per class.
    cdef object _sink, _on_head, _on_body, _on_complete, _error
    # The head's forwarded (relayed) header pieces, name, b": ", value, CRLF each, as new
    # references: made one list of the exact size when the head ends, where appending to a
    # list grows it (a realloc) every few headers.
    cdef PyObject** _pieces
    cdef Py_ssize_t _npieces, _cappieces

    def __dealloc__(self):
        cdef Py_ssize_t i
        for i in range(self._npieces):
            Py_DECREF(<object>self._pieces[i])
        PyMem_Free(self._pieces)
        PyMem_Free(self._name.p)
        PyMem_Free(self._value.p)

    cdef int _line(self, bytes name, bytes value) except -1:
        """One header line's four pieces, kept for the head's list."""
        cdef Py_ssize_t cap
        cdef PyObject** grown
        if self._npieces + 4 > self._cappieces:
            if not self._cappieces:
                cap = SPARE_SIZE // sizeof(PyObject*)
                grown = <PyObject**>_take_spare()
            else:
                cap = self._cappieces * 2
                grown = <PyObject**>PyMem_Realloc(self._pieces, cap * sizeof(PyObject*))
            if grown is NULL:
                raise MemoryError()
            self._pieces = grown
            self._cappieces = cap
        Py_INCREF(name)
        Py_INCREF(_SEP)
        Py_INCREF(value)
        Py_INCREF(_CRLF)
        self._pieces[self._npieces] = <PyObject*>name
        self._pieces[self._npieces + 1] = <PyObject*>_SEP
        self._pieces[self._npieces + 2] = <PyObject*>value
        self._pieces[self._npieces + 3] = <PyObject*>_CRLF
        self._npieces += 4
        return 0

    cdef list _lines(self):
        """The pieces kept since the last head, as a list (their references move to it)."""
        cdef Py_ssize_t i, n = self._npieces
        lines = PyList_New(n)
        for i in range(n):
            _list_set(lines, i, self._pieces[i])
        self._npieces = 0
        return lines

    def close(self):
        """Done with: what it is fed after this is dropped, and the sink's methods let go."""
        self._closed = True
        self._sink = None

    def feed_data(self, data):
        cdef Py_buffer view
        cdef const char* base
        cdef llhttp_errno_t err
        # A reference of our own while llhttp runs: a callback may drop the caller's last one.
        cdef _Parser keep = self
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
        self._trim()

    cdef void _trim(self) noexcept:
        """The buffers this feed left empty go back to the spares (an idle connection's parser
        holds none); a head cut across feeds keeps what it has gathered."""
        _give_back(&self._name)
        _give_back(&self._value)
        if self._cappieces and not self._npieces:
            _give_spare(self._pieces, <size_t>self._cappieces * sizeof(PyObject*))
            self._pieces = NULL
            self._cappieces = 0

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



# llhttp's callbacks that do the same for both: a span gathered, a name classified, a body
# piece or a message end handed over. `p.data` is the parser.

cdef int _on_header_field_complete(llhttp_t* p) noexcept:
    cdef _Parser self = <_Parser>p.data
    self._kind = self._names._lookup(self._name.p, self._name.n)
    return 0


cdef int _on_header_value(llhttp_t* p, const char* at, size_t n) noexcept:
    return _gather(p, &(<_Parser>p.data)._value, at, n)


cdef int _on_body(llhttp_t* p, const char* at, size_t n) noexcept:
    cdef _Parser self = <_Parser>p.data
    if self._closed:
        return 0
    try:
        self._on_body(self._sink, _recent(at, n))
    except BaseException as exc:
        self._error = exc
        llhttp_set_error_reason(p, "`on_body` callback error")
        return HPE_USER
    return 0


cdef int _on_message_complete(llhttp_t* p) noexcept:
    cdef _Parser self = <_Parser>p.data
    self._in_trailers = False
    self._pending = False  # a request's last trailer field, never handed over
    self._name.n = self._value.n = 0
    if self._closed:
        return 0
    try:
        self._on_complete(self._sink)
    except BaseException as exc:
        self._error = exc
        return -1
    return 0


# -- the response parser -----------------------------------------------------------------------

cdef int _rs_on_status(llhttp_t* p, const char* at, size_t n) noexcept:
    return _gather(p, &(<ResponseParser>p.data)._reason, at, n)


cdef int _rs_on_header_field(llhttp_t* p, const char* at, size_t n) noexcept:
    return _gather(p, &(<ResponseParser>p.data)._name, at, n)


cdef int _rs_on_header_value_complete(llhttp_t* p) noexcept:
    cdef ResponseParser self = <ResponseParser>p.data
    try:
        self._header()
    except BaseException as exc:
        self._error = exc
        llhttp_set_error_reason(p, "`on_header` callback error")
        return HPE_USER
    return 0


cdef int _rs_on_headers_complete(llhttp_t* p) noexcept:
    cdef ResponseParser self = <ResponseParser>p.data
    try:
        self._head()
    except BaseException as exc:
        self._error = exc
        return -1
    return 1 if p.upgrade else 0


cdef llhttp_settings_t _RESPONSE
llhttp_settings_init(&_RESPONSE)
_RESPONSE.on_status = _rs_on_status
_RESPONSE.on_header_field = _rs_on_header_field
_RESPONSE.on_header_value = _on_header_value
_RESPONSE.on_header_field_complete = _on_header_field_complete
_RESPONSE.on_header_value_complete = _rs_on_header_value_complete
_RESPONSE.on_headers_complete = _rs_on_headers_complete
_RESPONSE.on_body = _on_body
_RESPONSE.on_message_complete = _on_message_complete


cdef class ResponseParser(_Parser):
    """The compiled twin of responseparser.ResponseParserPy: same calls, same errors."""

    cdef Buf _reason
    cdef tuple _connection  # made only when a Connection header comes
    cdef object _length, _accel
    cdef bytes _te, _upgrade, _keepalive

    def __cinit__(self, sink):
        self._names = _RESPONSE_NAMES
        self._open(sink)

    def reopen(self, sink):
        """A closed parser made new for another connection (upstream.py reuses one that nothing
        else holds): the state of a new one, its buffers kept."""
        if not self._closed:
            raise RuntimeError("reopen of a parser that is not closed")
        cdef Py_ssize_t i
        for i in range(self._npieces):  # a head cut short by the close
            Py_DECREF(<object>self._pieces[i])
        self._npieces = 0
        self._name.n = self._value.n = self._reason.n = 0
        self._kind = 0
        self._in_trailers = self._pending = self._closed = False
        self._error = None
        self._length = self._accel = None
        self._open(sink)

    cdef _open(self, sink):
        llhttp_init(&self._p, HTTP_RESPONSE, &_RESPONSE)
        self._p.data = <void*>self
        cdef tuple m = _methods(sink, &_response_class, &_response_methods)
        self._sink = sink
        self._on_head = m[1]
        self._on_body = m[2]
        self._on_complete = m[3]
        self._connection = ()
        self._te = self._upgrade = self._keepalive = _EMPTY

    def __dealloc__(self):
        PyMem_Free(self._reason.p)

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
            value = _recent(self._value.p, self._value.n)
            self._value.n = 0
            self._line(_recent(self._name.p, name_n), value)
            if kind == _LENGTH:
                self._length = value
            return
        value = _recent(self._value.p, self._value.n)
        self._value.n = 0
        if kind == _CONNECTION:
            self._connection = self._connection + (value,)
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
        reason = _recent(self._reason.p, self._reason.n)
        self._reason.n = 0
        lines = self._lines()
        connection = self._connection
        length = self._length
        te = self._te
        upgrade = self._upgrade
        keepalive = self._keepalive
        accel = self._accel
        self._connection = ()
        self._length = None
        self._te = self._upgrade = self._keepalive = _EMPTY
        self._accel = None
        self._in_trailers = True
        if self._closed:
            return
        self._on_head(self._sink, self._p.status_code, reason, lines, length, te, connection, upgrade,
                      keepalive, accel, llhttp_should_keep_alive(&self._p) != 0)


# -- the request parser ------------------------------------------------------------------------
#
# A header is handed over where httptools hands it over (when the next name begins, or when the
# head ends), so a header a request is refused for fails at the same place, with the same
# message, in both twins.

cdef int _rq_on_message_begin(llhttp_t* p) noexcept:
    cdef RequestParser self = <RequestParser>p.data
    self._in_trailers = False
    if self._closed:
        return 0
    try:
        self._on_begin(self._sink)
    except BaseException as exc:
        self._error = exc
        return -1
    return 0


cdef int _rq_on_url(llhttp_t* p, const char* at, size_t n) noexcept:
    cdef RequestParser self = <RequestParser>p.data
    if _gather(p, &self._url, at, n):
        return HPE_USER
    if self._url.n > self._max_url:
        try:
            self._error = BadRequest(414, "request target too long")
        except BaseException as exc:
            self._error = exc
        llhttp_set_error_reason(p, "`on_url` callback error")
        return HPE_USER
    return 0


cdef int _rq_on_header_field(llhttp_t* p, const char* at, size_t n) noexcept:
    cdef RequestParser self = <RequestParser>p.data
    if self._pending:
        try:
            self._header()
        except BaseException as exc:
            self._error = exc
            llhttp_set_error_reason(p, "`on_header_field` callback error")
            return HPE_USER
    return _gather(p, &self._name, at, n)


cdef int _rq_on_header_value_complete(llhttp_t* p) noexcept:
    (<RequestParser>p.data)._pending = True
    return 0


cdef int _rq_on_headers_complete(llhttp_t* p) noexcept:
    cdef RequestParser self = <RequestParser>p.data
    try:
        if self._pending:
            self._header()
        self._head()
    except BaseException as exc:
        self._error = exc
        return -1
    return 1 if p.upgrade else 0  # as httptools: llhttp skips an upgrade request's body


cdef llhttp_settings_t _REQUEST
llhttp_settings_init(&_REQUEST)
_REQUEST.on_message_begin = _rq_on_message_begin
_REQUEST.on_url = _rq_on_url
_REQUEST.on_header_field = _rq_on_header_field
_REQUEST.on_header_value = _on_header_value
_REQUEST.on_header_field_complete = _on_header_field_complete
_REQUEST.on_header_value_complete = _rq_on_header_value_complete
_REQUEST.on_headers_complete = _rq_on_headers_complete
_REQUEST.on_body = _on_body
_REQUEST.on_message_complete = _on_message_complete

# Method names as bytes, made once each (httptools' get_method() makes one a call).
cdef list _METHODS = [None] * 256


cdef class RequestParser(_Parser):
    """The compiled twin of requestparser.RequestParserPy: same calls, same errors."""

    cdef Buf _url
    cdef size_t _max_url
    cdef object _on_begin
    cdef tuple _connection  # made only when a Connection header comes
    cdef bytes _host, _te, _upgrade, _xff, _via
    cdef object _length
    cdef str _request_id
    cdef Py_ssize_t _host_count, _head_size
    cdef bint _expect

    def __cinit__(self, sink, Names names, Py_ssize_t max_url):
        llhttp_init(&self._p, HTTP_REQUEST, &_REQUEST)
        self._p.data = <void*>self
        self._names = names
        self._max_url = max_url
        cdef tuple m = _methods(sink, &_request_class, &_request_methods)
        self._sink = sink
        self._on_begin = m[0]
        self._on_head = m[1]
        self._on_body = m[2]
        self._on_complete = m[3]
        self._reset()

    def __dealloc__(self):
        PyMem_Free(self._url.p)

    cdef void _trim(self) noexcept:
        _Parser._trim(self)
        _give_back(&self._url)

    cdef _reset(self):
        self._url.n = 0
        self._connection = ()
        self._host = self._te = self._upgrade = self._xff = self._via = _EMPTY
        self._length = None
        self._request_id = ""
        self._host_count = self._head_size = 0
        self._expect = False

    cdef _header(self):
        """One header is complete: forwarded, read, or dropped by its name's kind; a Host or an
        Expect the request is refused for raises BadRequest (headers.py)."""
        cdef int kind = self._kind
        cdef size_t name_n = self._name.n
        cdef size_t value_n = self._value.n
        cdef bytes value
        self._pending = False
        self._name.n = self._value.n = 0
        if self._in_trailers or self._closed:
            return  # a chunked body's trailer fields: never forwarded (llhttp refuses framing ones)
        self._head_size += name_n + value_n + 4
        if kind == _DROP or kind == _UNDERSCORE:
            return  # hop-by-hop, set by failproxy itself, or with an underscore
        value = _recent(self._value.p, value_n)
        if kind == _PLAIN or kind == _HOST:
            self._line(_recent(self._name.p, name_n), value)
            if kind == _HOST:
                self._host_count += 1
                self._host = value
                if value not in _KNOWN_HOSTS and not _valid_host(value):
                    raise BadRequest(400, "invalid Host")
        elif kind == _LENGTH:
            self._length = value
        elif kind == _CONNECTION:
            self._connection = self._connection + (value,)
        elif kind == _TE:
            self._te = self._te + b", " + value if self._te else value
        elif kind == _UPGRADE:
            self._upgrade = self._upgrade + b", " + value if self._upgrade else value
        elif kind == _REQUEST_ID:
            self._request_id = value.decode("latin-1")
        elif kind == _XFF:
            self._xff = self._xff + b", " + value if self._xff else value
        elif kind == _VIA:
            self._via = self._via + b", " + value if self._via else value
        elif kind == _EXPECT:
            if value.lower() != _CONTINUE:
                raise BadRequest(417, "unsupported expectation")
            self._expect = True
        # _PROXY_CONNECTION: dropped (it only sets llhttp's keep-alive flags)

    cdef _head(self):
        cdef llhttp_t* p = &self._p
        url = _recent(self._url.p, self._url.n)
        method = _METHODS[p.method]
        if method is None:
            method = _METHODS[p.method] = <bytes>llhttp_method_name(p.method)
        if p.http_major == 1 and p.http_minor == 1:
            version = "1.1"
        elif p.http_major == 1 and p.http_minor == 0:
            version = "1.0"
        else:
            version = f"{p.http_major}.{p.http_minor}"
        lines = self._lines()
        host = self._host
        host_count = self._host_count
        head_size = self._head_size
        length = self._length
        te = self._te
        connection = self._connection
        upgrade = self._upgrade
        request_id = self._request_id
        xff = self._xff
        via = self._via
        expect = self._expect
        self._reset()
        self._in_trailers = True
        if self._closed:
            return
        self._on_head(self._sink, method, url, version, p.upgrade != 0, lines, host, host_count, head_size,
                      length, te, connection, upgrade, request_id, xff, via, expect)
