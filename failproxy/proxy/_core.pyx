# cython: language_level=3, boundscheck=False, wraparound=False
"""The C core: the client connection's protocol where the compiled build runs it
(`FAILPROXY_CORE=1`, off by default while it is being built; bench/PROFILE.md, "The plan for
the core").

Why a core in C at all: in the seed's layout a request costs what the Python it runs costs
after the other processes cooled the caches, not what it executes (PROFILE.md); the same relay
with its events handled in C and its state in C data measured 1.0-1.1x unicorn direct, where
failproxy's Python relay is at 0.86x. The core answers the common request itself and hands
everything else to the Python relay, which stays the one place where the rest is written:
bodies, static files, error pages, failovers, held requests, retries.

The common request: a GET or HEAD without a body, HTTP/1.1 or 1.0, its target in origin form,
one valid Host, no header the relay reads but Host and a plain `Connection: close` or
`keep-alive`, that the overflow policy sends home by its common verdict (CoreBooks.begin), to
a local UNIX socket that takes the connection at once; answered with a status the walk would
not retry on or replace, a Content-Length or chunked body within what the core holds (a chunked
one re-chunked for the client as the relay does), and no header the relay reads but those, a
plain Connection and Keep-Alive. Its bytes are parsed with llhttp's C callbacks into spans of one
buffer; the heads both ways are written from the relay's own writers' pieces (`_heads.pxd`)
with the forwarded fields copied from those spans, so a request forwarded by the core and one
forwarded by the relay are the same bytes, and no Python object is made for a header; the books
(slot, policy, learning, the access line's write) are kept by corebooks.CoreBooks, two calls
a request, through a `_Worker` that holds the worker's settings as C values; the connect (a
UNIX socket's, done or refused at once) and the counters (C calls into the worker's slot
writer, `_slot.pxd`) are the core's own.

Two hand-overs, each to a `downstream.ClientConnection`, which becomes the transport's protocol,
takes the core's place in the worker's books (`WorkerContext.connection_replaced`: the same
connection, no event) and keeps the connection until it is idle again after an answer: then it
gives it back (`take_back`), and the core reads the next request.
- at a request boundary, before any byte of the request reached an upstream: it is fed the bytes
  the client sent since its last answer and parses them again (`adopt`). So for a request that
  is not the common one, for a head that takes longer than a read (when its deadline passes),
  for a half-close or a drain with nothing in flight;
- with the request in flight (an answer that is not the common one, or an end, a reset or the
  read deadline before it was whole): the request's bytes are parsed again as well, and its
  exchange takes the upstream socket and the answer's bytes read so far (`Exchange.adopt`).
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.errno cimport EAGAIN, EINTR, errno
from libc.math cimport NAN
from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memchr, memcpy, memmove
from posix.unistd cimport close, read, write

from failproxy.telemetry._accessline cimport line as access_line
from failproxy.telemetry._slot cimport SlotWriter
from failproxy.routing._localbooks cimport LocalBooks
from failproxy.proxy._heads cimport Pieces, RequestHead, ResponseHead, copy_bytes, copy_pieces
from failproxy.proxy._llhttp cimport (
    F_CHUNKED,
    F_CONTENT_LENGTH,
    F_TRANSFER_ENCODING,
    HPE_OK,
    HPE_PAUSED,
    HPE_USER,
    HTTP_GET,
    HTTP_HEAD,
    HTTP_REQUEST,
    HTTP_RESPONSE,
    Names,
    _recent,
    llhttp_execute,
    llhttp_get_error_pos,
    llhttp_init,
    llhttp_settings_init,
    llhttp_settings_t,
    llhttp_should_keep_alive,
    llhttp_t,
)


from failproxy.proxy._llhttp import Names as _Names
from failproxy.proxy.corebooks import CoreBooks, InFlight
from failproxy.proxy.headers import (
    H_CONNECTION,
    H_DROP,
    H_EXPECT,
    H_HOST,
    H_KEEPALIVE,
    H_LENGTH,
    H_PLAIN,
    H_REQUEST_ID,
    H_TE,
    H_UPGRADE,
    H_VIA,
    H_XFF,
    KNOWN_HOSTS,
    response_head as _response_head,
    response_kind_names,
    valid_host as _valid_host,
)
from failproxy.proxy.timer import take_timer
from failproxy.telemetry.turnend import of as turnend_of
from failproxy.routing.policy import STATUS_REASON_MIN, STATUS_REASONS

cdef extern from "sys/epoll.h" nogil:
    ctypedef union epoll_data_t:
        int fd
        uint64_t u64
    cdef struct epoll_event:
        uint32_t events
        epoll_data_t data
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event* event)
    int epoll_wait(int epfd, epoll_event* events, int maxevents, int timeout)
    enum:
        EPOLLIN
        EPOLL_CTL_ADD
        EPOLL_CTL_DEL
        EPOLL_CLOEXEC

cdef extern from "sys/socket.h" nogil:
    ctypedef unsigned int socklen_t
    struct sockaddr:
        pass
    int socket(int domain, int type, int protocol)
    int connect(int fd, const sockaddr* addr, socklen_t addrlen)
    enum:
        AF_UNIX
        SOCK_STREAM
        SOCK_NONBLOCK
        SOCK_CLOEXEC

cdef extern from "time.h" nogil:
    ctypedef long time_t
    cdef struct timespec:
        time_t tv_sec
        long tv_nsec
    int clock_gettime(int clk_id, timespec* tp)
    enum:
        CLOCK_MONOTONIC


cdef inline double _now() noexcept:
    """time.monotonic(), the same double (CPython: the nanoseconds over 1e9), without a call
    into Python (~150 instructions each, five a request)."""
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <double>(<long long>ts.tv_sec * 1000000000 + ts.tv_nsec) / 1e9

cdef ResponseHead _RESPONSE_HEAD = _response_head.__self__  # the relay's writer's own
cdef object valid_host = _valid_host
cdef set _KNOWN_HOSTS = KNOWN_HOSTS
cdef dict _STATUS_REASONS = STATUS_REASONS
cdef int _REASON_MIN = STATUS_REASON_MIN
cdef Names _RESPONSE_NAMES = _Names(response_kind_names())

cdef int _PLAIN = H_PLAIN
cdef int _HOST = H_HOST
cdef int _LENGTH = H_LENGTH
cdef int _CONNECTION = H_CONNECTION
cdef int _DROP = H_DROP
cdef int _KEEPALIVE = H_KEEPALIVE
cdef int _TE = H_TE
# The request headers the relay reads (requestparser.py): a request with one is the relay's.
cdef int _READ_BY_RELAY = (1 << H_LENGTH | 1 << H_XFF | 1 << H_VIA | 1 << H_EXPECT
                           | 1 << H_REQUEST_ID | 1 << H_TE | 1 << H_UPGRADE)

cdef bytes _GET = b"GET"
cdef const char* _HEX = b"0123456789abcdef"
cdef bytes _HEAD = b"HEAD"
cdef bytes _EMPTY = b""

cdef enum:
    MAX_FIELDS = 64  # more headers than this: the relay's
    MAX_PIECES = 64  # more body pieces (chunks) than this: the relay's
    ANSWER_MOST = 262144  # a longer answer is the relay's (it spools what a client cannot take)
    HOLD_MOST = 65536  # client bytes held while a request is in flight: reading pauses past it
    READ_SIZE = 65536
    BATCH = 64

# What a connection is doing.
cdef enum:
    IDLE = 0  # between requests (or before the first): its bytes are a head not yet whole
    SENT = 1  # a request in flight: its answer is read on the upstream socket
    LINGER = 2  # closed by the core after an answer: what the client still sends is dropped
    GONE = 3  # handed over, or closed


# -- parsing into spans ------------------------------------------------------------------------

cdef struct Span:
    size_t at
    size_t n


cdef struct Parse:
    const char* base  # the buffer llhttp runs over (one call, so every span is in one piece)
    Span first  # the request target, or the response's reason
    Span names[MAX_FIELDS]
    Span values[MAX_FIELDS]
    bint keep[MAX_FIELDS]  # the field is forwarded as it came (set by the head's reader)
    Py_ssize_t kept_n  # ... and the bytes of the forwarded lines
    int n
    bint in_field  # a field's name began and its value has not ended
    bint odd  # something the core does not take: the relay's
    bint head_done  # the head is whole
    bint done  # the message ended (llhttp paused there)
    bint skip_body  # a response to HEAD: llhttp is told there is no body
    Span pieces[MAX_PIECES]  # the body as llhttp hands it over: a chunk each, when chunked
    int npieces
    size_t body_n


cdef inline void _span(Parse* ps, Span* sp, const char* at, size_t n) noexcept:
    sp.at = at - ps.base
    sp.n = n


cdef int _on_first(llhttp_t* p, const char* at, size_t n) noexcept:
    cdef Parse* ps = <Parse*>p.data
    if ps.first.n:
        ps.odd = True  # in two pieces: cannot be, in one buffer; not the core's either way
    _span(ps, &ps.first, at, n)
    return 0


cdef int _on_field(llhttp_t* p, const char* at, size_t n) noexcept:
    cdef Parse* ps = <Parse*>p.data
    if ps.in_field or ps.n >= MAX_FIELDS:
        ps.odd = True
        return HPE_USER
    ps.in_field = True
    _span(ps, &ps.names[ps.n], at, n)
    ps.keep[ps.n] = False
    ps.values[ps.n].at = 0
    ps.values[ps.n].n = 0
    return 0


cdef int _on_value(llhttp_t* p, const char* at, size_t n) noexcept:
    cdef Parse* ps = <Parse*>p.data
    if ps.values[ps.n].n:
        ps.odd = True
        return HPE_USER
    _span(ps, &ps.values[ps.n], at, n)
    return 0


cdef int _on_value_complete(llhttp_t* p) noexcept:
    cdef Parse* ps = <Parse*>p.data
    ps.in_field = False
    ps.n += 1
    return 0


cdef int _on_request_headers(llhttp_t* p) noexcept:
    if p.upgrade or p.flags & (F_CONTENT_LENGTH | F_CHUNKED | F_TRANSFER_ENCODING):
        # a body (or an upgrade) follows: the relay's, at once (it may owe 100 Continue)
        (<Parse*>p.data).odd = True
        return HPE_USER
    return 0


cdef int _on_response_headers(llhttp_t* p) noexcept:
    cdef Parse* ps = <Parse*>p.data
    ps.head_done = True
    return 1 if ps.skip_body else 0  # 1: no body follows (HEAD)


cdef int _on_request_body(llhttp_t* p, const char* at, size_t n) noexcept:
    (<Parse*>p.data).odd = True
    return HPE_USER


cdef int _on_response_body(llhttp_t* p, const char* at, size_t n) noexcept:
    cdef Parse* ps = <Parse*>p.data
    if ps.npieces >= MAX_PIECES:
        ps.odd = True  # many small chunks: the relay's
        return HPE_USER
    _span(ps, &ps.pieces[ps.npieces], at, n)
    ps.npieces += 1
    ps.body_n += n
    return 0


cdef int _on_complete(llhttp_t* p) noexcept:
    (<Parse*>p.data).done = True
    return HPE_PAUSED  # stop there: what follows is the next request's (or is not wanted)


cdef llhttp_settings_t _REQUEST
llhttp_settings_init(&_REQUEST)
_REQUEST.on_url = _on_first
_REQUEST.on_header_field = _on_field
_REQUEST.on_header_value = _on_value
_REQUEST.on_header_value_complete = _on_value_complete
_REQUEST.on_headers_complete = _on_request_headers
_REQUEST.on_body = _on_request_body
_REQUEST.on_message_complete = _on_complete

cdef llhttp_settings_t _RESPONSE
llhttp_settings_init(&_RESPONSE)
_RESPONSE.on_status = _on_first
_RESPONSE.on_header_field = _on_field
_RESPONSE.on_header_value = _on_value
_RESPONSE.on_header_value_complete = _on_value_complete
_RESPONSE.on_headers_complete = _on_response_headers
_RESPONSE.on_body = _on_response_body
_RESPONSE.on_message_complete = _on_complete


cdef int _parse(llhttp_t* p, Parse* ps, int kind, const char* base, size_t n,
                bint skip_body) noexcept:
    """Run llhttp over `base[:n]` from a fresh state. Returns the message's length (its end),
    0 when it is not whole yet, -1 when it is not the core's (bad, or `odd`)."""
    cdef int err
    ps.base = base
    ps.first.n = 0
    ps.n = 0
    ps.kept_n = 0
    ps.in_field = False
    ps.odd = False
    ps.done = False
    ps.head_done = False
    ps.skip_body = skip_body
    ps.npieces = 0
    ps.body_n = 0
    llhttp_init(p, HTTP_REQUEST if kind == 0 else HTTP_RESPONSE,
                &_REQUEST if kind == 0 else &_RESPONSE)
    p.data = <void*>ps
    err = llhttp_execute(p, base, n)
    if ps.odd:
        return -1
    if err == HPE_PAUSED and ps.done:
        return <int>(llhttp_get_error_pos(p) - base)
    if err == HPE_OK:
        return 0
    return -1


cdef const char* _HEXDIGITS = b"0123456789abcdef"


cdef inline int _hex_size(size_t n) noexcept:
    cdef int k = 1
    while n >= 16:
        n >>= 4
        k += 1
    return k


cdef inline int _hex(char* out, size_t n) noexcept:
    """`n` in hex and CRLF, as b"%x\\r\\n" writes it; returns its length."""
    cdef int k = _hex_size(n)
    cdef int i
    for i in range(k - 1, -1, -1):
        out[i] = _HEXDIGITS[n & 15]
        n >>= 4
    out[k] = b"\r"
    out[k + 1] = b"\n"
    return k + 2


cdef inline bint _is_token(const char* p, size_t n, const char* lower, size_t m) noexcept:
    """p[:n], ASCII case folded, is `lower` (m bytes)."""
    cdef size_t i
    cdef unsigned char c
    if n != m:
        return False
    for i in range(n):
        c = <unsigned char>p[i]
        if 65 <= c <= 90:
            c += 32
        if c != <unsigned char>lower[i]:
            return False
    return True


cdef inline void _keep(Parse* ps, int i) noexcept:
    """Field `i` is forwarded as it came: `name: value` and CRLF, as the relay's lines."""
    ps.keep[i] = True
    ps.kept_n += ps.names[i].n + ps.values[i].n + 4


cdef char* _write_head(char* dst, Pieces* p, int before, Parse* ps) noexcept:
    """A head: the writer's pieces with the forwarded fields (`_keep`) where it puts the
    lines; returns the end. `dst` holds `p.total + ps.kept_n` bytes."""
    cdef int i
    cdef const char* base = ps.base
    dst = copy_pieces(dst, p, 0, before)
    for i in range(ps.n):
        if ps.keep[i]:
            dst = copy_bytes(dst, base + ps.names[i].at, ps.names[i].n)
            dst[0] = b":"
            dst[1] = b" "
            dst = copy_bytes(dst + 2, base + ps.values[i].at, ps.values[i].n)
            dst[0] = b"\r"
            dst[1] = b"\n"
            dst += 2
    return copy_pieces(dst, p, before, p.n)


cdef char* _headbuf = NULL  # the request head under way (written to the upstream at once)
cdef size_t _headcap = 0


# -- the upstream sockets --------------------------------------------------------------------------

cdef class _Upstreams:
    """The core's upstream sockets of one loop, in one epoll set the loop watches as one fd (as
    rawtransport.Poller does for the relay's): a socket the relay takes over leaves it."""

    cdef int epfd
    # by fd: the CoreConnection whose answer it carries, or None (a list indexed by fd, as
    # rawtransport.Poller's: a dict's insert, lookup and delete cost ~0.5k instructions a request)
    cdef list waiting
    cdef object loop
    cdef object _hold, _release  # the loop's turn end (turnend.TurnEnd), held for a batch

    def __cinit__(self, loop):
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise OSError(errno, "epoll_create1")
        self.waiting = []
        self.loop = loop
        turn = turnend_of(loop)
        self._hold = turn.hold
        self._release = turn.release
        loop.add_reader(self.epfd, self._ready)

    cdef int watch(self, int fd, CoreConnection conn) except -1:
        cdef epoll_event ev
        ev.events = EPOLLIN
        ev.data.fd = fd
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &ev) < 0:
            raise OSError(errno, "epoll_ctl")
        waiting = self.waiting
        if fd >= len(waiting):
            waiting.extend([None] * (fd + 1 - len(waiting)))
        waiting[fd] = conn
        return 0

    cdef void forget(self, int fd) noexcept:
        """Out of the set, the socket still open (handed to the relay, or pooled)."""
        cdef epoll_event ev
        epoll_ctl(self.epfd, EPOLL_CTL_DEL, fd, &ev)
        self.closing(fd)

    cdef void closing(self, int fd) noexcept:
        """`fd` is about to be closed: closing takes it out of the set (the socket is the
        core's alone, never dup'ed), so only the map is updated, as rawtransport.Poller.forget
        does (one epoll_ctl a request saved)."""
        if 0 <= fd < len(self.waiting):
            self.waiting[fd] = None

    def _ready(self):
        cdef epoll_event events[BATCH]
        cdef int i, n
        cdef CoreConnection conn
        cdef int fd
        cdef list waiting = self.waiting
        # The turn's writers (the access line, the counters) run at the batch's end, not from a
        # Handle of their own (turnend.py: ~2k instructions a request behind unicorn).
        self._hold()
        try:
            n = epoll_wait(self.epfd, events, BATCH, 0)
            for i in range(n):
                fd = events[i].data.fd
                found = waiting[fd] if fd < len(waiting) else None
                if found is None:
                    continue  # taken out by an earlier one of this batch
                conn = <CoreConnection>found
                conn._upstream_ready()
        finally:
            self._release()


cdef dict _UPSTREAMS = {}


cdef _Upstreams _upstreams(loop):
    found = _UPSTREAMS.get(loop)
    if found is None:
        for old in [lp for lp in _UPSTREAMS if lp.is_closed()]:
            del _UPSTREAMS[old]
        found = _UPSTREAMS[loop] = _Upstreams(loop)
    return <_Upstreams>found


cdef class _Worker:
    """What the core reads of its worker on every request, read once: the settings as C values,
    the books' methods bound (an attribute of a Python object read from here is a lookup by name
    each time: ~150 instructions, ~30 of them a request before these were kept)."""

    cdef object ctx
    cdef object books
    cdef Names names
    cdef double header_timeout, keepalive_timeout, read_timeout
    cdef size_t max_uri, max_header, answer_most
    cdef long keepalive_requests
    cdef bint intercept_errors, upstream_header, rid
    cdef bint lines  # the access log's lines are written (the core renders them)
    cdef long long pid  # as the lines name it
    cdef object line_peer, line_address  # the last peer a line named, and its address
    cdef RequestHead heads  # the relay's request head writer's own (ctx.build_head)
    cdef object begin, undo, finish, gone, pool
    # The counters: C calls into the worker's slot writer (None: not the compiled one, whose
    # Python methods are called instead), at the cells WorkerMetrics.core_cells gives.
    cdef SlotWriter slot
    cdef object metrics
    cdef Py_ssize_t core_cell, handover_cell
    # The request ids the core makes: the worker's prefix (WorkerContext.request_id_prefix)
    # and a counter of its own, from 2**63 (the relay's counts from 2**60: never the same id)
    cdef bytes rid_prefix
    cdef unsigned long long rid_next
    # The last peer connected to, and what connect(2) and the counters need of it
    cdef object conn_peer
    cdef bytes conn_addr
    cdef Py_ssize_t conn_index

    def __cinit__(self, ctx):
        self.ctx = ctx
        books = self.books = CoreBooks(ctx)
        self.names = <Names?>ctx.request_names
        self.header_timeout = ctx.header_timeout
        self.keepalive_timeout = ctx.keepalive_timeout
        self.read_timeout = ctx.read_timeout
        self.max_uri = ctx.max_uri_bytes
        self.max_header = ctx.max_header_bytes
        self.answer_most = ANSWER_MOST
        if ctx.response_buffering and <size_t>ctx.response_buffer_bytes < self.answer_most:
            self.answer_most = ctx.response_buffer_bytes
        self.keepalive_requests = ctx.keepalive_requests
        self.intercept_errors = ctx.intercept_errors
        self.upstream_header = ctx.upstream_header
        self.rid = bool(ctx.rid_header)
        self.rid_prefix = ctx.request_id_prefix().encode("ascii")
        self.rid_next = 1ULL << 63
        self.lines = ctx.events.lines
        self.pid = ctx.events.pid
        self.heads = ctx.build_head.__self__
        self.begin = books.begin
        self.undo = books.undo
        self.finish = books.finish
        self.gone = books.gone
        self.pool = books.pool
        metrics = self.metrics = ctx.metrics
        writer, self.core_cell, self.handover_cell = metrics.core_cells()
        if isinstance(writer, SlotWriter):
            self.slot = <SlotWriter>writer

    cdef int connect_to(self, peer) except -2:
        """A socket connected to `peer`, a UNIX socket (a connect there is done or refused at
        once): its fd, or -1 when either call failed. Where the relay's
        start_connect keeps a refused socket for the next attempt, this one closes it: the
        relay connects again, with its own."""
        cdef int fd
        if peer is not self.conn_peer:
            self.conn_addr = peer.packed
            self.conn_index = peer.index
            self.conn_peer = peer
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
        if fd < 0:
            return -1
        if connect(fd, <const sockaddr*>PyBytes_AS_STRING(self.conn_addr),
                   <socklen_t>PyBytes_GET_SIZE(self.conn_addr)) < 0:
            close(fd)
            return -1
        return fd

    cdef bytes new_request_id(self):
        """An id as WorkerContext.new_request_id makes one: the prefix, then the counter in 16
        hex digits."""
        cdef Py_ssize_t k = PyBytes_GET_SIZE(self.rid_prefix)
        cdef bytes made = PyBytes_FromStringAndSize(NULL, k + 16)
        cdef char* out = PyBytes_AS_STRING(made)
        cdef unsigned long long n = self.rid_next
        cdef int i
        self.rid_next = n + 1
        memcpy(out, PyBytes_AS_STRING(self.rid_prefix), k)
        for i in range(15, -1, -1):
            out[k + i] = _HEX[n & 15]
            n >>= 4
        return made

    cdef int count_sent(self, double connect_s) except -1:
        """The attempt reached the peer connected last (`connect_to`): Events.connected and
        Events.upstream_request."""
        if self.slot is not None:
            self.slot.count_connect(self.conn_index, connect_s)
            self.slot.count_upstream_request(self.conn_index)
        else:
            self.metrics.connect_duration(self.conn_index, connect_s)
            self.metrics.upstream_request(self.conn_index)
        return 0

    cdef int count_answered(self, long long status, double duration_ms) except -1:
        """The request counters (Events.answered's) and the core's own."""
        if self.slot is not None:
            self.slot.count_request(status, duration_ms / 1000.0)
            self.slot.bump(self.core_cell, 1)
        else:
            self.metrics.request(status, duration_ms / 1000.0)
            self.metrics.core_answered()
        return 0

    cdef int count_handover(self) except -1:
        if self.slot is not None:
            self.slot.bump(self.handover_cell, 1)
        else:
            self.metrics.core_handed_over()
        return 0


cdef dict _WORKERS = {}  # WorkerContext -> its _Worker


cdef _Worker _worker(ctx):
    found = _WORKERS.get(ctx)
    if found is None:
        found = _WORKERS[ctx] = _Worker(ctx)
    return <_Worker>found


cdef char _readbuf[READ_SIZE]
# The parse state: used only inside the call that parses (a head is parsed from its start each
# time, and what the core keeps of it is copied out before any Python runs that could come back
# into the core), so one for all connections: ~3 KiB a connection less.
cdef llhttp_t _parser
cdef Parse _ps


cdef int _grow(char** buf, size_t* cap, size_t want) except -1:
    cdef size_t size
    cdef char* grown
    if want <= cap[0]:
        return 0
    size = cap[0] * 2 if cap[0] else 1024
    while size < want:
        size *= 2
    grown = <char*>PyMem_Realloc(buf[0], size)
    if grown is NULL:
        raise MemoryError()
    buf[0] = grown
    cap[0] = size
    return 0


# -- the connection ----------------------------------------------------------------------------------

cdef class CoreConnection:
    """One client connection until it is handed over (asyncio calls its methods)."""

    cdef object ctx
    cdef _Worker w
    cdef object _make_client
    cdef object _write  # transport.write, bound once
    cdef object _timer_set  # timer.set, bound once a timer
    cdef object transport
    cdef object timer
    cdef object _handed  # the ClientConnection it was given to, once it was
    cdef object client_ip  # str, as the relay logs it
    cdef bytes client_addr  # ... as bytes, for X-Forwarded-For
    cdef _Upstreams upstreams
    cdef bint tls
    cdef bint eof
    cdef bint write_paused
    cdef bint reading
    cdef bint _in_eof  # inside eof_received: its return value closes, or not
    cdef bint draining  # the worker drains (told by `drain`, or seen at the accept or take-back)
    cdef int state
    cdef int served
    cdef double deadline  # the client timer's (the head's), or the upstream read's while SENT
    cdef double began  # when the head under way began to arrive (0.0: none yet)
    # the client's bytes since its last answer
    cdef char* inbuf
    cdef size_t in_n, in_cap
    # the request in flight
    cdef int fd
    cdef size_t req_len
    cdef object peer, route, method, url
    cdef bytes request_id  # as it was sent (None: the request id header is off)
    cdef LocalBooks books  # the policy's local books it was entered in (None: no policy)
    cdef bint head_request, keep_alive, http10, chunked_answer, clean
    cdef bytes keepalive_hint  # the answer's Keep-Alive value, for the pooled connection
    cdef int route_kind
    cdef double route_ms, sent_at, connect_ms
    # its answer so far
    cdef char* abuf
    cdef size_t a_n, a_cap

    def __cinit__(self, ctx, bint tls, make_client):
        """`make_client(ctx, tls)`: the Python relay's connection (downstream.ClientConnection),
        passed in by the worker: the core sits below it and never imports it."""
        self.ctx = ctx
        self.tls = tls
        self._make_client = make_client
        self.fd = -1
        self.reading = True

    def __dealloc__(self):
        PyMem_Free(self.inbuf)
        PyMem_Free(self.abuf)

    # -- asyncio protocol -----------------------------------------------------------------------

    def connection_made(self, transport):
        ctx = self.ctx
        self.transport = transport
        self._write = transport.write
        self.w = _worker(ctx)
        self.upstreams = _upstreams(ctx.loop)
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0] if isinstance(peer, tuple) else "unix"
        self.client_addr = self.client_ip.encode()
        ctx.connection_opened(self)
        self.deadline = _now() + self.w.header_timeout
        self._take_timer()
        if ctx.draining:  # accepted just before the listener closed
            self.drain(ctx.idle_grace)

    def data_received(self, data):
        cdef size_t n = PyBytes_GET_SIZE(data)
        if self.state >= LINGER:
            return  # lingering: what a client sends after the core closed is dropped
        try:
            _grow(&self.inbuf, &self.in_cap, self.in_n + n)
            memcpy(self.inbuf + self.in_n, PyBytes_AS_STRING(data), n)
            self.in_n += n
            if self.state == IDLE:
                self._serve()
            elif self.in_n > HOLD_MOST and self.reading:
                self.reading = False
                self.transport.pause_reading()
        except Exception as exc:
            self._internal_error(exc, "core read")

    def eof_received(self):
        if self.state >= LINGER:
            return None
        if self.state == SENT:
            self.eof = True  # answered first; then closed, or handed over with what is left
            return True
        self._in_eof = True
        try:
            return self._hand_over(True)
        except Exception as exc:
            self._internal_error(exc, "core eof")
            return None
        finally:
            self._in_eof = False

    def connection_lost(self, exc):
        if self._handed is not None:
            return  # uvloop tells the protocol it has now: this only if the swap raced
        if self.state == SENT:
            self._abandon()
        self.state = GONE
        timer = self.timer
        if timer is not None:
            self.timer = None
            timer.give_back()
        self.ctx.connection_closed(self)

    def pause_writing(self):
        self.write_paused = True

    def resume_writing(self):
        self.write_paused = False

    # -- the worker's calls (context.Connection) ----------------------------------------------

    def drain(self, double grace):
        """Graceful stop: with a request in flight, its answer says `Connection: close`
        (keep_alive_after reads `draining`); an idle connection follows the relay's rules
        (ClientConnection.drain), so it is handed over and told."""
        self.draining = True
        if self.state != IDLE:
            return
        client = self._hand_over_client()
        if client is not None:
            client.drain(grace)

    def take_back(self, transport, int served, double deadline):
        """The relay is done with the connection it took (downstream.ClientConnection
        ._give_back): idle, nothing of a next request read, the transport this object's again."""
        self.transport = transport
        self._handed = None
        self.state = IDLE
        self.served = served
        self.in_n = 0
        self.began = 0.0
        self.eof = False
        self.write_paused = False
        self.reading = True
        self.deadline = deadline
        self._write = transport.write
        self.draining = self.ctx.draining
        self._take_timer()

    cdef int _take_timer(self) except -1:
        self.timer = take_timer(self.ctx.loop, self._on_timer)
        self._timer_set = self.timer.set
        self._timer_set(self.deadline)
        return 0

    def abort(self):
        if self.state != GONE and self.transport is not None:
            self.transport.abort()  # connection_lost follows, and abandons what is in flight

    # -- serving -------------------------------------------------------------------------------

    cdef int _serve(self) except -1:
        """The head under way, if it is whole: sent upstream when it is the common request,
        handed over when it is not."""
        cdef int end
        cdef double now
        if self.began == 0.0:
            now = _now()
            self.began = now
            if self.served:  # the first head's deadline runs from the accept (as the relay's)
                self.deadline = now + self.w.header_timeout
                self._timer_set(self.deadline)
        end = _parse(&_parser, &_ps, 0, self.inbuf, self.in_n, False)
        if end == 0:
            if self.in_n > self.w.max_header:
                self._hand_over(False)  # the relay's 431
            return 0
        if end < 0 or not self._request(end):
            self._hand_over(False)
        return 0

    cdef bint _request(self, int end) except -1:
        """Send the parsed request upstream when it is the core's: False, with nothing done
        and nothing sent, when it is not."""
        cdef llhttp_t* p = &_parser
        cdef Parse* ps = &_ps
        cdef const char* base = self.inbuf
        cdef int i, kind, hosts = 0
        cdef size_t head_size = 0
        cdef bint close_tok = False, keep_tok = False
        cdef Span host
        host.at = host.n = 0
        cdef Names names
        cdef _Worker w = self.w
        cdef Pieces pieces
        cdef int before
        cdef const char* rid = NULL
        cdef Py_ssize_t rid_n = 0, size
        cdef int fd
        if p.method != HTTP_GET and p.method != HTTP_HEAD:
            return False
        if p.http_major != 1 or p.http_minor > 1:
            return False
        if (ps.first.n == 0 or base[ps.first.at] != b"/"
                or memchr(base + ps.first.at, b"#", ps.first.n) != NULL
                or ps.first.n > w.max_uri):
            return False
        names = w.names
        for i in range(ps.n):
            kind = names._lookup(base + ps.names[i].at, ps.names[i].n)
            head_size += ps.names[i].n + ps.values[i].n + 4
            if kind == _PLAIN or kind == _HOST:
                if kind == _HOST:
                    hosts += 1
                    host = ps.values[i]
                _keep(ps, i)
            elif kind == _CONNECTION:
                if _is_token(base + ps.values[i].at, ps.values[i].n, b"close", 5):
                    close_tok = True
                elif _is_token(base + ps.values[i].at, ps.values[i].n, b"keep-alive", 10):
                    keep_tok = True
                else:
                    return False
            elif _READ_BY_RELAY >> kind & 1:
                return False  # a length, Expect, X-Forwarded-For, Via, a request id, Upgrade
            # else dropped, as the relay drops it (hop-by-hop, underscored, Proxy-Connection)
        if hosts != 1 or head_size + ps.first.n > w.max_header:
            return False
        host_value = _recent(base + host.at, host.n)
        if host_value not in _KNOWN_HOSTS and not valid_host(host_value):
            return False
        self.http10 = p.http_minor == 0
        self.keep_alive = not close_tok and (not self.http10 or keep_tok)
        self.head_request = p.method == HTTP_HEAD
        method = _HEAD if self.head_request else _GET
        url = _recent(base + ps.first.at, ps.first.n)
        now = _now()
        sending = w.begin(self, method, url, now)
        if sending is None:
            return False
        peer, self.route, self.route_kind, self.route_ms, self.clean, books = <tuple>sending
        if books is not None:  # the policy's local books (CoreBooks.c_books)
            self.books = <LocalBooks?>books
            self.books.enter(self, now, self.route_kind, self.route_ms)
        fd = w.connect_to(peer)
        if fd < 0:
            self.books = None  # `undo` ends its entry (Room.local_ended)
            w.undo(self, peer, _now())
            return False  # the relay connects again, and logs the failover
        w.count_sent(_now() - now)
        if w.rid:
            request_id = w.new_request_id()
            rid = PyBytes_AS_STRING(request_id)
            rid_n = PyBytes_GET_SIZE(request_id)
        else:
            request_id = None
        # the head as the relay's writer writes it (no framing, upgrade or prior XFF / Via:
        # a request with any of them is the relay's)
        before = w.heads.pieces(
            &pieces, PyBytes_AS_STRING(method), PyBytes_GET_SIZE(method), base + ps.first.at,
            ps.first.n, base + host.at, host.n, PyBytes_AS_STRING(self.client_addr),
            PyBytes_GET_SIZE(self.client_addr), self.tls, rid, rid_n, NULL, 0, NULL, 0, NULL, 0,
            NULL, 0)
        size = pieces.total + ps.kept_n
        if <size_t>size > _headcap:
            try:
                _grow(&_headbuf, &_headcap, size)
            except MemoryError:
                close(fd)
                self.books = None  # `undo` ends its entry (Room.local_ended)
                w.undo(self, peer, _now())
                raise
        _write_head(_headbuf, &pieces, before, ps)
        if write(fd, _headbuf, size) != size:
            close(fd)  # nothing or part of it went: a GET, safe to send again from the relay
            self.books = None  # `undo` ends its entry (Room.local_ended)
            w.undo(self, peer, _now())
            return False
        self.sent_at = _now()
        self.connect_ms = <long long>((self.sent_at - now) * 1_000_000 + 0.5) / 1000.0
        self.upstreams.watch(fd, self)
        self.fd = fd
        self.peer = peer
        self.request_id = request_id
        self.method = method
        self.url = url
        self.req_len = end
        self.a_n = 0
        self.state = SENT
        self.deadline = self.sent_at + w.read_timeout
        self._timer_set(self.deadline)
        return True

    cdef int _upstream_ready(self) except -1:
        """The upstream socket has bytes (or its end): the answer, whole, is written to the
        client; one that is not the core's is handed over."""
        cdef ssize_t got
        try:
            while True:
                got = read(self.fd, _readbuf, READ_SIZE)
                if got < 0 and errno == EINTR:
                    continue
                break
            if got < 0:
                if errno == EAGAIN:
                    return 0
                self._hand_over_in_flight(errno)  # the relay ends it with the same error
                return 0
            if got == 0:
                self._hand_over_in_flight()  # an end before the answer was whole
                return 0
            if not self.a_n:  # the common case: the answer whole in one read, parsed there
                self._answer(_readbuf, got)
            else:
                _grow(&self.abuf, &self.a_cap, self.a_n + got)
                memcpy(self.abuf + self.a_n, _readbuf, got)
                self.a_n += got
                self._answer(self.abuf, self.a_n)
        except Exception as exc:
            self._internal_error(exc, "core upstream read")
        return 0

    cdef int _keep_answer(self, const char* base, size_t n) except -1:
        """The answer so far, `base[:n]`, into the connection's own buffer (it was parsed where
        it was read): for a next read, or for the relay."""
        if base != self.abuf:
            _grow(&self.abuf, &self.a_cap, n)
            memcpy(self.abuf, base, n)
            self.a_n = n
        return 0

    cdef int _answer(self, const char* base, size_t n) except -1:
        """The answer so far is `base[:n]`: written to the client when it is whole and the
        core's, kept for the next read, or handed over."""
        cdef int end, status
        cdef Parse* ps = &_ps
        cdef llhttp_t* p = &_parser
        cdef bint keep, chunked
        cdef _Worker w = self.w
        cdef Pieces pieces
        cdef int before
        cdef const char* framing = NULL
        cdef Py_ssize_t framing_n = 0
        end = _parse(p, ps, 1, base, n, self.head_request)
        if end < 0 or (ps.head_done and not self._answer_kept()) or (end == 0 and n > w.answer_most):
            # bad, or not the core's (known from its head already), or too long
            self._keep_answer(base, n)
            self._hand_over_in_flight()
            return 0
        if end == 0:
            self._keep_answer(base, n)
            self.deadline = _now() + w.read_timeout  # per read, as the relay's
            self._timer_set(self.deadline)
            return 0
        status = p.status_code
        reusable = (llhttp_should_keep_alive(p) != 0 and <size_t>end == n
                    and not (self.head_request and ps.npieces))
        now = _now()
        peer = self.peer
        keep = (self.keep_alive and self.served + 1 < w.keepalive_requests
                and not self.draining)
        chunked = self.chunked_answer and not self.head_request
        if chunked:
            if self.http10:
                keep = False  # its end is the connection's end (as the relay frames it)
                chunked = False
            else:
                framing = b"Transfer-Encoding: chunked\r\n"
                framing_n = 28
        extra = peer.header_line if w.upstream_header else _EMPTY
        before = _RESPONSE_HEAD.pieces(&pieces, status, framing, framing_n,
                                       PyBytes_AS_STRING(extra), PyBytes_GET_SIZE(extra), keep,
                                       self.http10)  # a status with a line: `_answer_kept`
        out = self._framed(&pieces, before, chunked)
        self._drop_answer()
        if reusable:
            self._pool_upstream(now)
        else:
            self._close_upstream()
        self._write(out)
        # times in ms are whole µs, as Events.answered makes them
        duration_ms = <long long>((now - self.began) * 1_000_000) / 1000.0
        if w.lines:
            if peer is not w.line_peer:
                w.line_peer = peer
                w.line_address = peer.address
            # one try, at the first server in order: not overflowed
            line = access_line(None, w.pid, self.request_id, self.method, self.url,
                               status, PyBytes_GET_SIZE(out), duration_ms, self.client_ip,
                               w.line_address, None, 1, False, self.connect_ms, NAN,
                               <long long>((now - self.sent_at) * 1_000_000) / 1000.0,
                               self.route, 0, False)
        else:
            line = None
        w.count_answered(status, duration_ms)
        if self.books is not None:
            self.books.done(self, now)  # its worker is done with it (Room.local_answered)
        w.finish(self, peer, self.route, self.clean, now, self.sent_at, line)
        self.peer = self.request_id = self.url = self.route = self.books = None  # an idle one
        self.served += 1
        self._next_request(keep)
        return 0

    cdef void _drop_answer(self) noexcept:
        """The answer is written out: its buffer, if it took one (an answer in several reads),
        is let go, so an idle connection holds none."""
        self.a_n = 0
        if self.abuf != NULL:
            PyMem_Free(self.abuf)
            self.abuf = NULL
            self.a_cap = 0

    cdef bytes _framed(self, Pieces* head, int before, bint chunked):
        """The head and the body as the client gets them: as they came, or re-chunked (a chunk
        for each piece llhttp handed over, as the relay writes one for each body call)."""
        cdef Parse* ps = &_ps
        cdef Py_ssize_t size = head.total + ps.kept_n + ps.body_n
        cdef int i
        cdef char* out
        cdef char line[24]
        cdef int k
        if chunked:
            for i in range(ps.npieces):
                size += _hex_size(ps.pieces[i].n) + 4
            size += 5
        made = PyBytes_FromStringAndSize(NULL, size)
        out = _write_head(PyBytes_AS_STRING(made), head, before, ps)
        for i in range(ps.npieces):
            if chunked:
                k = _hex(line, ps.pieces[i].n)
                memcpy(out, line, k)
                out += k
            memcpy(out, ps.base + ps.pieces[i].at, ps.pieces[i].n)
            out += ps.pieces[i].n
            if chunked:
                out[0] = b"\r"
                out[1] = b"\n"
                out += 2
        if chunked:
            memcpy(out, b"0\r\n\r\n", 5)
        return made

    cdef bint _answer_kept(self) except -1:
        """Is the answer the core's (its forwarded fields marked, `_keep`)? Not an interim or
        101, a status the walk may retry on or replace with an error page or that has no status
        line of failproxy's own, an answer without a length, a header the relay reads."""
        cdef Parse* ps = &_ps
        cdef llhttp_t* p = &_parser
        cdef const char* base = ps.base
        cdef int i, kind
        cdef int status = p.status_code
        if status < 200 or status == 101 or status >= 600 or _RESPONSE_HEAD._line_at[status] == NULL:
            return False
        if status >= _REASON_MIN and status in _STATUS_REASONS:
            return False
        if self.w.intercept_errors and status >= 400:
            return False
        self.chunked_answer = p.flags & F_CHUNKED != 0
        if not self.head_request and status != 204 and status != 304:
            if not p.flags & (F_CONTENT_LENGTH | F_CHUNKED):
                return False  # to the connection's end
        self.keepalive_hint = _EMPTY
        for i in range(ps.n):
            kind = _RESPONSE_NAMES._lookup(base + ps.names[i].at, ps.names[i].n)
            if kind == _PLAIN or kind == _LENGTH:
                _keep(ps, i)
            elif kind == _CONNECTION:
                if not (_is_token(base + ps.values[i].at, ps.values[i].n, b"close", 5)
                        or _is_token(base + ps.values[i].at, ps.values[i].n, b"keep-alive", 10)):
                    return False
            elif kind == _TE:
                if not _is_token(base + ps.values[i].at, ps.values[i].n, b"chunked", 7):
                    return False  # another coding: the relay refuses it (502)
            elif kind == _KEEPALIVE:
                self.keepalive_hint = _recent(base + ps.values[i].at, ps.values[i].n)
            elif kind != _DROP:
                return False  # read by the relay (Upgrade, X-Accel-Buffering)
        return True

    cdef int _next_request(self, bint keep) except -1:
        """The answer is out: on to what the client sent meanwhile, or idle, or closed."""
        cdef size_t rest = self.in_n - self.req_len
        memmove(self.inbuf, self.inbuf + self.req_len, rest)
        self.in_n = rest
        self.req_len = 0
        self.began = 0.0
        self.state = IDLE
        if not rest and self.inbuf != NULL:  # idle: it holds no buffer (as nginx's keep-alive)
            PyMem_Free(self.inbuf)
            self.inbuf = NULL
            self.in_cap = 0
        if not keep:
            self._close()
            return 0
        if not self.reading:
            self.reading = True
            self.transport.resume_reading()
        if self.write_paused:
            self._hand_over(self.eof)  # a client behind on its answers: the relay's timers
            return 0
        if rest:
            self._serve()
            return 0
        if self.eof:
            self._close()
            return 0
        self.deadline = _now() + self.w.keepalive_timeout
        self._timer_set(self.deadline)
        return 0

    cdef int _pool_upstream(self, double now) except -1:
        """The upstream keeps the connection alive: it goes to the relay's pool, as the
        relay's own would (the next request to that socket is then the relay's)."""
        fd = self.fd
        self.upstreams.forget(fd)
        self.fd = -1
        self.w.pool(self.peer, fd, self.keepalive_hint, now)
        return 0

    cdef void _close_upstream(self) noexcept:
        if self.fd >= 0:
            self.upstreams.closing(self.fd)
            close(self.fd)
            self.fd = -1

    cdef int _close(self) except -1:
        """As ClientConnection.close: our FIN, then what the client still sends is read and
        dropped until it closes or LINGER passes (closing with unread input resets)."""
        transport = self.transport
        self.state = LINGER
        if self.eof or not transport.can_write_eof():
            transport.close()
            return 0
        transport.write_eof()
        if not self.reading:
            self.reading = True
            transport.resume_reading()
        self.ctx.loop.call_later(2.0, transport.close)
        return 0

    cdef int _abandon(self) except -1:
        """The client left with its request in flight: the relay's client_gone (499)."""
        now = _now()
        peer = self.peer
        self._close_upstream()
        self.peer = self.books = None  # `gone` ends its entry, as `undo` does
        self.w.gone(self, peer, self.route, now, self.began, self._request_id_str(), self.method,
                    self.url, self.client_ip, self.connect_ms)
        return 0

    # -- timers ---------------------------------------------------------------------------------

    def _on_timer(self):
        if self.state >= LINGER:
            return
        try:
            if self.state == SENT:
                self._hand_over_in_flight()  # the read deadline passed: the relay's 504
            elif self.served and not self.in_n:
                self._close()  # keepalive_timeout, nothing of a next request: as the relay
            else:
                self._hand_over(False)  # the head's deadline: the relay's 408
        except Exception as exc:
            self._internal_error(exc, "core timer")

    # -- the hand-overs --------------------------------------------------------------------------

    cdef object _hand_over_client(self):
        if self._handed is None and self.state != GONE:
            self._hand_over(False)
        return self._handed

    cdef object _hand_over(self, bint eof):
        """Give the connection to the Python relay (the module docstring says when)."""
        return self._give(eof, None)

    cdef str _request_id_str(self):
        """The request id as the relay keeps it ("" when off): for a hand-over, and a 499."""
        return self.request_id.decode("ascii") if self.request_id is not None else ""

    cdef int _hand_over_in_flight(self, int error=0) except -1:
        peer = self.peer
        fd = self.fd
        self.upstreams.forget(fd)
        self.fd = -1
        self.peer = self.books = None  # its entry passes to the exchange (Room.rekey)
        inflight = InFlight(self, peer, fd, self.abuf[:self.a_n], self.sent_at,
                            self.connect_ms, self.route_kind, self.route_ms, self.clean,
                            self._request_id_str(), self.deadline, error)
        self._give(self.eof, inflight)
        return 0

    cdef object _give(self, bint eof, inflight):
        cdef object client
        cdef bytes data = self.inbuf[:self.in_n]
        timer = self.timer
        if timer is not None:
            self.timer = None
            timer.give_back()  # the client's own is taken in its constructor: reused, not new
        self.state = GONE
        if self.in_n or inflight is not None:
            self.w.count_handover()  # a request, or part of one, for the relay to answer
        client = self._make_client(self.ctx, self.tls)
        self._handed = client
        self.ctx.connection_replaced(self, client)
        transport = self.transport
        transport.set_protocol(client)
        if not self.reading:
            transport.resume_reading()
        keep = client.adopt(transport, data, eof, self.began, self.deadline, self.write_paused,
                            self.served, inflight, self)
        if keep is None and eof and not self._in_eof:
            transport.close()  # what eof_received's None would have done, had it been asked
        return keep

    cdef _internal_error(self, exc, str where):
        """The catch-all: a bug costs this connection (and what it has in flight), never the
        worker."""
        self.ctx.events.internal_error(None, exc, where)
        if self._handed is not None or self.state == GONE:
            return
        if self.state == SENT:
            self._abandon()
        self.state = LINGER
        self.transport.abort()
