"""rawtransport.SocketTransport on real sockets: what an upstream connection relies on.

Bytes in order however much the kernel takes at a time, pause_writing / resume_writing around
a full socket buffer, close() only after the buffer is written, abort() at once, EOF and errors
ending in exactly one connection_lost, on a later loop turn.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest
import uvloop

from failproxy.rawtransport import HIGH, SocketTransport


class Recorder:
    """An asyncio-style protocol that writes down every call."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.calls: list[str] = []
        self.lost: list[Exception | None] = []
        self.keep_open = False

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool | None:
        self.calls.append("eof")
        return self.keep_open

    def connection_lost(self, exc: Exception | None) -> None:
        self.calls.append("lost")
        self.lost.append(exc)

    def pause_writing(self) -> None:
        self.calls.append("pause")

    def resume_writing(self) -> None:
        self.calls.append("resume")


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = uvloop.new_event_loop()
    yield lp
    lp.close()


def _pair() -> tuple[socket.socket, socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    return ours, theirs


def _turns(loop: asyncio.AbstractEventLoop, n: int = 5) -> None:
    for _ in range(n):
        loop.run_until_complete(asyncio.sleep(0.001))


def _read_all(loop: asyncio.AbstractEventLoop, theirs: socket.socket, want: int) -> bytes:
    """The peer reads while our loop runs, until `want` bytes or EOF."""
    theirs.setblocking(False)
    got = bytearray()
    for _ in range(20000):
        try:
            chunk = theirs.recv(1 << 20)
        except BlockingIOError:
            _turns(loop, 1)
            continue
        if not chunk:
            break
        got += chunk
        if len(got) >= want:
            break
    return bytes(got)


def test_a_full_socket_buffer_pauses_writing_and_every_byte_arrives_in_order(loop) -> None:
    ours, theirs = _pair()
    proto = Recorder()
    tr = SocketTransport(loop, ours, proto)
    blob = bytes(range(256)) * 16384  # 4 MiB: far more than a socket buffer holds
    tr.write(blob[:1000])
    tr.writelines([blob[1000:2000], blob[2000:]])
    assert tr.get_write_buffer_size() > HIGH and proto.calls == ["pause"]
    tr.write(b"tail")
    tr.close()
    assert not proto.lost, "close() waits for the buffer"
    got = _read_all(loop, theirs, len(blob) + 4)
    assert got == blob + b"tail"
    _turns(loop)
    assert proto.calls == ["pause", "resume", "lost"] and proto.lost == [None]
    assert theirs.recv(10) == b"", "closed after the last byte"
    assert ours.fileno() == -1, "the transport closed the socket"
    theirs.close()


def test_eof_from_the_peer_ends_in_one_connection_lost_on_a_later_turn(loop) -> None:
    ours, theirs = _pair()
    proto = Recorder()
    SocketTransport(loop, ours, proto)
    theirs.sendall(b"HTTP/1.1 200 OK\r\n\r\nbody")
    theirs.close()
    _turns(loop)
    assert bytes(proto.data) == b"HTTP/1.1 200 OK\r\n\r\nbody"
    assert proto.calls == ["eof", "lost"] and proto.lost == [None]


def test_abort_drops_what_is_buffered_and_ends_at_once(loop) -> None:
    ours, theirs = _pair()
    proto = Recorder()
    tr = SocketTransport(loop, ours, proto)
    tr.write(b"x" * (8 << 20))
    assert tr.get_write_buffer_size() > 0
    tr.abort()
    assert tr.is_closing() and tr.get_write_buffer_size() == 0
    tr.write(b"more")  # after the end: nothing, and no error
    _turns(loop)
    assert proto.lost == [None] and proto.calls.count("lost") == 1
    assert len(_read_all(loop, theirs, 16 << 20)) < 8 << 20, "the rest was never sent"
    theirs.close()


def test_a_write_to_a_closed_peer_ends_with_its_error(loop) -> None:
    ours, theirs = _pair()
    proto = Recorder()
    tr = SocketTransport(loop, ours, proto)
    theirs.close()
    tr.write(b"GET / HTTP/1.1\r\n\r\n")
    _turns(loop)
    assert proto.calls[-1] == "lost" and proto.calls.count("lost") == 1
    assert isinstance(proto.lost[0], (BrokenPipeError, ConnectionResetError))


def test_pause_reading_holds_the_bytes_until_resume(loop) -> None:
    ours, theirs = _pair()
    proto = Recorder()
    tr = SocketTransport(loop, ours, proto)
    tr.pause_reading()
    theirs.sendall(b"early")
    _turns(loop)
    assert proto.data == b""
    tr.resume_reading()
    _turns(loop)
    assert proto.data == b"early"
    tr.close()
    _turns(loop)
    assert proto.lost == [None]
    theirs.close()


def test_a_paused_socket_whose_peer_closed_does_not_spin_the_loop(loop) -> None:
    """A UNIX socket whose peer closed reports EPOLLHUP whatever the events asked for, and the
    set is level-triggered: a paused socket must be out of the set, or every loop turn would
    wake for it. 0.3 s of loop turns with it paused cost almost no CPU; resumed, it ends."""
    import time

    ours, theirs = _pair()
    proto = Recorder()
    tr = SocketTransport(loop, ours, proto)
    tr.pause_reading()
    theirs.sendall(b"last words")
    theirs.close()
    cpu = time.process_time()
    loop.run_until_complete(asyncio.sleep(0.3))
    spent = time.process_time() - cpu
    assert spent < 0.1, f"the loop spun on a paused socket: {spent:.3f} s of CPU in 0.3 s"
    assert proto.data == b"" and proto.calls == []
    tr.resume_reading()
    _turns(loop)
    assert proto.data == b"last words" and proto.calls == ["eof", "lost"]


def test_a_socket_closed_inside_the_batch_lends_its_number_to_the_next_without_harm(loop) -> None:
    """One readable batch holds events for two sockets; the first one's data makes the protocol
    close the second and open a third, which gets the second's fd number. The second's event,
    still in the batch, must not reach the third as data (its read says EAGAIN) nor end it."""
    a_ours, a_theirs = _pair()
    b_ours, b_theirs = _pair()
    b_fd = b_ours.fileno()
    made: list[tuple[SocketTransport, Recorder, socket.socket]] = []

    class Closer(Recorder):
        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            tb.abort()  # the second socket's fd is free now ...
            c_ours, c_theirs = _pair()  # ... and the next socket made takes its number
            rec = Recorder()
            made.append((SocketTransport(loop, c_ours, rec), rec, c_theirs))

    a_proto, b_proto = Closer(), Recorder()
    SocketTransport(loop, a_ours, a_proto)
    tb = SocketTransport(loop, b_ours, b_proto)
    a_theirs.sendall(b"for a")  # epoll's ready list is in the order the sockets became ready
    b_theirs.sendall(b"for b")
    _turns(loop)
    assert a_proto.data == b"for a"
    assert b_proto.data == b"", "the second socket was read before the first closed it"
    (tc, c_proto, c_theirs) = made[0]
    assert tc._fd == b_fd, "the test needs the number reused"
    assert c_proto.data == b"" and c_proto.calls == [], "the old event reached the new socket"
    c_theirs.sendall(b"for c")
    _turns(loop)
    assert c_proto.data == b"for c"
    for s in (a_theirs, b_theirs, c_theirs):
        s.close()
