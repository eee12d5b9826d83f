# cython: language_level=3, boundscheck=False, wraparound=False
"""The ceiling of a compiled relay core: the seed layout's pass-through written in C (Cython),
on its own epoll loop, with no uvloop, no Python object a request and no HTTP beyond framing.

What `bench/targets/floor_proxy.py --per-request` does, minus the runtime: a request (a GET
without a body, as wrk sends it; its head ends it) gets a new UNIX connection, and the next one
waits in the client's buffer until that answer has ended; the answer is copied back until the
app closes, its `Connection: close` line taken out so that the client's connection stays open
(unless the client asked for it). Clients get TCP_NODELAY, as uvloop gives its transports. One epoll set for clients and upstreams alike (nginx's model: one
epoll_wait a loop turn). Not a proxy anyone should run: it is here to measure how far a relay
core in C could take failproxy in the seed's layout (`python -m bench.profiles.seedfronts
cfloor`), beside the floor of the stack failproxy is built on.

    cythonize -i -3 cfloor.pyx     # in a directory of its own (seedfronts does it)
    python -c "import cfloor; cfloor.main()" --listen 127.0.0.1:8080 --upstream unix:/tmp/up.sock

TERM's default action stops it (the loop never returns to Python). `--hook call` calls an
empty Python function as each request starts and as it ends, `--hook objects` one that makes
and drops a small object there: what a Python callback costs a request in this layout. `--hook
log` makes failproxy's access line for each request with failproxy's renderer and writes a
loop turn's lines with one write(), as failproxy does (failproxy importable: PYTHONPATH);
`--hook render` only makes the line, `--hook write` only writes one of the same size, `--hook
cline` makes a line of the same fields in C (snprintf) and writes a turn's lines at once.

`--decide CONFIG` (with `--clients uvloop`) asks failproxy's own decision objects, made from a
failproxy config, what failproxy's exchange asks of them for each request (Decisions).

`--clients uvloop` leaves the clients to uvloop, as failproxy does: a uvloop server whose
protocol (a Cython class) hands each read to the same C code, answers written with the
transport's `write()`, and the upstream sockets in the epoll set of their own, which uvloop
watches as one reader (failproxy's Poller). What the client side costs a C core that keeps
uvloop's transports (TLS, flow control, reloads) instead of owning its clients' sockets.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdio cimport snprintf
from libc.stdlib cimport calloc
from libc.string cimport memcpy, memmove, memset, strlen
from posix.unistd cimport close, read, write

import argparse
import socket
import sys


cdef extern from "sys/epoll.h":
    cdef union epoll_data_t:
        int fd
    cdef struct epoll_event:
        unsigned int events
        epoll_data_t data
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout) nogil
    int EPOLLIN, EPOLL_CTL_ADD

cdef extern from "sys/socket.h":
    ctypedef unsigned int socklen_t
    cdef struct sockaddr:
        pass
    int c_socket "socket"(int domain, int type, int protocol)
    int c_connect "connect"(int fd, const sockaddr *addr, socklen_t len)
    int accept4(int fd, sockaddr *addr, socklen_t *len, int flags)
    int setsockopt(int fd, int level, int name, const void *value, socklen_t len)
    int AF_UNIX, SOCK_STREAM, SOCK_NONBLOCK, SOCK_CLOEXEC

cdef extern from "netinet/in.h":
    int IPPROTO_TCP

cdef extern from "netinet/tcp.h":
    int TCP_NODELAY

cdef extern from "sys/un.h":
    cdef struct sockaddr_un:
        unsigned short sun_family
        char sun_path[108]

cdef extern from "time.h":
    struct timespec:
        long tv_sec
        long tv_nsec
    int clock_gettime(int clk, timespec *ts)
    int CLOCK_MONOTONIC, CLOCK_REALTIME

cdef extern from "unistd.h":
    int getpid()


cdef double now_mono():
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef void c_line(int up):
    """--hook cline: failproxy's access line's fields, formatted by snprintf into the turn's
    buffer (what a core keeping its record in C would do)."""
    global loglen, seq
    cdef timespec wall
    cdef double ms = (now_mono() - started[up]) * 1000.0
    if loglen > 65536 - 1024:
        return
    clock_gettime(CLOCK_REALTIME, &wall)
    seq += 1
    loglen += snprintf(logbuf + loglen, 1024,
        b'{"event":"request","level":"info","timestamp":%ld.%06ld,"pid":%d,'
        b'"request_id":"cf%d-%lu","method":"GET","path":"/fast","status":200,'
        b'"bytes_sent":107,"duration_ms":%.3f,"client":"127.0.1.1",'
        b'"upstream":"unix:/tmp/h1.sock","upstreams":["unix:/tmp/h1.sock"],"tries":1,'
        b'"overflowed":false,"connect_ms":0.04,"upstream_ms":%.3f,"route":"GET /fast",'
        b'"spilled_bytes":0,"static":false}\n',
        wall.tv_sec, wall.tv_nsec // 1000, getpid(), getpid(), seq, ms, ms - 0.05)


cdef void c_lines_written():
    global loglen
    if loglen:
        write(logfd, logbuf, loglen)
        loglen = 0


cdef extern from "string.h":
    void *memmem(const void *hay, size_t hlen, const void *needle, size_t nlen)

cdef enum:
    MAXFD = 65536
    BUF = 16384
    CLOSED = 0
    CLIENT = 1
    UPSTREAM = 2
    LISTENER = 3

cdef int *peer                # client fd -> its upstream fd, upstream fd -> its client; -1
cdef char *kind               # per fd: CLOSED, CLIENT, UPSTREAM (a stale event meets CLOSED)
cdef char *head_done          # per upstream fd: the answer's head was passed on
cdef char *close_after        # per client fd: it asked for `Connection: close`
cdef int *held                # per client fd: request bytes read so far
cdef char *bufs               # per client fd: BUF bytes of request
cdef sockaddr_un upstream_addr
cdef socklen_t upstream_len
cdef int epfd
cdef char rbuf[BUF]
cdef const char *CLOSE_LINE = b"Connection: close\r\n"
cdef object hook = None       # --hook: a Python call as a request starts (fd) and ends (-fd)
cdef object turn_end = None   # --hook log: a Python call after each epoll_wait's events
cdef bint c_lines = False     # --hook cline: an access line made in C, written at turn end
cdef char logbuf[65536]
cdef int loglen = 0
cdef int logfd = -1
cdef double started[65536]    # --hook cline: per upstream fd, when its request was sent
cdef unsigned long seq = 0
cdef object decisions = None  # --decide CONFIG: failproxy's own decisions a request (Decisions)
cdef bint on_uvloop = False   # --clients uvloop: clients are uvloop's transports
cdef list transports = []     # --clients uvloop: per client fd, its transport


cdef void watch(int fd):
    cdef epoll_event ev
    ev.events = EPOLLIN
    ev.data.fd = fd
    epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev)


cdef void forget(int fd):
    """A client's state gone, and the upstream it waits on closed (closing takes it out of the
    set)."""
    cdef int up = peer[fd]
    if up >= 0:
        close(up)
        peer[up] = -1
        kind[up] = CLOSED
    peer[fd] = -1
    held[fd] = 0
    kind[fd] = CLOSED


cdef void drop(int fd):
    """Close a client and the upstream it waits on."""
    forget(fd)
    if on_uvloop:
        transports[fd].close()
        transports[fd] = None
    else:
        close(fd)


cdef bint send_all(int fd, const char *data, ssize_t n):
    """Answers here are small: a client socket takes them whole, or the floor gives it up."""
    cdef ssize_t w
    if on_uvloop:
        transports[fd].write(PyBytes_FromStringAndSize(data, n))
        return True
    while n > 0:
        w = write(fd, data, n)
        if w <= 0:
            return False
        data += w
        n -= w
    return True


cdef void client_readable(int fd):
    cdef ssize_t n = read(fd, bufs + <size_t>fd * BUF + held[fd], BUF - held[fd])
    if n <= 0:
        if n < 0 and (errno == EAGAIN or errno == EINTR):
            return
        drop(fd)
        return
    held[fd] += <int>n
    if peer[fd] < 0:
        dispatch(fd)
    elif held[fd] == BUF:
        drop(fd)


cdef void dispatch(int fd):
    """A whole request held: a new upstream connection for it (the next request waits in the
    buffer until this one's answer has ended)."""
    cdef char *req = bufs + <size_t>fd * BUF
    cdef char *end = <char *>memmem(req, held[fd], b"\r\n\r\n", 4)
    cdef int up, size
    if end == NULL:
        if held[fd] == BUF:
            drop(fd)
        return
    size = <int>(end + 4 - req)
    up = c_socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
    if up < 0 or up >= MAXFD:
        if up >= 0:
            close(up)
        drop(fd)
        return
    if c_connect(up, <sockaddr *>&upstream_addr, upstream_len) != 0 \
            or write(up, req, size) != size:
        close(up)
        drop(fd)
        return
    close_after[fd] = memmem(req, size, b"onnection: close\r\n", 18) != NULL
    held[fd] -= size
    memmove(req, req + size, held[fd])
    peer[fd] = up
    peer[up] = fd
    kind[up] = UPSTREAM
    head_done[up] = 0
    watch(up)
    if c_lines:
        started[up] = now_mono()
    if decisions is not None:
        decisions.start(up)
    if hook is not None:
        hook(up)


cdef void upstream_readable(int up):
    cdef int client = peer[up]
    cdef ssize_t n
    cdef char *end
    cdef char *line
    cdef size_t before, skip = strlen(CLOSE_LINE)
    while True:
        n = read(up, rbuf, BUF)
        if n < 0 and (errno == EAGAIN or errno == EINTR):
            return
        if n <= 0:
            break
        if client < 0:
            continue
        if head_done[up]:
            if not send_all(client, rbuf, n):
                drop(client)
                return
            continue
        # an answer's head comes whole in its first read here (unicorn writes it at once)
        head_done[up] = 1
        end = <char *>memmem(rbuf, n, b"\r\n\r\n", 4)
        line = <char *>memmem(rbuf, n, CLOSE_LINE, skip)
        if end != NULL and line != NULL and line < end:
            before = line - rbuf
            memmove(line, line + skip, n - before - skip)
            n -= skip
        if not send_all(client, rbuf, n):
            drop(client)
            return
    close(up)
    kind[up] = CLOSED
    peer[up] = -1
    if c_lines:
        c_line(up)
    if decisions is not None:
        decisions.end(up)
    if hook is not None:
        hook(-up)
    if client >= 0:
        peer[client] = -1
        if close_after[client]:
            drop(client)
        elif held[client]:
            dispatch(client)


cdef void upstream_events() noexcept:
    """--clients uvloop: the upstream set's ready sockets, read as uvloop reports the set
    readable."""
    cdef epoll_event events[256]
    cdef int i, k
    k = epoll_wait(epfd, events, 256, 0)
    for i in range(k):
        if kind[events[i].data.fd] == UPSTREAM:
            upstream_readable(events[i].data.fd)
    if c_lines:
        c_lines_written()
    if turn_end is not None:
        turn_end()


def _upstream_events() -> None:
    upstream_events()


cdef class Client:
    """--clients uvloop: a client connection's protocol; its bytes go to the C state of its fd."""
    cdef int fd

    def connection_made(self, transport):
        self.fd = transport.get_extra_info("socket").fileno()
        if self.fd >= MAXFD:
            transport.abort()
            self.fd = -1
            return
        transports[self.fd] = transport
        peer[self.fd] = -1
        held[self.fd] = 0
        kind[self.fd] = CLIENT

    def data_received(self, bytes data):
        cdef int fd = self.fd
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        if fd < 0 or kind[fd] != CLIENT:
            return
        if n > BUF - held[fd]:
            drop(fd)
            return
        memcpy(bufs + <size_t>fd * BUF + held[fd], PyBytes_AS_STRING(data), n)
        held[fd] += <int>n
        if peer[fd] < 0:
            dispatch(fd)

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        cdef int fd = self.fd
        if fd < 0 or kind[fd] != CLIENT:
            return
        forget(fd)
        transports[fd] = None

    def pause_writing(self):
        pass

    def resume_writing(self):
        pass


cdef void serve(int listen_fd) noexcept:
    cdef epoll_event events[256]
    cdef int i, k, fd, c, one = 1
    kind[listen_fd] = LISTENER
    watch(listen_fd)
    while True:
        with nogil:
            k = epoll_wait(epfd, events, 256, -1)
        for i in range(k):
            fd = events[i].data.fd
            if kind[fd] == LISTENER:
                while True:
                    c = accept4(listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)
                    if c < 0:
                        break
                    if c >= MAXFD:
                        close(c)
                        continue
                    # as uvloop's TCP transports: an answer's head and body, written apart,
                    # are not held back for the client's delayed ACK
                    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one))
                    peer[c] = -1
                    held[c] = 0
                    kind[c] = CLIENT
                    watch(c)
            elif kind[fd] == UPSTREAM:
                upstream_readable(fd)
            elif kind[fd] == CLIENT:
                client_readable(fd)
        if c_lines:
            c_lines_written()
        if turn_end is not None:
            turn_end()


class _Exchange:
    __slots__ = ("fd", "method", "target", "status", "sent", "started", "peer", "route",
                 "attempt", "bytes_sent")


_live: dict = {}


def _call(fd: int) -> None:
    pass


def _objects(fd: int) -> None:
    """A little of what a relay in Python does a request: an object with ten fields, a dict
    entry for it, a small bytes join; undone at the end."""
    if fd > 0:
        ex = _Exchange()
        ex.fd = fd
        ex.method = b"GET"
        ex.target = b"/fast"
        ex.status = 0
        ex.sent = 0
        ex.started = 0.0
        ex.peer = None
        ex.route = "/fast"
        ex.attempt = 1
        ex.bytes_sent = len(b"".join([b"GET ", ex.target, b" HTTP/1.1\r\n"]))
        _live[fd] = ex
    else:
        ex = _live.pop(-fd)
        ex.status = 200


class _AccessLog:
    """failproxy's access line, made by its own renderer (`failproxy.telemetry.accessline`,
    the Cython one in a compiled build) as each request ends, with the fields it has in the
    seed's layout, and written with one write() a loop turn, as failproxy's sink does."""

    def __init__(self) -> None:
        import os
        import time

        from failproxy.telemetry.accessline import render
        self.render = render
        self.now = time.monotonic
        self.write = os.write
        self.fd = os.open(f"cfloor-{os.getpid()}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                          0o644)
        self.pid = os.getpid()
        self.started: dict = {}
        self.lines: list = []
        self.seq = 0
        self.fixed = self.line_sample()

    def line_sample(self) -> bytes:
        self.started[0] = self.now()
        return self.line(0)

    def hook(self, fd: int) -> None:
        if fd > 0:
            self.started[fd] = self.now()
            return
        self.lines.append(self.line(-fd))

    def line(self, fd: int) -> bytes:
        now = self.now()
        ms = round((now - self.started.pop(fd)) * 1e6) / 1000
        self.seq += 1
        return self.render(  # type: ignore[no-any-return]
            None, self.pid, f"cf{self.pid}-{self.seq}", b"GET", b"/fast", 200, 107, ms,
            "127.0.1.1", "unix:/tmp/h1.sock", ("unix:/tmp/h1.sock",), 1, False, 0.04, None,
            ms - 0.05, "GET /fast", 0, False)

    def render_only(self, fd: int) -> None:
        """--hook render: the line made and dropped, nothing written."""
        if fd > 0:
            self.started[fd] = self.now()
        else:
            self.line(-fd)

    def write_only(self, fd: int) -> None:
        """--hook write: a line of the same size written each loop turn, none made."""
        if fd < 0:
            self.lines.append(self.fixed)

    def turn_end(self) -> None:
        if self.lines:
            self.write(self.fd, b"".join(self.lines))
            self.lines.clear()


class Decisions:
    """--decide CONFIG: what failproxy's exchange asks of its decision objects for a request
    that goes to the local socket and is answered 200 (exchange.py: start, _try_peer, _open,
    _send_request, on_response_head, _learn, _end_attempt, events.request's counters), asked of
    the real objects of a WorkerContext made from a failproxy config: the route table, the
    `room` policy, the peer's slot and the metrics. Each a Python call from here, as a core in
    C would make them before they are batched."""

    def __init__(self, path: str, loop: object) -> None:
        from failproxy import config
        from failproxy.proxy.context import WorkerContext
        from failproxy.routing.routes import KNOWN_SLOW, route_key
        from failproxy.telemetry.metrics import WorkerMetrics
        import time
        cfg = config.load(path)
        self.ctx = ctx = WorkerContext(cfg, WorkerMetrics(len(cfg.upstream.servers)), loop)
        assert ctx.room is not None, "--decide: a config with the room policy (backups)"
        self.room = ctx.room
        self.routes = ctx.routes
        self.events = ctx.events
        self.metrics = ctx.metrics
        self.now = time.monotonic
        self.key = route_key
        self.slow_kind = KNOWN_SLOW
        self.sent: dict = {}
        self.count = 0
        self.away = 0

    def start(self, fd: int) -> None:
        now = self.now()
        route = self.key(b"GET", b"/fast")
        kind, route_ms = self.routes.known(route, b"/fast")
        slow = kind == self.slow_kind
        peer, reason = self.room.choose(now, slow)
        if peer is not self.room.local:
            # the policy would send it elsewhere or hold it; this pass-through has one upstream
            self.away += 1
            peer = self.room.local
        self.count += 1
        if self.count % 100000 == 0:
            print(f"decide: {self.count} requests, {self.away} not sent home by the policy",
                  file=sys.stderr, flush=True)
        peer.acquire()
        self.room.local_sent(fd, now, kind, route_ms)
        self.events.connected(peer, 0.00004)
        self.events.upstream_request(peer)
        self.sent[fd] = (now, route, peer, slow)

    def end(self, fd: int) -> None:
        now = self.now()
        sent, route, peer, slow = self.sent.pop(fd)
        room = self.room
        peer.answered()
        room.local_answered(fd, now)
        ms = int((now - sent) * 1_000_000) / 1000
        route_ms, learned_ms = self.routes.answered(route, ms, now, True)
        room.answered(peer, 0, ms, route_ms or learned_ms, slow, now)
        peer.release(True)
        room.release()
        self.metrics.request(200, ms / 1000.0)


def _stop_decisions(loop: object) -> None:
    print(f"decide: {decisions.count} requests, {decisions.away} not sent home by the policy",
          file=sys.stderr, flush=True)
    loop.stop()


HOOKS = {"none": None, "call": _call, "objects": _objects, "log": None, "render": None,
         "write": None, "cline": None}


def main() -> None:
    global peer, kind, head_done, close_after, hook, turn_end, held, bufs, epfd, upstream_len
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    parser.add_argument("--upstream", required=True, help="unix:/path")
    parser.add_argument("--decide", metavar="CONFIG",
                        help="a failproxy config: make failproxy's decisions for each request "
                        "on a WorkerContext of it (with --clients uvloop)")
    parser.add_argument("--clients", choices=["epoll", "uvloop"], default="epoll",
                        help="clients in the loop's own epoll set (epoll) or uvloop's transports")
    parser.add_argument("--hook", choices=list(HOOKS), default="none",
                        help="a Python function called as each request starts and ends: "
                        "none, an empty one (call), one that makes an object (objects), or "
                        "failproxy's access line for each request, written each loop turn (log)")
    args = parser.parse_args()
    if args.decide and args.clients != "uvloop":
        parser.error("--decide runs with --clients uvloop")
    hook = HOOKS[args.hook]
    if args.hook in ("log", "render", "write"):
        log = _AccessLog()
        hook = {"log": log.hook, "render": log.render_only, "write": log.write_only}[args.hook]
        turn_end = log.turn_end
    global c_lines, logfd
    if args.hook == "cline":
        import os
        c_lines = True
        logfd = os.open(f"cfloor-{os.getpid()}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                        0o644)
    host, _, port = args.listen.rpartition(":")
    path = args.upstream[len("unix:"):].encode()
    assert args.upstream.startswith("unix:") and len(path) < 108
    peer = <int *>calloc(MAXFD, sizeof(int))
    held = <int *>calloc(MAXFD, sizeof(int))
    kind = <char *>calloc(MAXFD, 1)
    head_done = <char *>calloc(MAXFD, 1)
    close_after = <char *>calloc(MAXFD, 1)
    bufs = <char *>calloc(MAXFD, BUF)  # untouched pages cost nothing
    for i in range(MAXFD):
        peer[i] = -1
    memset(&upstream_addr, 0, sizeof(upstream_addr))
    upstream_addr.sun_family = AF_UNIX
    memcpy(upstream_addr.sun_path, <char *>path, len(path))
    upstream_len = sizeof(upstream_addr)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, int(port)))
    sock.listen(1024)
    sock.setblocking(False)
    epfd = epoll_create1(0)
    if args.clients == "epoll":
        serve(sock.fileno())
        return
    global on_uvloop
    import uvloop
    on_uvloop = True
    transports.extend([None] * MAXFD)
    loop = uvloop.new_event_loop()
    global decisions
    if args.decide:
        decisions = Decisions(args.decide, loop)
    loop.add_reader(epfd, _upstream_events)
    if decisions is not None:  # its counts on stderr as it stops
        import signal
        loop.add_signal_handler(signal.SIGTERM, _stop_decisions, loop)
    loop.run_until_complete(loop.create_server(Client, sock=sock, backlog=1024))
    loop.run_forever()
