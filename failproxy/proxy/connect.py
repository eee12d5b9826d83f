"""The connect that sees EAGAIN.

A raw non-blocking `socket.connect()`: asyncio's `sock_connect()` reports a full AF_UNIX backlog
as *success* (the error only shows at the first write, CPython gh-117208), so it would hide
exactly the failure failproxy exists to act on. A UNIX connect answers at once; a TCP connect
in progress is waited for with a writer callback and a deadline.

The socket is a bare fd from birth to close (rawtransport.SocketTransport owns it once
connected): in the compiled build socket(2) and connect(2) are `_sockio`'s, the address packed
once per peer (routing.peer.pack_sockaddr) and the errno returned, not raised. The pure twins
below do the same through a `socket.socket` they let go of.
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import socket
from collections.abc import Callable
from typing import Final

from failproxy.proxy.rawtransport import SOCKIO, close_fd
from failproxy.routing.peer import Peer

_STREAM_NONBLOCK: Final = socket.SOCK_STREAM | socket.SOCK_NONBLOCK


def _new_socket(family: int) -> int:
    """The pure twin of `_sockio.stream_socket`: a socket object's fd, the object let go."""
    return _socket.socket(family, _STREAM_NONBLOCK).detach()


def _pending(fd: int) -> int:
    """getsockopt(SO_ERROR), the pure twin of `_sockio.pending_error`."""
    sock = _socket.socket(fileno=fd)
    try:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    finally:
        sock.detach()


# Called on the hot path, so held as module constants: in the compiled build a Final is a C
# static, where a from-import or a module attribute is a dict lookup per call (~150-300
# instructions each, bench.profiles.realsock).
_stream_socket: Final[Callable[[int], int]] = (
    _new_socket if SOCKIO is None else SOCKIO.stream_socket)
_connect: Final[Callable[[int, bytes], int] | None] = None if SOCKIO is None else SOCKIO.connect
_pending_error: Final[Callable[[int], int]] = (
    _pending if SOCKIO is None else SOCKIO.pending_error)


def _connect_to(fd: int, peer: Peer) -> int:
    """connect(2) of the socket `fd` to `peer`: 0 when connected, else the errno."""
    connect = _connect
    if connect is not None:
        return connect(fd, peer.packed)
    sock = _socket.socket(peer.family, _STREAM_NONBLOCK, 0, fd)  # the pure twin
    try:
        sock.connect(peer.sockaddr)
    except OSError as exc:
        return exc.errno or errno.EIO
    finally:
        sock.detach()
    return 0


def start_connect(peer: Peer) -> tuple[int, int]:
    """Begin a connect without blocking, on a socket's bare fd (the transport takes it).

    Returns (fd, 0) when connected (UNIX connects complete at once), (fd, EINPROGRESS) for a
    TCP connect under way, (-1, errno) when it failed: EAGAIN is a full UNIX backlog.
    """
    fd = peer.spare
    if fd >= 0:
        peer.spare = -1
    else:
        # Non-blocking from birth: no extra ioctl() per connection.
        fd = _stream_socket(peer.family)
    err = _connect_to(fd, peer)
    if not err:
        return fd, 0
    if err == errno.EINPROGRESS and not peer.is_unix:
        return fd, errno.EINPROGRESS
    _discard(peer, fd)
    return -1, err


def _discard(peer: Peer, fd: int) -> None:
    """A UNIX socket whose connect failed is still unconnected: keep it for the next attempt.
    On an overloaded box that saves a socket() and a close() per request (~6 us here)."""
    if peer.is_unix and peer.spare < 0:
        peer.spare = fd
    else:
        close_fd(fd)


def when_connected(
    loop: asyncio.AbstractEventLoop,
    fd: int,
    timeout: float,
    callback: Callable[[int], None],
) -> None:
    """Call `callback(errno)` once a TCP connect in progress ends: 0 on success, ETIMEDOUT
    after `timeout` (a dead peer, or a full listen backlog, drops the SYN and never answers)."""
    timer: list[asyncio.TimerHandle] = []

    def finish(err: int) -> None:
        loop.remove_writer(fd)
        if timer:
            timer[0].cancel()
        callback(err)

    def writable() -> None:
        finish(_pending_error(fd))

    loop.add_writer(fd, writable)
    if timeout > 0:
        timer.append(loop.call_later(timeout, finish, errno.ETIMEDOUT))
