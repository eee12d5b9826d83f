"""The hot end of the log: JSON lines rendered by orjson into a sink that writes once per loop
turn. Compiled with the hot path (logs.py, structlog's set-up, stays plain Python)."""

from __future__ import annotations

import asyncio
import os
import select
import stat
import sys
import time
from collections.abc import Callable, MutableMapping
from typing import Any, Final, TextIO

import orjson

from failproxy.telemetry import turnend

# Called on the hot path, so held as module constants: in the compiled build a Final is a C
# static, where a from-import or a module attribute is a dict lookup per call (~150-300
# instructions each, bench.profiles.realsock).
_time: Final = time.time
# What writes the lines: os.write, until a worker hands its own (`use_writer`). os.write lets
# the GIL go around the call and parses its arguments through argument clinic: ~0.8k
# instructions a line of which ~0.2k is the call itself (bench.profiles.lockstep); a worker has
# no other thread that could run meanwhile.
_WRITER: Final[list[Callable[[int, bytes], int]]] = [os.write]


def use_writer(write: Callable[[int, bytes], int]) -> None:
    """Write the lines with `write` (os.write's contract: the count written, OSError raised)."""
    _WRITER[0] = write


# ".000Z" to ".999Z": a new millisecond is one concatenation (a format() call was ~3k
# instructions: bench.profiles.instructions, where under callgrind nearly every request is in a
# new millisecond).
_MS_SUFFIXES: Final = tuple(f".{ms:03d}Z" for ms in range(1000))


class Timestamper:
    """ISO 8601 UTC with milliseconds; formatted at most once per millisecond."""

    __slots__ = ("_last", "_ms", "_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._ms = -1
        self._prefix = ""
        self._last = ""

    def now(self) -> str:
        now = _time()
        ms = int(now * 1000)
        if ms == self._ms:
            return self._last
        self._ms = ms
        second = ms // 1000
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        self._last = self._prefix + _MS_SUFFIXES[ms % 1000]
        return self._last

    def __call__(self, _logger: Any, _name: str, event: MutableMapping[str, Any]) -> Any:
        """As a structlog processor, for the events that go through structlog."""
        event["timestamp"] = self.now()
        return event


TIMESTAMPER: Final = Timestamper()


def stamp() -> str:
    """The event timestamp: ISO 8601 UTC with milliseconds (formatted at most once a ms)."""
    return TIMESTAMPER.now()


# orjson's entry point and option, kept here: `orjson.dumps` read per call is two module
# attribute lookups (~0.5k instructions per line, bench.profiles.realsock).
_DUMPS: Final = orjson.dumps
_NEWLINE: Final = orjson.OPT_APPEND_NEWLINE

_FORKS: Final = [0]  # bumped in each child after a fork (Sink's cached loop is then stale)


def _forked() -> None:
    _FORKS[0] += 1


os.register_at_fork(after_in_child=_forked)


class Sink:
    """Where rendered lines go. Inside a running loop, lines are gathered and written once per
    loop iteration, or (with `buffer` > 0, as nginx's `access_log ... buffer= flush=`) once
    `buffer` bytes are gathered or the oldest has waited `flush_after` seconds; outside a loop
    (the master, exit paths) they are written at once."""

    __slots__ = ("_buf", "_fd", "_file", "_flush", "_forks", "_limit", "_n", "_pipe",
                 "_scheduled", "_size", "_timer", "_turn", "flush_after", "path")

    def __init__(self, file: TextIO | None, path: str, buffer: int = 0,
                 flush_after: float = 1.0) -> None:
        self.path = path
        self._file = open(path, "ab", buffering=0) if path else None  # noqa: SIM115
        self._fd = self._file.fileno() if self._file else (file or sys.stderr).fileno()
        self._pipe = _is_pipe(self._fd)
        # The lines gathered: the first `_n` entries (the list is kept: turnend.put(); one line
        # a turn, behind unicorn).
        self._buf: list[bytes] = []
        self._n = 0
        self._scheduled = False
        self._limit = buffer
        self.flush_after = flush_after
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None
        self._turn: turnend.TurnEnd | None = None  # of the loop lines were last written in
        self._flush = self.flush  # bound once: deferred every turn
        self._forks = 0

    def reopen(self) -> bool:
        """Open `path` again and write there from now on (SPEC 6, USR1): logrotate renamed the
        file, and the descriptor still points at the renamed one. The new file is opened before
        anything changes, so when the open fails (OSError, raised) the sink keeps writing where
        it did; then the lines gathered so far are written to the old file, which they belong
        to, and it is closed. False, and nothing done, when the sink writes to stderr."""
        if not self.path:
            return False
        new = open(self.path, "ab", buffering=0)  # noqa: SIM115
        self.flush()
        old = self._file
        self._file = new
        self._fd = new.fileno()
        self._pipe = _is_pipe(self._fd)
        if old is not None:
            old.close()
        return True

    def fileno(self) -> int:
        """The descriptor lines are written to now."""
        return self._fd

    def configure(self, buffer: int, flush_after: float) -> None:
        self.flush()
        self._limit = buffer
        self.flush_after = flush_after

    def write(self, line: bytes) -> None:
        n = self._n
        turnend.put(self._buf, n, line)
        self._n = n + 1
        if self._limit:
            self._size += len(line)
            if self._size >= self._limit:
                self.flush()
                return
        if self._scheduled:
            return
        turn = self._turn
        if turn is None or self._forks != _FORKS[0] or not (turn.held or turn.loop.is_running()):
            # asyncio.get_running_loop() makes a getpid() syscall (its fork check): once per
            # loop, not once per loop turn; a loop cached before a fork is the parent's. A held
            # turn is one of a running loop (the access line is written in one, behind unicorn)
            try:
                turn = turnend.of(asyncio.get_running_loop())
            except RuntimeError:
                self.flush()
                return
            self._turn = turn
            self._forks = _FORKS[0]
        self._scheduled = True
        if self._limit:
            self._timer = turn.loop.call_later(self.flush_after, self._flush)
        else:
            turn.defer(self._flush)

    def flush(self) -> None:
        self._scheduled = False
        timer = self._timer
        if timer is not None:
            self._timer = None
            timer.cancel()
        n = self._n
        if not n:
            return
        buf = self._buf
        self._n = 0
        self._size = 0
        if n == 1:
            line = buf[0]
            buf[0] = b""
            self._write(line)  # a batch of one (to a pipe, batches are cut only between lines)
            return
        lines = buf[:n]
        self._buf = []  # a burst's list goes with it
        if not self._pipe:
            self._write(b"".join(lines))
            return
        batch: list[bytes] = []
        size = 0
        for line in lines:
            if batch and size + len(line) > select.PIPE_BUF:
                self._write(b"".join(batch))
                batch, size = [], 0
            batch.append(line)
            size += len(line)
        self._write(b"".join(batch))

    def _write(self, data: bytes) -> None:
        write = _WRITER[0]
        while data:
            try:
                written = write(self._fd, data)
            except InterruptedError:
                continue
            except BlockingIOError:
                # A non-blocking stderr (shared with a parent) that is full: drop rather than spin.
                return
            if written == len(data):
                return
            data = data[written:]


def _is_pipe(fd: int) -> bool:
    """Workers share stderr. An O_APPEND write to a file is atomic whatever its size; to a pipe
    (docker logs, systemd) only up to PIPE_BUF bytes, so batches are cut at lines there."""
    try:
        return not stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        return True


class Emitter:
    """The emitter of one event of the hot path (`request`, `failover`).

    The caller builds the whole event as one dict, starting with `event`, `level`, `timestamp`
    (`stamp()`) and `pid` (`pid`): with JSON output it goes straight through orjson into the sink,
    the same object structlog would render (~1 us instead of ~5 us through the processor chain,
    and no dict growing by four keys). With the console format it goes through structlog. Below
    the configured level `enabled` is False and the caller builds nothing."""

    __slots__ = ("_method", "enabled", "pid", "sink")

    def __init__(self, enabled: bool, pid: int, sink: Sink | None, method: Any) -> None:
        """`sink`: JSON output goes there directly (a caller with its line rendered already
        writes it there); None: through structlog's `method`."""
        self.enabled = enabled
        self.pid = pid
        self.sink = sink
        self._method = method

    def emit(self, fields: dict[str, Any]) -> None:
        sink = self.sink
        if sink is not None:
            sink.write(_DUMPS(fields, default=str, option=_NEWLINE))
            return
        fields = dict(fields)  # the caller may refill its dict for the next event
        event = fields.pop("event")
        for key in ("level", "timestamp", "pid"):
            del fields[key]
        self._method(event, **fields)
