"""The access-log line of a request (SPEC 5 `request`): one JSON line, the keys in this order.

Two twins behind one name, chosen at import as aiohttp chooses its parser: `render` is the
Cython one (`_accessline.pyx`) where it was built and the build runs compiled, `render_py`
(here, orjson over a dict) otherwise: under `FAILPROXY_PURE=1`, with a stale build, or where no
compiler or Cython was (failproxy/_build.py hides the extension then, and its import fails).
Both make the same bytes for the same record (tests/test_accessline.py), so a reader of the log
cannot tell which ran. `BUILT` says which one runs (`failproxy --version`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import orjson

from failproxy.telemetry.jsonlog import stamp

_DUMPS: Final = orjson.dumps
_NEWLINE: Final = orjson.OPT_APPEND_NEWLINE

# Made once and refilled for each line: 19 stores into it cost ~1k instructions, building a new
# one ~3.7k (bench.profiles.realsock). orjson keeps no reference to it.
_RECORD: Final[dict[str, Any]] = {
    "event": "request", "level": "info", "timestamp": None, "pid": None,
    "request_id": None, "method": None, "path": None, "status": None,
    "bytes_sent": None, "duration_ms": None, "client": None, "upstream": None,
    "upstreams": None, "tries": None, "overflowed": None, "connect_ms": None,
    "held_ms": None, "upstream_ms": None, "route": None, "spilled_bytes": 0,
    "static": False,
}


def render_py(timestamp: str | None, pid: int, request_id: str | None, method: bytes, path: bytes,
              status: int, bytes_sent: int, duration_ms: float, client: str,
              upstream: str | None, upstreams: tuple[str, ...], tries: int, overflowed: bool,
              connect_ms: float | None, held_ms: float | None, upstream_ms: float | None,
              route: str, spilled_bytes: int, static: bool) -> bytes:
    """The line, newline-terminated; `method` and `path` as they arrived (latin-1);
    `timestamp` None: now (jsonlog.stamp)."""
    record = _RECORD
    record["timestamp"] = stamp() if timestamp is None else timestamp
    record["pid"] = pid
    record["request_id"] = request_id
    record["method"] = method.decode("latin-1")
    record["path"] = path.decode("latin-1")
    record["status"] = status
    record["bytes_sent"] = bytes_sent
    record["duration_ms"] = duration_ms
    record["client"] = client
    record["upstream"] = upstream
    record["upstreams"] = upstreams
    record["tries"] = tries
    record["overflowed"] = overflowed
    record["connect_ms"] = connect_ms
    record["held_ms"] = held_ms
    record["upstream_ms"] = upstream_ms
    record["route"] = route
    record["spilled_bytes"] = spilled_bytes
    record["static"] = static
    return _DUMPS(record, default=str, option=_NEWLINE)


Render = Callable[[str | None, int, str | None, bytes, bytes, int, int, float, str, str | None,
                   tuple[str, ...], int, bool, float | None, float | None, float | None, str, int,
                   bool], bytes]



def _select() -> tuple[Render, str]:
    try:
        from failproxy.telemetry._accessline import render as compiled  # type: ignore[import-not-found]
    except ImportError:
        return render_py, "pure"
    return compiled, "cython"


render, BUILT = _select()
