"""A transport over a connected non-blocking socket, driven by the loop's add_reader/add_writer.

Why not uvloop's own: `loop.create_unix_connection(sock=...)` is a coroutine, so every upstream
connection cost a Task, a Future, a weak-value registry entry and the Python-level `socket.socket`
checks uvloop makes on the way: ~13 us of Python per connection, measured against this class
on the same unicorn socket (a new connection per request is what every unicorn user runs:
unicorn closes each one). The protocol side is the asyncio one (data_received, eof_received,
connection_lost, pause_writing, resume_writing), so nothing above this module changes.

The semantics follow asyncio's selector transport: a write goes to the socket at once and only
what the kernel did not take is buffered (pause_writing past HIGH, resume_writing under LOW);
close() ends after the buffer is flushed, abort() at once; connection_lost comes on a later
loop turn, never from inside a call the protocol made.
"""

from __future__ import annotations

import _socket
import asyncio
from typing import Protocol

HIGH = 64 * 1024  # write buffer: pause_writing above this (uvloop's default) ...
LOW = 16 * 1024  # ... resume_writing once it drained below this
READ_SIZE = 65536  # one recv() per readable event (under glibc's mmap threshold)


class StreamProtocol(Protocol):
    """What the transport calls: asyncio's protocol methods (upstream.UpstreamConnection has
    them; a typing.Protocol, so a test's own protocol fits the compiled build too)."""

    def data_received(self, data: bytes) -> None: ...

    def eof_received(self) -> bool | None: ...

    def connection_lost(self, exc: Exception | None) -> None: ...

    def pause_writing(self) -> None: ...

    def resume_writing(self) -> None: ...


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


class SocketTransport:
    """One connected socket; the protocol gets its bytes and its end (see the module doc)."""

    __slots__ = ("_buffer", "_buffered", "_closing", "_fd", "_loop", "_lost", "_protocol",
                 "_reading", "_sock", "_write_paused", "_writing")

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: _socket.socket,
                 protocol: StreamProtocol) -> None:
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._protocol = protocol
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._closing = False
        self._lost = False
        self._write_paused = False
        self._reading = True
        self._writing = False  # a writer callback is registered (something is buffered)
        loop.add_reader(self._fd, self._read_ready)

    # -- reading ------------------------------------------------------------------------------

    def _read_ready(self) -> None:
        try:
            data = self._sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fatal(exc)
            return
        if data:
            self._protocol.data_received(data)
            return
        self._stop_reading()
        if not self._protocol.eof_received():
            self.close()

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def pause_reading(self) -> None:
        if not self._closing:
            self._stop_reading()

    def resume_reading(self) -> None:
        if not self._closing and not self._reading:
            self._reading = True
            self._loop.add_reader(self._fd, self._read_ready)

    # -- writing ------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self._closing or not data:
            return
        if not self._buffer:
            try:
                sent = self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._fatal(exc)
                return
            if sent == len(data):
                return
            data = data[sent:]
            self._writing = True
            self._loop.add_writer(self._fd, self._write_ready)
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
        data = b"".join(self._buffer)
        try:
            sent = self._sock.send(data)
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
            self._loop.remove_writer(self._fd)
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
        self._stop_reading()
        if not self._buffer:
            self._end(None)

    def abort(self) -> None:
        """End at once, dropping anything not written."""
        self._closing = True
        self._stop_reading()
        self._end(None)

    def _fatal(self, exc: OSError) -> None:
        self._closing = True
        self._stop_reading()
        self._end(exc)

    def _end(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._buffer = []
        self._buffered = 0
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self._fd)
        self._sock.close()  # not watched any more: the fd may go
        self._loop.call_soon(self._protocol.connection_lost, exc)
