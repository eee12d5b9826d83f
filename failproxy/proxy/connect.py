"""The connect that sees EAGAIN.

A raw non-blocking `socket.connect()`: asyncio's `sock_connect()` reports a full AF_UNIX backlog
as *success* (the error only shows at the first write, CPython gh-117208), so it would hide
exactly the failure failproxy exists to act on. A UNIX connect answers at once; a TCP connect
in progress is waited for with a writer callback and a deadline.
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import socket
from collections.abc import Callable
from typing import Final

from failproxy.routing.peer import Peer

# Called on the hot path, so held as module constants: in the compiled build a Final is a C
# static, where a from-import or a module attribute is a dict lookup per call (~150-300
# instructions each, bench.profiles.realsock).
_new_socket: Final = _socket.socket
_STREAM_NONBLOCK: Final = socket.SOCK_STREAM | socket.SOCK_NONBLOCK


def start_connect(peer: Peer) -> tuple[_socket.socket | None, int]:
    """Begin a connect without blocking.

    Returns (sock, 0) when connected (UNIX connects complete at once), (sock, EINPROGRESS) for a
    TCP connect under way, (None, errno) when it failed: EAGAIN is a full UNIX backlog.
    """
    sock = peer.spare
    if sock is not None:
        peer.spare = None
    else:
        # Non-blocking from birth: no extra ioctl() per connection; the C-level socket type:
        # socket.socket's Python-level __init__ and enum properties cost ~2 us per connection.
        sock = _new_socket(peer.family, _STREAM_NONBLOCK)
    try:
        sock.connect(peer.sockaddr)
    except BlockingIOError as exc:
        if exc.errno == errno.EINPROGRESS and not peer.is_unix:
            return sock, errno.EINPROGRESS
        _discard(peer, sock)
        return None, exc.errno or errno.EAGAIN
    except OSError as exc:
        _discard(peer, sock)
        return None, exc.errno or errno.EIO
    return sock, 0


def _discard(peer: Peer, sock: _socket.socket) -> None:
    """A UNIX socket whose connect failed is still unconnected: keep it for the next attempt.
    On an overloaded box that saves a socket() and a close() per request (~6 us here)."""
    if peer.is_unix and peer.spare is None:
        peer.spare = sock
    else:
        sock.close()


def when_connected(
    loop: asyncio.AbstractEventLoop,
    sock: _socket.socket,
    timeout: float,
    callback: Callable[[int], None],
) -> None:
    """Call `callback(errno)` once a TCP connect in progress ends: 0 on success, ETIMEDOUT
    after `timeout` (a dead peer, or a full listen backlog, drops the SYN and never answers)."""
    fd = sock.fileno()
    timer: list[asyncio.TimerHandle] = []

    def finish(err: int) -> None:
        loop.remove_writer(fd)
        if timer:
            timer[0].cancel()
        callback(err)

    def writable() -> None:
        finish(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))

    loop.add_writer(fd, writable)
    if timeout > 0:
        timer.append(loop.call_later(timeout, finish, errno.ETIMEDOUT))
