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
loop turn's lines with one write(), as failproxy does (failproxy importable: PYTHONPATH).
"""

from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdlib cimport calloc
from libc.string cimport memcpy, memmove, memset, strlen
from posix.unistd cimport close, read, write

import argparse
import socket


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


cdef void watch(int fd):
    cdef epoll_event ev
    ev.events = EPOLLIN
    ev.data.fd = fd
    epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev)


cdef void drop(int fd):
    """Close a client and the upstream it waits on (closing takes both out of the set)."""
    cdef int up = peer[fd]
    if up >= 0:
        close(up)
        peer[up] = -1
        kind[up] = CLOSED
    peer[fd] = -1
    held[fd] = 0
    kind[fd] = CLOSED
    close(fd)


cdef bint send_all(int fd, const char *data, ssize_t n):
    """Answers here are small: a client socket takes them whole, or the floor gives it up."""
    cdef ssize_t w
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
    if hook is not None:
        hook(-up)
    if client >= 0:
        peer[client] = -1
        if close_after[client]:
            drop(client)
        elif held[client]:
            dispatch(client)


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

    def hook(self, fd: int) -> None:
        if fd > 0:
            self.started[fd] = self.now()
            return
        now = self.now()
        ms = round((now - self.started.pop(-fd)) * 1e6) / 1000
        self.seq += 1
        self.lines.append(self.render(
            None, self.pid, f"cf{self.pid}-{self.seq}", b"GET", b"/fast", 200, 107, ms,
            "127.0.1.1", "unix:/tmp/h1.sock", ("unix:/tmp/h1.sock",), 1, False, 0.04, None,
            ms - 0.05, "GET /fast", 0, False))

    def turn_end(self) -> None:
        if self.lines:
            self.write(self.fd, b"".join(self.lines))
            self.lines.clear()


HOOKS = {"none": None, "call": _call, "objects": _objects, "log": None}


def main() -> None:
    global peer, kind, head_done, close_after, hook, turn_end, held, bufs, epfd, upstream_len
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    parser.add_argument("--upstream", required=True, help="unix:/path")
    parser.add_argument("--hook", choices=list(HOOKS), default="none",
                        help="a Python function called as each request starts and ends: "
                        "none, an empty one (call), one that makes an object (objects), or "
                        "failproxy's access line for each request, written each loop turn (log)")
    args = parser.parse_args()
    hook = HOOKS[args.hook]
    if args.hook == "log":
        log = _AccessLog()
        hook, turn_end = log.hook, log.turn_end
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
    serve(sock.fileno())
