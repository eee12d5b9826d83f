"""rawtransport.SocketTransport on real sockets: what an upstream connection relies on.

Bytes in order however much the kernel takes at a time, pause_writing / resume_writing around
a full socket buffer, close() only after the buffer is written, abort() at once, EOF and errors
ending in exactly one connection_lost, on a later loop turn.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import socket
from collections.abc import Iterator

import pytest
import uvloop

from failproxy.proxy.rawtransport import HIGH, SocketTransport


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
def no_gc() -> Iterator[None]:
    """No garbage collection while the test runs: a collection may close a socket an earlier
    test left unreferenced (freeing a lower descriptor number than the one a test expects back)
    and costs CPU time a test counts as the loop's."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = uvloop.new_event_loop()
    yield lp
    lp.close()


def _pair() -> tuple[int, socket.socket]:
    """Our end as the bare fd a transport owns (as connect.py gives it), and the peer's."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    return ours.detach(), theirs


def _is_closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        return exc.errno == errno.EBADF
    return False


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
    assert _is_closed(ours), "the transport closed the socket"
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


def test_a_paused_socket_whose_peer_closed_does_not_spin_the_loop(loop, no_gc) -> None:
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


def test_a_socket_closed_inside_the_batch_lends_its_number_to_the_next_without_harm(
        loop, no_gc) -> None:
    """One readable batch holds events for two sockets; the first one's data makes the protocol
    close the second and open a third, which gets the second's fd number. The second's event,
    still in the batch, must not reach the third as data (its read says EAGAIN) nor end it."""
    a_ours, a_theirs = _pair()
    b_ours, b_theirs = _pair()
    b_fd = b_ours
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


def _epoll_targets(loop: asyncio.AbstractEventLoop) -> dict[int, int]:
    """The fds in the loop's epoll set and the events each waits for, as the kernel says
    (/proc/self/fdinfo of the set's fd)."""
    from failproxy.proxy import rawtransport

    epfd = rawtransport.poller(loop)._ep.fileno()
    targets: dict[int, int] = {}
    with open(f"/proc/self/fdinfo/{epfd}") as info:
        for line in info:
            if line.startswith("tfd:"):
                fields = line.split()
                targets[int(fields[1])] = int(fields[3], 16)
    return targets


def test_a_closed_socket_leaves_the_set_by_its_close_alone(loop, no_gc) -> None:
    """close() with nothing buffered makes no EPOLL_CTL_DEL: closing the fd takes it out of the
    set (the kernel's list says so), and the fd's number is free for the next socket."""
    ours, theirs = _pair()
    fd = ours
    proto = Recorder()
    tr = SocketTransport(loop, ours, proto)
    assert fd in _epoll_targets(loop)
    tr.close()
    assert fd not in _epoll_targets(loop)
    _turns(loop)
    assert proto.calls == ["lost"]
    again, peer = _pair()
    assert again == fd  # the lowest free number: the closed one's
    rec = Recorder()
    SocketTransport(loop, again, rec)  # registers without EEXIST
    peer.sendall(b"hello")
    _turns(loop)
    assert rec.data == b"hello"
    for s in (theirs, peer):
        s.close()


def test_a_half_closed_socket_stops_reading_and_still_writes(loop, no_gc) -> None:
    """eof_received returning True keeps the socket open for writing: it leaves reading (so an
    EOF, readable for ever, cannot spin the level-triggered set) and a write still arrives."""
    import select
    import time

    ours, theirs = _pair()
    fd = ours
    proto = Recorder()
    proto.keep_open = True
    tr = SocketTransport(loop, ours, proto)
    theirs.shutdown(socket.SHUT_WR)
    _turns(loop)
    assert proto.calls == ["eof"]
    assert not _epoll_targets(loop).get(fd, 0) & select.EPOLLIN
    cpu = time.process_time()
    loop.run_until_complete(asyncio.sleep(0.2))
    assert time.process_time() - cpu < 0.07, "the loop spun on a half-closed socket"
    tr.write(b"answer")
    assert theirs.recv(100) == b"answer"
    tr.close()
    _turns(loop)
    assert proto.calls == ["eof", "lost"] and fd not in _epoll_targets(loop)
    theirs.close()


CLOSE_SCRIPT = """
import asyncio, socket, sys, uvloop
from failproxy.proxy.rawtransport import SocketTransport
class P:
    def data_received(self, d): pass
    def eof_received(self): return None
    def connection_lost(self, e): pass
    def pause_writing(self): pass
    def resume_writing(self): pass
loop = uvloop.new_event_loop()
pairs = [socket.socketpair() for _ in range(20)]
for ours, _ in pairs:
    ours.setblocking(False)
    SocketTransport(loop, ours.detach(), P()).close()
loop.run_until_complete(asyncio.sleep(0.01))
print("done", flush=True)
"""


def test_closing_makes_no_epoll_del_syscall(tmp_path) -> None:
    """The syscall itself, counted by strace in a child: 20 sockets watched and closed make
    epoll ADDs, and no EPOLL_CTL_DEL (nginx saves the same one)."""
    import collections
    import os
    import re
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    if shutil.which("strace") is None:
        pytest.fail("strace is not installed (Debian package strace; `make test` installs it)")
    out = tmp_path / "trace"
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run(
        ["strace", "-f", "-e", "trace=epoll_ctl", "-o", str(out), sys.executable, "-c",
         CLOSE_SCRIPT], capture_output=True, text=True, timeout=60, cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)})
    assert run.returncode == 0 and "done" in run.stdout, run.stderr
    calls = re.findall(r"epoll_ctl\((\d+), (EPOLL_CTL_\w+), (\d+)", out.read_text())
    adds = collections.Counter(epfd for epfd, op, _ in calls if op == "EPOLL_CTL_ADD")
    ours = [epfd for epfd, n in adds.items() if n >= 20]  # the poller's set: one ADD a socket
    assert len(ours) == 1, calls
    assert [c for c in calls if c[0] == ours[0] and c[1] != "EPOLL_CTL_ADD"] == []


def test_end_now_closes_at_once_and_tells_the_protocol_nothing(loop, no_gc) -> None:
    """The end a protocol does itself (upstream.UpstreamConnection with no exchange left):
    the fd closed and out of the set in the call, no connection_lost ever; refused, with nothing
    changed, while bytes wait to be written."""
    ours, theirs = _pair()
    proto = Recorder()
    tr = SocketTransport(loop, ours, proto)
    assert ours in _epoll_targets(loop)
    assert tr.end_now()
    assert _is_closed(ours) and ours not in _epoll_targets(loop)
    assert not tr.end_now(), "once"
    tr.close()
    tr.abort()
    _turns(loop)
    assert proto.calls == [] and proto.lost == []
    assert theirs.recv(10) == b""
    theirs.close()
    busy, peer = _pair()
    proto = Recorder()
    tr = SocketTransport(loop, busy, proto)
    tr.write(b"x" * (4 << 20))  # more than the socket takes: some is buffered
    assert not tr.end_now() and not _is_closed(busy)
    tr.abort()
    _turns(loop)
    assert proto.calls[-1] == "lost"
    peer.close()


def test_an_ended_transport_reopened_serves_its_new_socket_as_a_new_one(loop, no_gc) -> None:
    """upstream.open_connection reuses an ended transport: refused while it is live; made new,
    it reads, writes and ends on its new socket for its new protocol, the old one told nothing
    more."""
    first, old_peer = _pair()
    old = Recorder()
    tr = SocketTransport(loop, first, old)
    second, peer = _pair()
    with pytest.raises(RuntimeError):
        tr.reopen(loop, second, Recorder())
    assert tr.end_now() and _is_closed(first)
    new = Recorder()
    tr.reopen(loop, second, new)
    assert not tr.is_closing() and second in _epoll_targets(loop)
    tr.write(b"ping")
    assert peer.recv(10) == b"ping"
    peer.sendall(b"pong")
    _turns(loop)
    assert new.data == b"pong" and old.data == b"" and old.calls == []
    peer.close()
    _turns(loop)
    assert new.calls == ["eof", "lost"] and old.calls == [] and _is_closed(second)
    old_peer.close()
