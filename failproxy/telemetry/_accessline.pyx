# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""The access-log line of a request (SPEC 5 `request`), rendered straight to JSON bytes in C.

The compiled twin of accessline.py's `render_py`, selected by accessline.py at import (as
aiohttp's `_http_parser.pyx` beside `http_parser.py`): the same line, byte for byte
(tests/test_accessline.py checks both on the same records). The pure twin fills a dict and has
orjson render it: ~9k instructions a request from compiled code, the dict's 19 stores, two
latin-1 decodes and orjson's walk of 21 keys; here the keys are constants copied whole, the
values written as they come into one buffer kept across calls, one bytes object made.

Times are whole microseconds in milliseconds (failproxy rounds them so), written as repr() and
orjson write them: the digits of the integer of microseconds with the point put in, no float
formatting; any other float goes through Python's own repr formatter. Non-finite ones are
null, as orjson writes them.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.ref cimport PyObject, Py_DECREF, Py_INCREF
from libc.math cimport NAN, isfinite
from libc.stdlib cimport malloc, realloc
from libc.stdint cimport uint64_t
from libc.string cimport memcpy

cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object s, Py_ssize_t* size) except NULL
    char* PyOS_double_to_string(double val, char format_code, int precision, int flags, int* ptype) except NULL
    void PyMem_Free(void* p)
    int Py_DTSF_ADD_DOT_0

cdef extern from "time.h" nogil:
    ctypedef long time_t
    struct tm:
        pass
    struct timespec:
        time_t tv_sec
        long tv_nsec
    int CLOCK_REALTIME
    int clock_gettime(int clk, timespec* ts)
    tm* gmtime_r(const time_t* t, tm* out)
    size_t strftime(char* s, size_t maxsize, const char* fmt, const tm* t)

cdef char* _buf = NULL
cdef Py_ssize_t _cap = 0
cdef Py_ssize_t _n = 0
cdef const char* _HEX = b"0123456789abcdef"


cdef int _reserve(Py_ssize_t extra) except -1:
    global _buf, _cap
    cdef Py_ssize_t want = _n + extra
    cdef char* grown
    if want <= _cap:
        return 0
    cdef Py_ssize_t cap = _cap * 2 if _cap else 1024
    while cap < want:
        cap *= 2
    grown = <char*>realloc(_buf, cap)
    if grown == NULL:
        raise MemoryError()
    _buf = grown
    _cap = cap
    return 0


cdef inline int _raw(const char* s, Py_ssize_t size) except -1:
    global _n
    _reserve(size)
    memcpy(_buf + _n, s, size)
    _n += size
    return 0


# Which bytes go into a JSON string as they are: _PLAIN[c] for UTF-8 text, _PLAIN_LATIN1[c]
# for latin-1 bytes (>= 0x80 then take two bytes of UTF-8).
cdef unsigned char _PLAIN[256]
cdef unsigned char _PLAIN_LATIN1[256]
cdef int _c
for _c in range(256):
    _PLAIN[_c] = _c >= 0x20 and _c != 0x22 and _c != 0x5c
    _PLAIN_LATIN1[_c] = _PLAIN[_c] and _c < 0x80


cdef uint64_t _ONES = 0x0101010101010101
cdef uint64_t _HIGHS = 0x8080808080808080


cdef inline uint64_t _has_zero(uint64_t v) noexcept:
    """Non-zero when a byte of `v` is zero (exact as to whether, not as to which)."""
    return (v - _ONES) & ~v & _HIGHS


cdef int _escaped(const unsigned char* s, Py_ssize_t size, bint latin1) except -1:
    """`s` as a JSON string body: `"`, `\\` and control bytes escaped as orjson does; with
    `latin1`, bytes >= 0x80 are latin-1 characters, written as UTF-8."""
    global _n
    cdef Py_ssize_t i = 0
    cdef unsigned char c
    cdef const unsigned char* plain = &_PLAIN_LATIN1[0] if latin1 else &_PLAIN[0]
    cdef uint64_t w
    cdef uint64_t high = 0x8080808080808080 if latin1 else 0
    _reserve(size * 6 + 2)
    cdef char* out = _buf + _n
    out[0] = b'"'
    out += 1
    while i < size:
        # Eight bytes a step, copied as they are checked, while none needs escaping (the
        # addresses, ids and paths of a line rarely do): ~3 instructions a byte where the
        # table below takes ~6; the fixed-size copies are single loads and stores, not calls.
        while i + 8 <= size:
            memcpy(&w, s + i, 8)
            if ((w - _ONES * 0x20) & ~w & _HIGHS) or _has_zero(w ^ (_ONES * 0x22)) \
                    or _has_zero(w ^ (_ONES * 0x5c)) or (w & high):
                break
            memcpy(out, &w, 8)
            out += 8
            i += 8
        while i < size and plain[s[i]]:
            out[0] = <char>s[i]
            out += 1
            i += 1
        if i == size:
            break
        c = s[i]
        i += 1
        if c >= 0x80:
            out[0] = <char>(0xc0 | (c >> 6))
            out[1] = <char>(0x80 | (c & 0x3f))
            out += 2
        elif c == 0x22 or c == 0x5c:
            out[0] = b'\\'
            out[1] = <char>c
            out += 2
        elif c == 0x0a:
            out[0] = b'\\'; out[1] = b'n'; out += 2
        elif c == 0x0d:
            out[0] = b'\\'; out[1] = b'r'; out += 2
        elif c == 0x09:
            out[0] = b'\\'; out[1] = b't'; out += 2
        elif c == 0x08:
            out[0] = b'\\'; out[1] = b'b'; out += 2
        elif c == 0x0c:
            out[0] = b'\\'; out[1] = b'f'; out += 2
        else:
            memcpy(out, b"\\u00", 4)
            out[4] = _HEX[c >> 4]
            out[5] = _HEX[c & 15]
            out += 6
    out[0] = b'"'
    out += 1
    _n = out - _buf
    return 0


# The same str objects come back line after line: a server's address (twice a line: `upstream`
# and `upstreams`), a route key, a client's address for each of its requests. Each kept here with
# its escaped form (the quotes included), by identity: a line copies the escaped bytes, where
# escaping takes ~150 instructions a string of ~40 bytes. The table holds a reference to each
# str it keeps, so an address it keys by is never another object's.
cdef enum:
    _SEEN_SLOTS = 256  # the top 8 bits of a 64-bit hash; two ways (a slot and its pair)
    _SEEN_LONGEST = 256
cdef PyObject* _seen_str[_SEEN_SLOTS]  # owned references, NULL where empty
cdef PyObject* _seen_json[_SEEN_SLOTS]  # ... and the bytes of each, escaped
# The mark of the last str that missed in each slot (no reference): a str is kept only when
# seen twice, so the request ids, new each line, do not churn the table. The mark is its address
# mixed with its length and last bytes: a request id freed at the end of one line and the next
# one made at the same address (the allocator's way) are not one string seen twice (keyed by
# address alone they were, and each kept one pushed a server's address out of its slot).
cdef size_t _seen_once[_SEEN_SLOTS]


cdef inline size_t _mark(size_t key, const char* data, Py_ssize_t size) noexcept:
    cdef uint64_t tail = 0
    if size >= 8:
        memcpy(&tail, data + size - 8, 8)
    else:
        memcpy(&tail, data, size)
    return key ^ <size_t>(tail * <uint64_t>0x9E3779B97F4A7C15u) ^ <size_t>size


cdef inline int _kept(Py_ssize_t slot) except -1:
    cdef bytes json = <bytes>_seen_json[slot]
    return _raw(PyBytes_AS_STRING(json), PyBytes_GET_SIZE(json))


cdef int _str(object s) except -1:
    global _n
    cdef Py_ssize_t size, start
    cdef const char* data
    cdef size_t key = <size_t><PyObject*>s
    cdef size_t mark
    cdef Py_ssize_t slot
    cdef PyObject* old
    cdef PyObject* old_json
    cdef bytes json
    if s is None:
        return _raw(b"null", 4)
    slot = <Py_ssize_t>((<uint64_t>key * <uint64_t>0x9E3779B97F4A7C15u) >> 56)
    if _seen_str[slot] == <PyObject*>s:
        return _kept(slot)
    if _seen_str[slot ^ 1] == <PyObject*>s:
        return _kept(slot ^ 1)
    data = PyUnicode_AsUTF8AndSize(s, &size)
    start = _n
    _escaped(<const unsigned char*>data, size, False)
    mark = _mark(key, data, size)
    if _seen_once[slot] != mark:
        _seen_once[slot] = mark
    elif size <= _SEEN_LONGEST:
        # kept in the slot; the one there moves to its pair, whose own is let go
        json = PyBytes_FromStringAndSize(_buf + start, _n - start)
        old = _seen_str[slot ^ 1]
        old_json = _seen_json[slot ^ 1]
        _seen_str[slot ^ 1] = _seen_str[slot]
        _seen_json[slot ^ 1] = _seen_json[slot]
        Py_INCREF(s)
        Py_INCREF(json)
        _seen_str[slot] = <PyObject*>s
        _seen_json[slot] = <PyObject*>json
        if old is not NULL:
            Py_DECREF(<object>old)
            Py_DECREF(<object>old_json)
    return 0


cdef inline int _latin1(bytes b) except -1:
    return _escaped(<const unsigned char*><char*>b, len(b), True)


# "00".."99": an integer written two digits a division (six integers a line).
cdef const char* _PAIRS = (b"00010203040506070809101112131415161718192021222324252627282930313233"
                           b"34353637383940414243444546474849505152535455565758596061626364656667"
                           b"6869707172737475767778798081828384858687888990919293949596979899")


cdef int _int(long long v) except -1:
    """The digits written straight into the buffer, from the last: their count is found first
    (a buffer of its own and a copy cost a memcpy call a number, ten numbers a line)."""
    global _n
    cdef bint neg = v < 0
    cdef unsigned long long u = <unsigned long long>(-v) if neg else <unsigned long long>v
    cdef unsigned long long t = u
    cdef int digits = 1
    cdef unsigned int pair
    cdef char* out
    while t >= 100:
        t //= 100
        digits += 2
    if t >= 10:
        digits += 1
    _reserve(digits + 1)
    if neg:
        _buf[_n] = b'-'
        _n += 1
    out = _buf + _n + digits  # one past the last digit
    _n += digits
    while u >= 100:
        pair = <unsigned int>(u % 100) * 2
        u //= 100
        out -= 2
        out[0] = _PAIRS[pair]
        out[1] = _PAIRS[pair + 1]
    if u >= 10:
        pair = <unsigned int>u * 2
        out -= 2
        out[0] = _PAIRS[pair]
        out[1] = _PAIRS[pair + 1]
    else:
        out -= 1
        out[0] = <char>(48 + u)
    return 0


cdef inline double _ms_of(object value) except? -1.0:
    """A time in ms as `_ms` takes it: None is NaN (written null)."""
    if value is None:
        return NAN
    return value


cdef int _ms(double x) except -1:
    """A time in ms that is a whole number of µs (as failproxy keeps them): its shortest form,
    as repr() and orjson write it; any other float through repr()'s own formatter; NaN (None)
    and the other non-finite ones null."""
    global _n
    cdef long long us, whole, frac
    cdef double scaled
    cdef char digits[3]
    cdef int keep
    cdef char* text
    if not isfinite(x):
        return _raw(b"null", 4)  # as orjson writes it
    if -1e12 < x < 1e12:
        # llround's result without its call into libm: |x * 1000| < 2 ** 52, so the half added
        # is exact, and the check below sends any value this gets wrong to repr() anyway
        scaled = x * 1000.0
        us = <long long>(scaled + 0.5) if scaled >= 0.0 else <long long>(scaled - 0.5)
        if <double>us / 1000.0 == x:
            if us < 0:
                _raw(b"-", 1)
                us = -us
            whole = us // 1000
            frac = us % 1000
            _int(whole)
            digits[0] = <char>(48 + frac // 100)
            digits[1] = <char>(48 + frac // 10 % 10)
            digits[2] = <char>(48 + frac % 10)
            keep = 3
            while keep > 1 and digits[keep - 1] == b'0':
                keep -= 1
            _raw(b".", 1)
            return _raw(digits, keep)
    text = PyOS_double_to_string(x, b'r', 0, Py_DTSF_ADD_DOT_0, NULL)
    try:
        _raw(text, len(<bytes>text))
    finally:
        PyMem_Free(text)
    return 0


# The line's time when the caller gives none: what jsonlog.Timestamper writes (ISO 8601 UTC,
# milliseconds) from the same clock as time.time(), its date and time of day formatted once a
# second. Made here, not passed in, a request saves a Python call, a float, and a str made
# and escaped (~1k instructions, bench.profiles.lockstep).
cdef long long _second = -1
cdef char _prefix[32]


cdef int _now() except -1:
    global _second
    cdef timespec ts
    cdef tm parts
    cdef time_t whole
    cdef long long second, ms
    cdef char tail[6]
    clock_gettime(CLOCK_REALTIME, &ts)
    second = ts.tv_sec
    ms = ts.tv_nsec // 1000000
    if second != _second:
        whole = <time_t>second
        gmtime_r(&whole, &parts)
        if strftime(_prefix, 32, b"%Y-%m-%dT%H:%M:%S", &parts) != 19:
            raise ValueError("time out of range")
        _second = second
    _raw(b'"', 1)
    _raw(_prefix, 19)
    tail[0] = b'.'
    tail[1] = <char>(48 + ms // 100)
    tail[2] = <char>(48 + ms // 10 % 10)
    tail[3] = <char>(48 + ms % 10)
    tail[4] = b'Z'
    tail[5] = b'"'
    return _raw(tail, 6)


def render(object timestamp, long long pid, object request_id, bytes method, bytes path,
           long long status, long long bytes_sent, object duration_ms, str client,
           object upstream, tuple upstreams, long long tries, bint overflowed,
           object connect_ms, object held_ms, object upstream_ms, str route,
           long long spilled_bytes, bint static):
    """The line, newline-terminated, byte for byte what orjson makes of the same record;
    `timestamp` None: now."""
    return line(timestamp, pid, request_id, method, path, status, bytes_sent,
                _ms_of(duration_ms), client, upstream, upstreams, tries, overflowed,
                _ms_of(connect_ms), _ms_of(held_ms), _ms_of(upstream_ms), route, spilled_bytes,
                static)


cdef bytes line(object timestamp, long long pid, object request_id, bytes method, bytes path,
                long long status, long long bytes_sent, double duration_ms, str client,
                object upstream, tuple upstreams, long long tries, bint overflowed,
                double connect_ms, double held_ms, double upstream_ms, str route,
                long long spilled_bytes, bint static):
    """`render`'s line from C values, for the C core (`_accessline.pxd`): a time in ms is a
    double, NaN for None; `upstreams` None is `(upstream,)`; `request_id` may also be bytes
    (latin-1, as `method` and `path`)."""
    global _n
    cdef Py_ssize_t i
    _n = 0
    _raw(b'{"event":"request","level":"info","timestamp":', 46)
    if timestamp is None:
        _now()
    else:
        _str(<str?>timestamp)
    _raw(b',"pid":', 7)
    _int(pid)
    _raw(b',"request_id":', 14)
    if type(request_id) is bytes:
        _latin1(<bytes>request_id)  # the C core's own ids
    else:
        _str(request_id)
    _raw(b',"method":', 10)
    _latin1(method)
    _raw(b',"path":', 8)
    _latin1(path)
    _raw(b',"status":', 10)
    _int(status)
    _raw(b',"bytes_sent":', 14)
    _int(bytes_sent)
    _raw(b',"duration_ms":', 15)
    _ms(duration_ms)
    _raw(b',"client":', 10)
    _str(client)
    _raw(b',"upstream":', 12)
    _str(upstream)
    _raw(b',"upstreams":[', 14)
    if upstreams is None:
        _str(upstream)
    else:
        for i in range(len(upstreams)):
            if i:
                _raw(b",", 1)
            _str(upstreams[i])
    _raw(b'],"tries":', 10)
    _int(tries)
    _raw(b',"overflowed":', 14)
    if overflowed:
        _raw(b"true", 4)
    else:
        _raw(b"false", 5)
    _raw(b',"connect_ms":', 14)
    _ms(connect_ms)
    _raw(b',"held_ms":', 11)
    _ms(held_ms)
    _raw(b',"upstream_ms":', 15)
    _ms(upstream_ms)
    _raw(b',"route":', 9)
    _str(route)
    _raw(b',"spilled_bytes":', 17)
    _int(spilled_bytes)
    _raw(b',"static":', 10)
    if static:
        _raw(b"true}\n", 6)
    else:
        _raw(b"false}\n", 7)
    return PyBytes_FromStringAndSize(_buf, _n)

