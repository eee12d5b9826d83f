# cython: language_level=3, boundscheck=False, wraparound=False
"""read(2) and write(2) on an upstream socket, and epoll_wait(2) and epoll_ctl(2) on their set,
for rawtransport.py, the GIL kept.

The compiled twins of `os.read` and `os.write`, selected in rawtransport.py at import. The
sockets are non-blocking, so the calls never wait; `os.read` and `os.write` release the GIL
around each call all the same (`Py_BEGIN_ALLOW_THREADS`: a mutex and a condition signal each
way, ~350 instructions a call, bench/PROFILE.md) and parse their arguments through argument
clinic; `os.write` also takes a buffer view of its bytes. The loop thread is the only one that
runs failproxy's code, as uvloop keeps the GIL for its own socket calls.

`ready` is `select.epoll.poll(0, maxevents)` for rawtransport.Poller, which never waits
(timeout 0) either: the same list of (fd, events) pairs, without the GIL's release, the clinic's
parsing of a timeout object, or a wait that EINTR could cut. `ctl` is `register`, `modify` and
`unregister` of the same epoll object, one call each way as select's (which also lets the GIL go
around epoll_ctl, a syscall that never waits), the fd stored in the event's data as select does.

`stream_socket`, `connect`, `close` and `pending_error` are the new upstream connection's
socket(2), connect(2), close(2) and getsockopt(SO_ERROR) on a bare fd, for connect.py and
rawtransport.py, where a `_socket.socket` object cost ~3k instructions a connection (its
allocation, the address parsed from a str at each connect, three GIL releases). `connect` takes
the address as the C struct, built once per peer (`sockaddr`), and returns the errno (0 when
connected) instead of raising: a full UNIX backlog (EAGAIN) is the hot path of an overloaded box.

The same results as the os functions: a bytes object of what was read (b"" at the end), the
count written, an OSError of the errno's class (BlockingIOError for EAGAIN). EINTR is raised as
InterruptedError where the os functions retry (rawtransport takes it as EAGAIN: the socket is
level-triggered, so it comes back). What is not exactly bytes, or a read larger than the buffer,
is handed to the os function itself (tests/test_sockio.py).
"""


cdef extern from "unistd.h":
    ssize_t c_read "read"(int fd, void* buf, size_t count)
    ssize_t c_write "write"(int fd, const void* buf, size_t count)
    int c_close "close"(int fd)

cdef extern from "sys/socket.h":
    ctypedef unsigned int socklen_t
    struct sockaddr:
        pass
    int c_socket "socket"(int domain, int type, int protocol)
    int c_connect "connect"(int fd, const sockaddr* addr, socklen_t addrlen)
    int getsockopt(int fd, int level, int name, void* value, socklen_t* length)
    enum:
        SOCK_STREAM
        SOCK_NONBLOCK
        SOCK_CLOEXEC
        SOL_SOCKET
        SO_ERROR

from libc.stdint cimport uint32_t, uint64_t
from cpython.ref cimport PyObject, Py_INCREF

cdef extern from "Python.h":
    list PyList_New(Py_ssize_t size)
    void _list_set "PyList_SET_ITEM"(list lst, Py_ssize_t i, PyObject* item)  # steals item

cdef extern from "sys/epoll.h":
    ctypedef union epoll_data_t:
        void* ptr
        int fd
        uint32_t u32
        uint64_t u64
    cdef struct epoll_event:
        uint32_t events
        epoll_data_t data
    int epoll_wait(int epfd, epoll_event* events, int maxevents, int timeout)
    int epoll_ctl(int epfd, int op, int fd, epoll_event* event)
    enum:
        EPOLL_CTL_ADD
        EPOLL_CTL_DEL
        EPOLL_CTL_MOD

cdef extern from "errno.h":
    int errno
    int EINTR

cdef extern from "Python.h":
    object PyErr_SetFromErrno(object exc)
    bint PyBytes_CheckExact(object o)
    object PyBytes_FromStringAndSize(const char* v, Py_ssize_t n)
    char* PyBytes_AS_STRING(object o)
    Py_ssize_t PyBytes_GET_SIZE(object o)

import os

cdef object _os_read = os.read
cdef object _os_write = os.write


# What a read lands in before the bytes object of its size is made from it: os.read makes one
# of the size asked for (rawtransport asks 64 KiB) and shrinks it, a malloc and a realloc a
# read (~0.3k instructions more, bench.profiles.realsock) where most reads are a few hundred
# bytes.
cdef enum:
    _BUF = 65536
cdef char _buf[_BUF]


def read(int fd, Py_ssize_t size):
    """os.read(fd, size) for a non-blocking socket."""
    cdef ssize_t n
    if size < 0 or size > _BUF:
        return _os_read(fd, size)
    n = c_read(fd, _buf, size)
    if n < 0:
        return PyErr_SetFromErrno(OSError)
    return PyBytes_FromStringAndSize(_buf, n)


def write(int fd, data):
    """os.write(fd, data) for a non-blocking socket, or for the worker's log (jsonlog.use_writer):
    a write that waits holds the GIL, which only the loop's own thread wants."""
    cdef ssize_t n
    if not PyBytes_CheckExact(data):
        return _os_write(fd, data)
    n = c_write(fd, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
    if n < 0:
        return PyErr_SetFromErrno(OSError)
    return n


# The events one ready() takes (rawtransport.BATCH asks 256): level-triggered, the rest come on
# the next call.
cdef enum:
    _EVENTS = 256
cdef epoll_event _events[_EVENTS]


def ready(int epfd, int maxevents):
    """select.epoll(...).poll(0, maxevents) on the epoll set `epfd`, whose sockets were
    registered by select.epoll (it stores the fd in the event's data, as read back here)."""
    cdef int n, i
    if maxevents < 1 or maxevents > _EVENTS:
        raise ValueError(f"maxevents must be 1 to {_EVENTS}")
    while True:
        n = epoll_wait(epfd, _events, maxevents, 0)
        if n >= 0:
            break
        if errno != EINTR:
            return PyErr_SetFromErrno(OSError)
    # made at its size: a comprehension starts empty and grows it (one allocation more)
    out = PyList_New(n)
    for i in range(n):
        item = (_events[i].data.fd, _events[i].events)
        Py_INCREF(item)
        _list_set(out, i, <PyObject*>item)
    return out


ADD = EPOLL_CTL_ADD
MODIFY = EPOLL_CTL_MOD
REMOVE = EPOLL_CTL_DEL


def ctl(int epfd, int op, int fd, unsigned int events):
    """epoll_ctl(2): `op` ADD, MODIFY or REMOVE `fd` with `events` in the set `epfd`, as
    select.epoll's register, modify and unregister do (OSError of the errno's class)."""
    cdef epoll_event ev
    ev.events = events
    ev.data.u64 = 0
    ev.data.fd = fd
    if epoll_ctl(epfd, op, fd, &ev) < 0:
        PyErr_SetFromErrno(OSError)


def stream_socket(int family):
    """socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC): the fd (OSError)."""
    cdef int fd = c_socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
    if fd < 0:
        return PyErr_SetFromErrno(OSError)
    return fd


def connect(int fd, address):
    """connect(2) of the socket `fd` to `address`, a struct sockaddr as bytes (`sockaddr`):
    0 when connected, else the errno (EINPROGRESS, EAGAIN, ECONNREFUSED...)."""
    if not PyBytes_CheckExact(address):
        raise TypeError("address must be bytes (sockaddr)")
    if c_connect(fd, <const sockaddr*>PyBytes_AS_STRING(address),
                 <socklen_t>PyBytes_GET_SIZE(address)) < 0:
        return errno
    return 0


def close(int fd):
    """close(2); OSError for EBADF (a bug: an fd closed twice). EINTR is not an error here:
    Linux has released the fd by then."""
    if c_close(fd) < 0 and errno != EINTR:
        PyErr_SetFromErrno(OSError)


def pending_error(int fd):
    """getsockopt(fd, SOL_SOCKET, SO_ERROR): how a connect in progress ended (0: connected)."""
    cdef int value = 0
    cdef socklen_t length = sizeof(value)
    if getsockopt(fd, SOL_SOCKET, SO_ERROR, &value, &length) < 0:
        PyErr_SetFromErrno(OSError)
    return value
