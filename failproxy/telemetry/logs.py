"""structlog set-up: JSON lines (orjson) or console, and a sink that batches writes per loop turn.

Events below the configured level cost one no-op method call: structlog's filtering bound
logger replaces them with `return None`. An emitted JSON event costs a few microseconds; the
lines of one event-loop iteration leave in a single write().

The access log (`request` events) is not a level: `log.access` alone turns it on or off, so an
operator who quiets the log to `warning` keeps one line per request, as nginx's `error_log
warn` leaves its `access_log` alone. A logged exception keeps its traceback in JSON too, as one
string in `exception` (structlog's format_exc_info; the console renderer prints it its way).
"""

from __future__ import annotations

import logging
import os
import stat
import sys
from collections.abc import MutableMapping
from typing import Any

import orjson
import structlog

from failproxy.config import LogConfig
from failproxy.telemetry.jsonlog import TIMESTAMPER, Emitter, Sink

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class _BytesLogger:
    """structlog logger that hands rendered bytes (or str) to the sink."""

    __slots__ = ("_sink",)

    def __init__(self, sink: Sink) -> None:
        self._sink = sink

    def msg(self, message: bytes | str) -> None:
        if isinstance(message, str):
            message = message.encode()
        self._sink.write(message + b"\n")

    info = msg
    warning = msg
    error = msg
    debug = msg
    critical = msg
    exception = msg
    log = msg


_sink: Sink | None = None


def _orjson_dumps(event: MutableMapping[str, Any], **_kw: Any) -> bytes:
    return orjson.dumps(event, default=str)


def configure(cfg: LogConfig | None = None) -> None:
    """(Re)configure structlog for this process; call again after fork so `pid` is right."""
    global _sink, _fast_json, _pid, _level, _access_logger
    cfg = cfg or LogConfig()
    if _sink is not None:
        _sink.flush()
    if _sink is None or _sink.path != cfg.file:
        # Same path: keep the open file. A worker that dropped privileges may not be able to
        # open it again (as nginx workers, it writes to what the master opened).
        _sink = Sink(None, cfg.file)
    _sink.configure(cfg.buffer, cfg.flush)
    pid = os.getpid()

    def add_pid(_l: Any, _n: str, event: MutableMapping[str, Any]) -> Any:
        event["pid"] = pid
        return event

    _pid = pid
    level = _LEVELS.get(cfg.level, logging.INFO)
    _level = level
    _fast_json = cfg.format == "json"
    processors: list[Any] = [structlog.processors.add_log_level, TIMESTAMPER, add_pid]
    if cfg.format == "console":
        colors = not cfg.file and sys.stderr.isatty()
        processors.append(structlog.dev.ConsoleRenderer(colors=colors))
    else:
        # Without it orjson's default=str turns exc_info into the exception's message alone.
        processors.append(structlog.processors.format_exc_info)
        processors.append(structlog.processors.JSONRenderer(serializer=_orjson_dumps))
    sink = _sink
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=lambda *_a: _BytesLogger(sink),
        cache_logger_on_first_use=False,
    )
    # The access log's own logger (module docstring): the same chain, never filtered by level.
    _access_logger = structlog.wrap_logger(
        _BytesLogger(sink), processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
    )


_fast_json = False
_pid = 0
_level = logging.INFO
_access_logger: Any = None
ACCESS_EVENT = "request"  # the access log's event (SPEC 5): on or off by `log.access` only


def emitter(event: str, level: str) -> Emitter:
    """The emitter of one hot event (`request`, `failover`) for the current configuration.
    `request` is emitted whatever `log.level` says (module docstring); the caller checks
    `log.access`."""
    if event == ACCESS_EVENT and _access_logger is not None:
        return Emitter(True, _pid, _sink if _fast_json else None,
                       getattr(_access_logger.bind(), level))
    method = getattr(structlog.get_logger().bind(), level)
    return Emitter(_LEVELS[level] >= _level, _pid, _sink if _fast_json else None, method)


def get_logger() -> Any:
    """A bound logger for the current configuration (re-fetch after `configure`)."""
    return structlog.get_logger()


def flush() -> None:
    if _sink is not None:
        _sink.flush()


def reopen() -> str:
    """Reopen `log.file` after logrotate renamed it (SPEC 6, USR1); returns its path, or "" when
    the log goes to stderr (nothing to reopen). structlog's loggers and the hot emitters all
    hold the one sink, which swaps its descriptor in place, so every later line of this process
    goes to the new file with nothing re-bound. OSError when the path cannot be opened: the
    old file is kept, so a failed reopen loses no line."""
    if _sink is None or not _sink.reopen():
        return ""
    return _sink.path


def hand_over(uid: int) -> None:
    """Make the log file writable by `uid`, the workers' `server.user`, as nginx's master does
    on its USR1: a root master creates (or logrotate's `create` leaves) a root-owned file, and a
    worker that dropped privileges opens it again by path. Done through the open descriptor,
    not the path, so a symlink swapped in meanwhile hands nothing else over."""
    if _sink is None or not _sink.path:
        return
    fd = _sink.fileno()
    st = os.fstat(fd)
    if st.st_uid != uid:
        os.fchown(fd, uid, -1)
    if st.st_mode & 0o600 != 0o600:
        os.fchmod(fd, stat.S_IMODE(st.st_mode) | 0o600)
