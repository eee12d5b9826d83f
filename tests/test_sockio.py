"""rawtransport's read(2), write(2) and epoll_wait(2) twins (`os.read`/`os.write`/
`select.epoll.poll`, proxy/_sockio.pyx): the same bytes read and written, the same events, the
same errors, on real non-blocking sockets; and the build that runs uses the twin it says."""

from __future__ import annotations

import errno
import os
import select
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import failproxy
from failproxy.config import UpstreamConfig, loads
from failproxy.proxy import connect, rawtransport
from failproxy.routing.peer import Peer, pack_sockaddr

try:
    from failproxy.proxy import _sockio  # type: ignore[attr-defined]
except ImportError:
    _sockio = None

PURE = failproxy.BUILD.startswith("pure")
TWINS: list[tuple[Callable[[int, int], bytes], Callable[[int, Any], int]]] = [(os.read, os.write)]
if _sockio is not None and not PURE:
    TWINS.append((_sockio.read, _sockio.write))
IDS = ["os", "cython"][: len(TWINS)]


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


def test_the_build_uses_the_twin_it_says() -> None:
    if PURE:
        assert rawtransport.BUILT == "pure"
        assert (rawtransport._read, rawtransport._write) == (os.read, os.write)
        assert rawtransport._ready_now is None  # the Poller calls select.epoll.poll
        assert rawtransport._ctl is None  # ... and its register, modify, unregister
    else:
        assert _sockio is not None and rawtransport.BUILT == "cython"
        assert (rawtransport._read, rawtransport._write) == (_sockio.read, _sockio.write)
        assert rawtransport._ready_now is _sockio.ready
        assert rawtransport._ctl is _sockio.ctl
        assert connect._connect is _sockio.connect and rawtransport.close_fd is _sockio.close


@pytest.mark.skipif(_sockio is None or PURE, reason="the compiled twin is not built")
def test_ready_reports_what_epoll_poll_reports() -> None:
    """The same (fd, events) pairs as select.epoll.poll(0, n) on the same set, at most n of
    them, none when nothing is ready; no wait; bad arguments refused as OSError/ValueError."""
    assert _sockio is not None
    pairs = [socket.socketpair() for _ in range(5)]
    ep = select.epoll()
    epfd = ep.fileno()
    try:
        for a, _ in pairs:
            a.setblocking(False)
            ep.register(a.fileno(), select.EPOLLIN)
        assert _sockio.ready(ep.fileno(), 256) == [] == ep.poll(0, 256)
        for _, b in pairs[:3]:
            b.send(b"x")
        pairs[3][1].close()  # a hang-up: reported whatever the mask
        got = _sockio.ready(ep.fileno(), 256)
        assert sorted(got) == sorted(ep.poll(0, 256))
        ins = {pairs[i][0].fileno() for i in range(3)}
        assert {fd for fd, ev in got if ev == select.EPOLLIN} == ins
        hup = dict(got)[pairs[3][0].fileno()]
        assert hup & select.EPOLLHUP
        assert len(_sockio.ready(ep.fileno(), 2)) == 2  # level-triggered: the rest stay ready
        for bad in (0, 257):
            with pytest.raises(ValueError):
                _sockio.ready(ep.fileno(), bad)
        with pytest.raises(OSError) as exc:
            _sockio.ready(pairs[4][0].fileno(), 8)  # not an epoll fd
        assert exc.value.errno == errno.EINVAL
    finally:
        ep.close()
        for a, b in pairs:
            a.close()
            b.close()
    with pytest.raises(OSError) as closed:
        _sockio.ready(epfd, 8)  # closed (no other test of this process opens files meanwhile)
    assert closed.value.errno == errno.EBADF


@pytest.mark.parametrize(("read", "write"), TWINS, ids=IDS)
def test_bytes_go_through_whole(pair: Any, read: Any, write: Any) -> None:
    a, b = pair
    with pytest.raises(BlockingIOError):
        read(a.fileno(), 65536)  # nothing yet: EAGAIN
    assert write(b.fileno(), b"hello") == 5
    assert write(b.fileno(), bytearray(b" big")) == 4  # another buffer type
    assert write(b.fileno(), memoryview(b" world")[1:]) == 5
    assert write(b.fileno(), b"") == 0
    assert read(a.fileno(), 3) == b"hel"
    assert read(a.fileno(), 65536) == b"lo bigworld"
    payload = bytes(range(256)) * 300  # more than one read's worth
    sent = write(b.fileno(), payload)
    got = b""
    while len(got) < sent:
        got += read(a.fileno(), 65536)
    assert got == payload[:sent]
    b.shutdown(socket.SHUT_WR)
    assert read(a.fileno(), 65536) == b""  # the end


@pytest.mark.parametrize(("read", "write"), TWINS, ids=IDS)
def test_a_read_larger_than_the_buffer(pair: Any, read: Any, write: Any) -> None:
    a, b = pair
    write(b.fileno(), b"x" * 10)
    assert read(a.fileno(), 200_000) == b"x" * 10


@pytest.mark.parametrize(("read", "write"), TWINS, ids=IDS)
def test_a_full_socket_takes_part_then_raises_eagain(pair: Any, read: Any, write: Any) -> None:
    a, b = pair
    chunk = b"y" * 65536
    total = 0
    with pytest.raises(BlockingIOError):
        for _ in range(10_000):  # bounded: a socket buffer is a few MB at most
            total += write(b.fileno(), chunk)
    assert total > 0
    drained = 0
    while drained < total:
        drained += len(read(a.fileno(), 65536))
    assert drained == total


@pytest.mark.parametrize(("read", "write"), TWINS, ids=IDS)
def test_errors_are_the_errno_s_class(pair: Any, read: Any, write: Any) -> None:
    a, b = pair
    fd = a.fileno()
    a.close()
    with pytest.raises(OSError) as got:
        read(fd, 10)
    assert got.value.errno == errno.EBADF
    with pytest.raises(OSError) as got:
        write(fd, b"x")
    assert got.value.errno == errno.EBADF
    b.close()
    r, w = os.pipe()
    os.close(r)
    try:
        with pytest.raises(BrokenPipeError):
            write(w, b"x")  # the reader is gone: EPIPE (Python ignores SIGPIPE)
    finally:
        os.close(w)


@pytest.mark.skipif(_sockio is None or PURE, reason="the compiled twin is not built")
def test_ctl_registers_modifies_and_removes_as_select_does() -> None:
    """A socket added by ctl is reported by select.epoll.poll with its fd (so the two twins can
    share a set), a modified mask takes effect, a removed fd is no longer reported; the errors
    are select's: EEXIST adding twice, ENOENT removing what is not there, EBADF a closed fd."""
    assert _sockio is not None
    a, b = socket.socketpair()
    ep = select.epoll()
    try:
        fd = a.fileno()
        _sockio.ctl(ep.fileno(), _sockio.ADD, fd, select.EPOLLOUT)
        assert ep.poll(0, 8) == [(fd, select.EPOLLOUT)]
        with pytest.raises(FileExistsError):
            _sockio.ctl(ep.fileno(), _sockio.ADD, fd, select.EPOLLIN)
        _sockio.ctl(ep.fileno(), _sockio.MODIFY, fd, select.EPOLLIN)
        assert ep.poll(0, 8) == []
        b.send(b"x")
        assert _sockio.ready(ep.fileno(), 8) == [(fd, select.EPOLLIN)]
        _sockio.ctl(ep.fileno(), _sockio.REMOVE, fd, 0)
        assert ep.poll(0, 8) == []
        with pytest.raises(FileNotFoundError):
            _sockio.ctl(ep.fileno(), _sockio.REMOVE, fd, 0)
        with pytest.raises(OSError) as exc:
            _sockio.ctl(ep.fileno(), _sockio.ADD, 1_000_000, select.EPOLLIN)
        assert exc.value.errno == errno.EBADF
    finally:
        ep.close()
        a.close()
        b.close()


# -- the new connection's socket(2), connect(2), SO_ERROR and close(2) (connect.py) ----------

def _peer(address: str) -> Peer:
    cfg: UpstreamConfig = loads(f'[[upstream.server]]\naddress = "{address}"\n').upstream
    return Peer(0, cfg.servers[0], cfg)


def _open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        assert exc.errno == errno.EBADF
        return False
    return True


def test_a_packed_address_is_the_struct_the_socket_module_would_pass(tmp_path: Any) -> None:
    """What getsockname/getpeername give back for each family once connected through it."""
    path = str(tmp_path / "s.sock")
    for family, address, sockaddr in (
            (socket.AF_UNIX, path, path),
            (socket.AF_INET, "127.0.0.1:0", ("127.0.0.1", 0)),
            (socket.AF_INET6, "[::1]:0", ("::1", 0))):
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.bind(sockaddr)
        except OSError:
            listener.close()
            assert family == socket.AF_INET6, "no IPv6 loopback here"
            continue
        listener.listen(4)
        bound = listener.getsockname()
        fd = connect._stream_socket(family)
        if family == socket.AF_UNIX:
            err = connect._connect_to(fd, _peer(f"unix:{path}"))
        else:
            peer = _peer(f"{address.rsplit(':', 1)[0]}:{bound[1]}")
            assert peer.packed == pack_sockaddr(family, (bound[0], bound[1]))
            err = connect._connect_to(fd, peer)
        assert err in (0, errno.EINPROGRESS)
        accepted, _ = listener.accept()
        assert accepted.getsockname()[:2] == bound[:2]
        select.select([], [fd], [], 5)
        assert connect._pending_error(fd) == 0
        rawtransport.close_fd(fd)
        assert not _open(fd)
        assert accepted.recv(1) == b"", "the peer sees the close"
        accepted.close()
        listener.close()


def test_start_connect_tells_a_full_backlog_and_a_missing_socket_by_errno(tmp_path: Any) -> None:
    """EAGAIN for a UNIX listener that never accepts and whose backlog is full, ENOENT for no
    socket file, ECONNREFUSED for a closed TCP port; each without an exception, and the UNIX
    socket kept as the peer's spare for the next try (one socket for every refused try)."""
    path = str(tmp_path / "full.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(0)
    peer = _peer(f"unix:{path}")
    held = []
    for _ in range(64):  # fill the backlog: backlog 0 still takes one or two
        fd, err = connect.start_connect(peer)
        if fd < 0:
            break
        held.append(fd)
    assert (fd, err) == (-1, errno.EAGAIN)
    spare = peer.spare
    assert spare >= 0 and _open(spare)
    assert connect.start_connect(peer) == (-1, errno.EAGAIN)
    assert peer.spare == spare, "the same unconnected socket, tried again"
    gone = _peer(f"unix:{tmp_path / 'none.sock'}")
    assert connect.start_connect(gone) == (-1, errno.ENOENT)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    tcp = _peer(f"127.0.0.1:{port}")
    fd, err = connect.start_connect(tcp)
    if err == errno.EINPROGRESS:  # loopback refuses at once, mostly; else it tells by SO_ERROR
        select.select([], [fd], [], 5)
        err = connect._pending_error(fd)
        rawtransport.close_fd(fd)
    else:
        assert fd == -1
    assert err == errno.ECONNREFUSED and tcp.spare == -1
    for fd in held:
        rawtransport.close_fd(fd)
    peer.close_idle()
    assert peer.spare == -1 and not _open(spare)
    listener.close()


@pytest.mark.skipif(_sockio is None or PURE, reason="the compiled twin is not built")
def test_the_compiled_socket_calls_fail_as_the_os_does() -> None:
    assert _sockio is not None
    with pytest.raises(OSError) as bad:
        _sockio.stream_socket(-1)
    assert bad.value.errno == errno.EAFNOSUPPORT
    r, w = os.pipe()
    assert _sockio.connect(r, pack_sockaddr(socket.AF_INET, ("127.0.0.1", 9))) == errno.ENOTSOCK
    with pytest.raises(TypeError):
        _sockio.connect(r, "127.0.0.1")
    with pytest.raises(OSError) as bad:
        _sockio.pending_error(r)
    assert bad.value.errno == errno.ENOTSOCK
    _sockio.close(r)
    _sockio.close(w)
    with pytest.raises(OSError) as bad:
        _sockio.close(r)
    assert bad.value.errno == errno.EBADF
