"""structlog set-up: JSON lines (orjson) or console, and a sink that batches writes per loop turn.

Events below the configured level cost one no-op method call: structlog's filtering bound
logger replaces them with `return None`. An emitted JSON event costs a few microseconds; the
lines of one event-loop iteration leave in a single write().
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import stat
import sys
import time
from collections.abc import MutableMapping
from typing import Any, TextIO

import orjson
import structlog

from failproxy.config import LogConfig

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class _Timestamper:
    """ISO 8601 UTC with milliseconds; formatted at most once per millisecond."""

    __slots__ = ("_last", "_ms", "_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._ms = -1
        self._prefix = ""
        self._last = ""

    def now(self) -> str:
        now = time.time()
        ms = int(now * 1000)
        if ms == self._ms:
            return self._last
        self._ms = ms
        second = ms // 1000
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        self._last = f"{self._prefix}.{ms % 1000:03d}Z"
        return self._last

    def __call__(self, _logger: Any, _name: str, event: MutableMapping[str, Any]) -> Any:
        event["timestamp"] = self.now()
        return event


class Sink:
    """Where rendered lines go. Inside a running loop, lines are gathered and written once per
    loop iteration; outside one (the master, exit paths) they are written at once."""

    __slots__ = ("_buf", "_fd", "_file", "_pipe", "_scheduled", "path")

    def __init__(self, file: TextIO | None, path: str) -> None:
        self.path = path
        self._file = open(path, "ab", buffering=0) if path else None  # noqa: SIM115
        self._fd = self._file.fileno() if self._file else (file or sys.stderr).fileno()
        # Workers share stderr. An O_APPEND write to a file is atomic whatever its size; to a
        # pipe (docker logs, systemd) only up to PIPE_BUF bytes, so batches are cut at lines.
        try:
            self._pipe = not stat.S_ISREG(os.fstat(self._fd).st_mode)
        except OSError:
            self._pipe = True
        self._buf: list[bytes] = []
        self._scheduled = False

    def write(self, line: bytes) -> None:
        self._buf.append(line)
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._scheduled = True
        loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if not self._buf:
            return
        lines = self._buf
        self._buf = []
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
        while data:
            try:
                written = os.write(self._fd, data)
            except InterruptedError:
                continue
            except BlockingIOError:
                # A non-blocking stderr (shared with a parent) that is full: drop rather than spin.
                return
            data = data[written:]


class _BytesLogger:
    """structlog logger that hands rendered bytes (or str) to the sink."""

    __slots__ = ("_sink",)

    def __init__(self, sink: Sink) -> None:
        self._sink = sink

    def msg(self, message: bytes | str) -> None:
        if isinstance(message, str):
            message = message.encode()
        self._sink.write(message + b"\n")

    info = warning = error = debug = critical = exception = log = msg


_sink: Sink | None = None


def _orjson_dumps(event: MutableMapping[str, Any], **_kw: Any) -> bytes:
    return orjson.dumps(event, default=str)


def configure(cfg: LogConfig | None = None) -> None:
    """(Re)configure structlog for this process; call again after fork so `pid` is right."""
    global _sink, _fast_json, _pid, _level
    cfg = cfg or LogConfig()
    if _sink is not None:
        _sink.flush()
    if _sink is None or _sink.path != cfg.file:
        # Same path: keep the open file. A worker that dropped privileges may not be able to
        # open it again (as nginx workers, it writes to what the master opened).
        _sink = Sink(None, cfg.file)
    pid = os.getpid()

    def add_pid(_l: Any, _n: str, event: MutableMapping[str, Any]) -> Any:
        event["pid"] = pid
        return event

    _pid = pid
    level = _LEVELS.get(cfg.level, logging.INFO)
    _level = level
    _fast_json = cfg.format == "json"
    processors: list[Any] = [structlog.processors.add_log_level, _timestamper, add_pid]
    if cfg.format == "console":
        colors = not cfg.file and sys.stderr.isatty()
        processors.append(structlog.dev.ConsoleRenderer(colors=colors))
    else:
        processors.append(structlog.processors.JSONRenderer(serializer=_orjson_dumps))
    sink = _sink
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=lambda *_a: _BytesLogger(sink),
        cache_logger_on_first_use=False,
    )


_timestamper = _Timestamper()
_fast_json = False
_pid = 0
_level = logging.INFO


def event_logger(event: str, level: str = "info") -> Any:
    """An emitter `emit(fields)` for one event of the hot path (`request`, `failover`).

    With JSON output it renders the same object structlog would (the fields plus event, level,
    timestamp and pid) straight through orjson into the sink: ~1 us instead of ~5 us through the
    processor chain. Below the configured level it does nothing; with the console format it is
    the structlog method.
    """
    log = structlog.get_logger().bind()
    if _LEVELS[level] < _level:
        return lambda fields: None
    if not _fast_json or _sink is None:
        method = getattr(log, level)
        return lambda fields: method(event, **fields)
    sink = _sink
    stamp = _timestamper.now
    pid = _pid
    dumps = orjson.dumps
    option = orjson.OPT_APPEND_NEWLINE

    def emit(fields: dict[str, Any]) -> None:
        fields["event"] = event
        fields["level"] = level
        fields["timestamp"] = stamp()
        fields["pid"] = pid
        sink.write(dumps(fields, default=str, option=option))

    return emit


def get_logger() -> Any:
    """A bound logger for the current configuration (re-fetch after `configure`)."""
    return structlog.get_logger()


def flush() -> None:
    if _sink is not None:
        _sink.flush()
