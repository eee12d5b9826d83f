"""A transport over a connected non-blocking socket, watched by one epoll set per loop.

Why not uvloop's own: `loop.create_unix_connection(sock=...)` is a coroutine, so every upstream
connection cost a Task, a Future, a weak-value registry entry and the Python-level `socket.socket`
checks uvloop makes on the way: ~13 us of Python per connection, measured against this class
on the same unicorn socket (a new connection per request is what every unicorn user runs:
unicorn closes each one). The protocol side is the asyncio one (data_received, eof_received,
connection_lost, pause_writing, resume_writing), so nothing above this module changes.

The semantics follow asyncio's selector transport: a write goes to the socket at once and only
what the kernel did not take is buffered (pause_writing past HIGH, resume_writing under LOW);
close() ends after the buffer is flushed, abort() at once; connection_lost comes on a later
loop turn, never from inside a call the protocol made. `end_now()` is the one exception: it
tells the protocol nothing, as the protocol that calls it ends itself.

The sockets are watched by one epoll set per loop (`Poller`), which the loop watches as one fd,
not by `loop.add_reader` per socket: uvloop's add_reader costs ~14k instructions (a Python-level
`WeakValueDictionary` lookup that raises KeyError, a new poll handle) and libuv makes 7 syscalls
per socket around it (an epoll ADD and DEL to probe the fd, FIONBIO, three DELs on close, an
io_uring submission), where this makes one epoll ADD, and the close takes the socket out of
the set (counted by bench.profiles.realsock and strace -c). Level-triggered, as the loop's own; a
socket that wants no event is not in the set at all (a UNIX socket whose peer closed reports
EPOLLHUP whatever the mask).

One wake-up of the Poller reads every upstream socket that has bytes, one after another, and most
of what it reads is an answer on its way to a client. `Poller.batching` says a batch runs, and
`after_batch` runs work once it has: the client side holds its writes to then (downstream.py),
so a batch's answers leave together and each client reader is woken once for them.
"""

from __future__ import annotations

import asyncio
import os
import select
from collections.abc import Callable
from types import ModuleType
from typing import Final, Protocol, cast

from mypy_extensions import trait

from failproxy.telemetry import turnend


def _compiled() -> ModuleType | None:
    """`_sockio.pyx` where it was built and the build runs compiled, else None: its read(2),
    write(2), epoll_wait(2) and epoll_ctl(2) keep the GIL (these sockets and this set never
    block). Without it: `os.read`, `os.write`, and the Poller calls its epoll object."""
    try:
        from failproxy.proxy import _sockio  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _sockio  # type: ignore[no-any-return]


# Called on the hot path, so held as module constants: in the compiled build a Final is a C
# static, where a from-import or a module attribute is a dict lookup per call (~150-300
# instructions each, bench.profiles.realsock).
_C: Final = _compiled()
SOCKIO: Final = _C  # for connect.py: its socket(2), connect(2) and SO_ERROR, None if pure
_read: Final[Callable[[int, int], bytes]] = os.read if _C is None else _C.read
_write: Final[Callable[[int, bytes], int]] = os.write if _C is None else _C.write
# None in the pure build, where the Poller calls its epoll object's poll and register/modify/
# unregister instead.
_ready_now: Final[Callable[[int, int], list[tuple[int, int]]] | None] = (
    None if _C is None else _C.ready)
_ctl: Final[Callable[[int, int, int, int], None] | None] = None if _C is None else _C.ctl
_ADD: Final[int] = 0 if _C is None else _C.ADD
_MODIFY: Final[int] = 0 if _C is None else _C.MODIFY
_REMOVE: Final[int] = 0 if _C is None else _C.REMOVE
BUILT: Final = "pure" if _C is None else "cython"
close_fd: Final[Callable[[int], None]] = os.close if _C is None else _C.close

HIGH: Final = 64 * 1024  # write buffer: pause_writing above this (uvloop's default) ...
LOW: Final = 16 * 1024  # ... resume_writing once it drained below this
IN: Final = select.EPOLLIN
OUT: Final = select.EPOLLOUT
GONE: Final = select.EPOLLERR | select.EPOLLHUP  # reported whatever the mask: to both sides
BATCH: Final = 256  # events taken per loop wake-up (level-triggered: the rest come next)
READ_SIZE: Final = 65536  # one read() per readable event (under glibc's mmap threshold)
# os.read/os.write, not sock.recv/send: the same syscalls, but argument clinic instead of
# PyArg_ParseTuple (~0.5k instructions a call, counted by bench.profiles.realsock)


class StreamProtocol(Protocol):
    """What the transport calls: asyncio's protocol methods (upstream.UpstreamConnection has
    them; a typing.Protocol, so a test's own protocol fits the compiled build too)."""

    def data_received(self, data: bytes) -> None: ...

    def eof_received(self) -> bool | None: ...

    def connection_lost(self, exc: Exception | None) -> None: ...

    def pause_writing(self) -> None: ...

    def resume_writing(self) -> None: ...


@trait
class Receiver:
    """A StreamProtocol the compiled transport calls directly (upstream.UpstreamConnection):
    through the Protocol, `data_received` is a method call by name (~350 instructions a read,
    bench.profiles.lockstep). Any other StreamProtocol (a test's) is called by name."""

    def data_received(self, data: bytes) -> None:
        raise NotImplementedError


class Transport(Protocol):
    """What the upstream side uses of a transport: SocketTransport, or a test's fake one (a
    typing.Protocol, so compiled code accepts any object that has these)."""

    def write(self, data: bytes) -> None: ...

    def writelines(self, data: list[bytes]) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def is_closing(self) -> bool: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


class _Ended:
    """The protocol of an ended transport: nothing reaches it (every path checks _closing or
    _lost first); it stands in so the real one is not kept alive by a reference cycle."""

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        pass

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass


_ENDED: Final = _Ended()


@trait
class BatchEnd:
    """What waits for the end of a Poller batch (downstream.ClientConnection). A trait, not a
    callable: the compiled Poller calls it through its vtable, where a bound method kept per
    connection costs a Python-level call per batch (~100 instructions, bench.profiles.realsock)."""

    def batch_ended(self) -> None:
        """The batch is over. Handles its own errors: one failing must not leave the others."""
        raise NotImplementedError


class Poller:
    """The epoll set of one loop's upstream sockets, watched by the loop as one fd."""

    __slots__ = ("_after", "_ep", "_epfd", "_loop", "_nafter", "_turn", "_watched", "batching")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._turn = turnend.of(loop)  # held for each batch: its writers flush at its end
        self._ep = select.epoll()  # close-on-exec
        self._epfd = self._ep.fileno()
        # The transport of each fd in the set, at the fd's index (None where none): fds are the
        # lowest free numbers, so the list stays short, and reading, setting and clearing an
        # index are native list operations, where a dict's took ~0.2k instructions each
        # (boxing, hashing, probing; bench.profiles.lockstep).
        self._watched: list[SocketTransport | None] = []
        # Those waiting for the batch's end: the first `_nafter` entries (kept: turnend.put()).
        self._after: list[BatchEnd | None] = []
        self._nafter = 0
        self.batching = False  # inside _ready: after_batch() work waits for its end
        loop.add_reader(self._ep.fileno(), self._ready)

    def after_batch(self, waiter: BatchEnd) -> None:
        """Call `waiter.batch_ended()` when the batch under way ends (only while `batching`)."""
        n = self._nafter
        turnend.put(self._after, n, waiter)
        self._nafter = n + 1

    def end_batch(self) -> None:
        """The batch is over: tell those waiting for its end (in the order they asked), then
        the turn end's writers (logs and counters follow the answers out, as before)."""
        self.batching = False
        after = self._after
        try:
            i = 0
            while i < self._nafter:
                waiter = after[i]
                after[i] = None
                i += 1
                if waiter is None:
                    continue
                try:
                    waiter.batch_ended()
                except Exception as exc:  # one waiter's failure must not keep the others waiting
                    self._loop.call_exception_handler(
                        {"message": "failproxy: batch end failed", "exception": exc})
        finally:
            self._nafter = 0
            self._turn.release()

    def set(self, fd: int, transport: SocketTransport, old: int, new: int) -> None:
        """The events `transport` waits for on `fd` go from `old` to `new` (0: none)."""
        ctl = _ctl
        if not old:
            if ctl is None:
                self._ep.register(fd, new)
            else:
                ctl(self._epfd, _ADD, fd, new)
            watched = self._watched
            if fd >= len(watched):
                watched.extend([None] * (fd + 1 - len(watched)))
            watched[fd] = transport
        elif not new:
            self._watched[fd] = None
            if ctl is None:
                self._ep.unregister(fd)
            else:
                ctl(self._epfd, _REMOVE, fd, 0)
        elif ctl is None:
            self._ep.modify(fd, new)
        else:
            ctl(self._epfd, _MODIFY, fd, new)

    def forget(self, fd: int) -> None:
        """`fd` is about to be closed: closing it takes it out of the epoll set (the socket is
        this worker's alone, never dup'ed), so only the map is updated. That saves the
        EPOLL_CTL_DEL syscall per connection, as nginx does."""
        watched = self._watched
        if fd < len(watched):
            watched[fd] = None

    def _ready(self) -> None:
        watched = self._watched
        self.batching = True
        self._turn.hold()
        try:
            ep = self._ep
            ready = ep.poll(0, BATCH) if _ready_now is None else _ready_now(self._epfd, BATCH)
            for fd, events in ready:
                # Looked up now, not when polled: a callback of this batch may have closed the
                # fd and another socket taken its number (a spurious event; its read or write
                # says EAGAIN).
                t = watched[fd] if fd < len(watched) else None
                if t is None:
                    continue
                if events & (IN | GONE) and t._reading:
                    t._read_ready()
                if events & (OUT | GONE) and t._writing:
                    t._write_ready()
        finally:
            self.end_batch()

    def close(self) -> None:
        if not self._loop.is_closed():
            self._loop.remove_reader(self._ep.fileno())
        self._ep.close()


_POLLERS: Final[dict[asyncio.AbstractEventLoop, Poller]] = {}


def poller(loop: asyncio.AbstractEventLoop) -> Poller:
    """The loop's Poller, made on first use (a worker has one loop; tests make many: the sets
    of closed loops are closed here)."""
    p = _POLLERS.get(loop)
    if p is None:
        for old in [lp for lp in _POLLERS if lp.is_closed()]:
            _POLLERS.pop(old).close()
        p = _POLLERS[loop] = Poller(loop)
    return p


class SocketTransport:
    """One connected socket; the protocol gets its bytes and its end (see the module doc)."""

    __slots__ = ("_buffer", "_buffered", "_closing", "_fd", "_loop", "_lost", "_mask",
                 "_poller", "_protocol", "_reading", "_write_paused", "_writing")

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int,
                 protocol: StreamProtocol) -> None:
        """`fd`: a connected non-blocking socket's; this transport owns it (and closes it)."""
        self._setup(loop, fd, protocol)

    def reopen(self, loop: asyncio.AbstractEventLoop, fd: int, protocol: StreamProtocol) -> None:
        """An ended transport made new for another socket (upstream.py reuses one that nothing
        else holds): the same state as a new one, from the same code."""
        if not self._lost:
            raise RuntimeError("reopen of a transport that has not ended")
        self._setup(loop, fd, protocol, self._poller if self._loop is loop else None)

    def _setup(self, loop: asyncio.AbstractEventLoop, fd: int, protocol: StreamProtocol,
               known: Poller | None = None) -> None:
        """`known`: the loop's Poller, when the caller has it (a reopen on the same loop)."""
        self._loop = loop
        self._fd = fd
        self._protocol = protocol
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._closing = False
        self._lost = False
        self._write_paused = False
        self._reading = True
        self._writing = False  # something is buffered: wait until the socket takes more
        self._mask = 0  # the events the poller watches for: IN if _reading, OUT if _writing
        self._poller = poller(loop) if known is None else known
        self._watch()

    def _watch(self) -> None:
        """The one place the poller learns what this socket waits for (until `_end`, which
        only tells it to forget the fd)."""
        mask = (IN if self._reading else 0) | (OUT if self._writing else 0)
        if mask != self._mask:
            self._poller.set(self._fd, self, self._mask, mask)
            self._mask = mask

    # -- reading ------------------------------------------------------------------------------

    def _read_ready(self) -> None:
        if self._lost:
            return
        try:
            data = _read(self._fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fatal(exc)
            return
        if data:
            protocol = self._protocol
            if isinstance(protocol, Receiver):
                # cast: narrowed, mypy's type is an intersection the compiled build calls by name
                cast(Receiver, protocol).data_received(data)
            else:
                protocol.data_received(data)
            return
        self._reading = False  # the set still says IN until _watch or _end below
        if self._protocol.eof_received():
            self._watch()  # half-closed: stays open for writing
        else:
            self.close()

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._watch()

    def pause_reading(self) -> None:
        if not self._closing:
            self._stop_reading()

    def resume_reading(self) -> None:
        if not self._closing and not self._reading:
            self._reading = True
            self._watch()

    # -- writing ------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self._closing or not data:
            return
        if not self._buffer:
            try:
                sent = _write(self._fd, data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._fatal(exc)
                return
            if sent == len(data):
                return
            data = data[sent:]
            self._writing = True
            self._watch()
        self._buffer.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH and not self._write_paused:
            self._write_paused = True
            self._protocol.pause_writing()

    def writelines(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    def get_write_buffer_size(self) -> int:
        return self._buffered

    def _write_ready(self) -> None:
        if self._lost:
            return
        data = b"".join(self._buffer)
        try:
            sent = _write(self._fd, data)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fatal(exc)
            return
        rest = data[sent:]
        self._buffer = [rest] if rest else []
        self._buffered = len(rest)
        if self._write_paused and self._buffered <= LOW:
            self._write_paused = False
            self._protocol.resume_writing()
        if not self._buffer and self._writing:  # resume_writing may have written or ended
            self._writing = False
            self._watch()
            if self._closing:
                self._end(None)

    # -- the end ------------------------------------------------------------------------------

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Stop reading; the connection ends once what is buffered is written."""
        if self._closing:
            return
        self._closing = True
        if not self._buffer:
            self._end(None)  # nothing to write: straight to the end, no epoll change first
            return
        self._reading = False  # (not _stop_reading: after an EOF the flag is off, the set not)
        self._watch()

    def end_now(self) -> bool:
        """Close at once, the protocol not told, if nothing is left to write: for a protocol
        that does its own end (upstream.UpstreamConnection, when no exchange waits to hear of
        it). A `connection_lost` put off to the next loop iteration costs a uvloop Handle and a
        call with an argument tuple (~2.5k instructions, per connection behind unicorn).
        Returns False, having done nothing, when the end must wait: `close()` then."""
        if self._closing or self._buffer:
            return False
        self._closing = True
        self._release()
        return True

    def abort(self) -> None:
        """End at once, dropping anything not written."""
        self._closing = True
        self._stop_reading()
        self._end(None)

    def fail(self, exc: OSError) -> None:
        """End as a read that failed with `exc` ends it: for a socket whose failed read someone
        else made before this transport was made of it (the C core's, Exchange.adopt)."""
        self._fatal(exc)

    def _fatal(self, exc: OSError) -> None:
        self._closing = True
        self._stop_reading()
        self._end(exc)

    def _end(self, exc: Exception | None) -> None:
        if self._lost:
            return
        protocol = self._protocol
        self._release()
        self._loop.call_soon(protocol.connection_lost, exc)

    def _release(self) -> None:
        """The socket closed and let go of, the protocol too (no cycle: its `transport` is
        this); the one place either happens."""
        self._lost = True
        self._buffer = []
        self._buffered = 0
        self._reading = self._writing = False
        if self._mask:
            self._poller.forget(self._fd)  # the close below takes it out of the set
            self._mask = 0
        close_fd(self._fd)
        self._protocol = _ENDED
