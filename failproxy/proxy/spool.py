"""Bodies held by failproxy itself: memory buffers first, then an unlinked temp file (nginx's
`client_body_temp` and `proxy_temp`), so a slow client holds a proxy connection and never an app
worker, and a large body never sits whole in memory.

Two shapes, one store:
- `RequestBody`: written once while the client uploads, then read from the start as many times
  as the request is sent (a retry replays it whatever its size).
- `AnswerSpool`: a queue: what the upstream sent faster than the client takes goes in at the
  back, the client's writes take from the front.

The temp file is made with `tempfile.TemporaryFile`, which on Linux opens it with O_TMPFILE: it
never has a name, so nothing is left behind even after a crash. Writes and reads are blocking
calls in the event loop (FACTS.md: ~130 µs per 64 KiB written, ~9 µs read back from the page
cache), so only what a slow party leaves behind is spilled, in large pieces.

A temp file that cannot be written (ENOSPC, EIO, a `temp_dir` that went away) raises OSError
from `add`; the caller decides what that means (503 on the request side, back-pressure on the
answer side), as SPEC 9 says.
"""

from __future__ import annotations

import os
import tempfile
from typing import Final, Protocol

# One piece read back from a temp file: what one socket write takes well, and what one
# pread costs little (under glibc's mmap threshold).
PIECE: Final = 65536
# What a slow client is handed from a temp file at a time: its transport buffer holds at most
# this beyond its high-water mark (exchange: SLOW_CLIENT_HIGH), so 1,000 idle readers cost
# about 32 KiB each, not 128.
CLIENT_PIECE: Final = 16384


class TempBytes(Protocol):
    """Where the bytes held in temp files are counted (metrics: failproxy_temp_file_bytes)."""

    def temp_file_bytes(self, delta: int) -> None: ...


class TempFile:
    """An unlinked temp file, appended to and read with pread at any offset."""

    __slots__ = ("counter", "fd", "size")

    def __init__(self, temp_dir: str, counter: TempBytes | None) -> None:
        # TemporaryFile: O_TMPFILE (no name at all) where the file system has it, else a name
        # unlinked at once. The Python file object is dropped, its fd kept.
        with tempfile.TemporaryFile(dir=temp_dir or None, buffering=0) as f:
            self.fd = os.dup(f.fileno())
        self.size = 0
        self.counter = counter

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, self.size)
            self.size += n
            if self.counter is not None:
                self.counter.temp_file_bytes(n)
            view = view[n:]

    def read(self, offset: int, size: int = PIECE) -> bytes:
        data = os.pread(self.fd, min(size, self.size - offset), offset)
        if not data and offset < self.size:
            raise OSError(5, "temp file shorter than written")
        return data

    def truncate(self) -> None:
        """Empty it for reuse (the answer side, once the client took everything)."""
        if self.size:
            os.ftruncate(self.fd, 0)
            if self.counter is not None:
                self.counter.temp_file_bytes(-self.size)
            self.size = 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            if self.counter is not None and self.size:
                self.counter.temp_file_bytes(-self.size)
            self.size = 0


class RequestBody:
    """A request body read whole before any upstream is contacted (SPEC 9): the first
    `memory` bytes in memory, the rest in a temp file. Read back from the start by `Sender`."""

    __slots__ = ("chunks", "counter", "file", "in_memory", "memory", "size", "spilled",
                 "temp_dir")

    def __init__(self, memory: int, temp_dir: str, counter: TempBytes | None) -> None:
        self.memory = memory
        self.temp_dir = temp_dir
        self.counter = counter
        self.chunks: list[bytes] = []
        self.in_memory = 0
        self.size = 0
        self.spilled = 0  # bytes that went to the temp file
        self.file: TempFile | None = None

    def add(self, data: bytes) -> None:
        """Keep `data`; raises OSError when it had to go to a temp file that cannot be written.
        Memory keeps the start of the body; once it is full every later byte goes to the file,
        so the body is the memory part followed by the file."""
        size = len(data)
        if self.file is None:
            room = self.memory - self.in_memory
            if size <= room:
                self.chunks.append(data)
                self.in_memory += size
                self.size += size
                return
            if room > 0:  # memory holds exactly the first `memory` bytes
                self.chunks.append(data[:room])
                self.in_memory += room
                self.size += room
                data = data[room:]
                size -= room
            self.file = TempFile(self.temp_dir, self.counter)
        self.file.write(data)
        self.spilled += size
        self.size += size

    def close(self) -> None:
        """Let the bytes go (the request was answered, or its client left)."""
        self.chunks = []
        self.in_memory = 0
        if self.file is not None:
            self.file.close()
            self.file = None


class Sink(Protocol):
    """Where a held body is sent (upstream.UpstreamConnection): write, and whether its buffer
    is full (`send_paused`, set by the transport's pause_writing)."""

    send_paused: bool

    def writelines(self, data: list[bytes]) -> None: ...

    def write(self, data: bytes) -> None: ...


class Sender:
    """Sends a held request (head and RequestBody) to one upstream connection: the head and the
    memory part at once, the file part piece by piece while the connection takes it, going on
    from `pump` when the connection's buffer drains (the back-pressure nginx's event pipe
    applies to `client_body_temp`)."""

    __slots__ = ("body", "offset", "sink")

    def __init__(self, body: RequestBody, sink: Sink) -> None:
        self.body = body
        self.sink = sink
        self.offset = 0

    def start(self, head: bytes) -> bool:
        """Send `head` and what can be sent now; True when the whole body went out."""
        self.sink.writelines([head, *self.body.chunks])
        return self.pump()

    def pump(self) -> bool:
        """Send file pieces until the connection's buffer is full; True when all went out.
        Raises OSError when the temp file cannot be read."""
        file = self.body.file
        if file is None:
            return True
        sink = self.sink
        while self.offset < file.size:
            if sink.send_paused:
                return False
            data = file.read(self.offset)
            self.offset += len(data)
            sink.write(data)
        return True


class Source:
    """Bytes an exchange hands to its client as fast as the client takes them (exchange._drain):
    an AnswerSpool, or a FileSource. A plain base class, not a Protocol: the exchange is
    compiled by mypyc, which calls a base class's methods natively."""

    __slots__ = ()

    spilled: int  # bytes that went through a temp file (logged as spilled_bytes)
    # bytes handed out that the exchange could not count up front (a compressed file's)
    produced: int = 0

    @property
    def pending(self) -> int:
        raise NotImplementedError

    @property
    def unsent(self) -> int:
        """Bytes the exchange already counted as sent (bytes_sent) that the client never got."""
        return self.pending

    def full(self) -> bool:
        raise NotImplementedError

    def take(self) -> bytes:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class FileSource(Source):
    """A region of a file served from static.root (SPEC 10), read in pieces as the client takes
    them. uvloop 0.23's transports have no sendfile (FACTS.md), and an os.sendfile on the
    transport's socket would race its own buffer, so the file is read with pread: from the page
    cache that is ~9 µs per 64 KiB."""

    __slots__ = ("end", "fd", "offset", "spilled")

    def __init__(self, fd: int, offset: int, length: int) -> None:
        self.fd = fd
        self.offset = offset
        self.end = offset + length
        self.spilled = 0

    @property
    def pending(self) -> int:
        return self.end - self.offset

    def full(self) -> bool:
        return False

    def take(self) -> bytes:
        if self.offset >= self.end:
            return b""
        data = os.pread(self.fd, min(PIECE, self.end - self.offset), self.offset)
        if not data:
            raise OSError(5, "file shorter than its announced length")
        self.offset += len(data)
        return data

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class AnswerSpool(Source):
    """What an upstream sent faster than its client takes (SPEC 9, answer side): a queue of
    bytes, the first `memory` of them in memory, then a temp file up to `max_file` bytes; past
    that the caller stops reading the upstream (back-pressure, nginx's
    proxy_max_temp_file_size). The client's writes take from the front.

    The queue is `front` (memory), then the file, then `tail`: bytes that came after the temp
    file failed (one upstream read's worth: the caller stops reading once it failed). Bytes go
    to the file only while memory is full or the file still has unread bytes, so order holds."""

    __slots__ = ("counter", "failed", "file", "file_read", "front", "front_size", "lost",
                 "max_file", "memory", "spilled", "tail", "tail_size", "temp_dir")

    def __init__(self, memory: int, max_file: int, temp_dir: str,
                 counter: TempBytes | None) -> None:
        self.memory = memory
        self.max_file = max_file
        self.temp_dir = temp_dir
        self.counter = counter
        self.front: list[bytes] = []
        self.front_size = 0
        self.file: TempFile | None = None
        self.file_read = 0  # the file's bytes before this offset went to the client
        self.tail: list[bytes] = []
        self.tail_size = 0
        self.spilled = 0
        self.failed = False  # the temp file could not be written: no file from then on
        self.lost = False  # ... nor told apart from what it held: the caller must cut the answer

    @property
    def pending(self) -> int:
        """Bytes held, not yet given to the client."""
        file = self.file
        unread = file.size - self.file_read if file is not None else 0
        return self.front_size + unread + self.tail_size

    def full(self) -> bool:
        """No more room: the caller stops reading the upstream until the client takes some."""
        if self.failed or not self.max_file:
            return self.front_size + self.tail_size > self.memory
        file = self.file
        return file is not None and file.size >= self.max_file

    def add(self, pieces: list[bytes]) -> None:
        """Queue `pieces` at the back; raises OSError when the temp file cannot be written (the
        pieces are then kept in memory, and `full()` holds until the client takes them)."""
        size = 0
        for piece in pieces:
            size += len(piece)
        if self.failed:
            self.tail += pieces
            self.tail_size += size
            return
        file = self.file
        spill = file is not None and file.size > self.file_read
        if not spill and (self.front_size + size <= self.memory or not self.max_file):
            self.front += pieces
            self.front_size += size
            return
        # Memory is full: what it holds goes to the file first, so a client that stopped
        # reading holds no body bytes in memory while its answer sits in the file.
        moved = self.front if not spill else []
        before = file.size if file is not None else 0
        try:
            if file is None:
                file = self.file = TempFile(self.temp_dir, self.counter)
            for piece in moved:
                file.write(piece)
            for piece in pieces:
                file.write(piece)
        except OSError:
            self.failed = True
            if file is not None and file.size > before:
                try:  # a piece half written must not be sent twice
                    os.ftruncate(file.fd, before)
                    if file.counter is not None:
                        file.counter.temp_file_bytes(before - file.size)
                    file.size = before
                except OSError:
                    file.close()
                    self.file = None
                    self.lost = True  # cannot tell what it held: the answer cannot be whole
                    raise
            self.tail += pieces
            self.tail_size += size
            raise
        if moved:
            self.spilled += self.front_size
            self.front = []
            self.front_size = 0
        self.spilled += size

    def take(self) -> bytes:
        """The next bytes for the client (b"" when nothing is held)."""
        if self.front:
            data = self.front.pop(0)
            self.front_size -= len(data)
            return data
        file = self.file
        if file is not None and file.size > self.file_read:
            data = file.read(self.file_read, CLIENT_PIECE)
            self.file_read += len(data)
            if self.file_read >= file.size and not self.failed:
                file.truncate()  # drained: reuse it from the start
                self.file_read = 0
            return data
        if self.tail:
            data = self.tail.pop(0)
            self.tail_size -= len(data)
            return data
        return b""

    def close(self) -> None:
        self.front = []
        self.tail = []
        self.front_size = self.tail_size = 0
        if self.file is not None:
            self.file.close()
            self.file = None
