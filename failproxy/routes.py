"""Route keys (SPEC 4.4): the method and the path with the query dropped and every segment that
looks like an identifier replaced by `:id`, so `/users/42/posts` and `/users/7/posts` learn
together as `GET /users/:id/posts`.

An identifier segment is all digits, hex of 8 or more characters, or a UUID. The key is logged
on every `request` event and is what route learning reads, so it is computed for every answered
request: a bounded cache keyed by method and raw target makes a repeated request two dict lookups.
"""

from __future__ import annotations

import re
from typing import Final

_ID: Final = re.compile(
    rb"(?<=/)(?:[0-9]+|[0-9A-Fa-f]{8,}|"
    rb"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12})(?=/|$)"
)
_CACHED: Final = 4096  # targets remembered per method and worker; a full cache starts over

# method -> target -> route: a repeated request is two dict lookups, no bytes built.
_cache: Final[dict[bytes, dict[bytes, str]]] = {}


def route_key(method: bytes, target: bytes) -> str:
    """`GET /users/:id/posts` for method b"GET" and target b"/users/42/posts?page=2"."""
    targets = _cache.get(method)
    if targets is None:
        if len(_cache) >= 64:  # methods are few; a flood of odd ones must not grow it
            _cache.clear()
        targets = _cache[method] = {}
    route = targets.get(target)
    if route is not None:
        return route
    path = target
    cut = path.find(b"?")
    if cut >= 0:
        path = path[:cut]
    route = (method + b" " + _ID.sub(b":id", path)).decode("latin-1")
    if len(targets) >= _CACHED:
        targets.clear()
    targets[target] = route
    return route
