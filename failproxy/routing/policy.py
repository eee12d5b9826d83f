"""The failover policy as pure functions: server order, error -> reason, may this request move on.

Nothing here does I/O, so every rule is tested as a table (tests/test_policy.py).
"""

from __future__ import annotations

import errno as _errno
from collections.abc import Sequence
from typing import Final

from failproxy.config import Address, Config, Upstream
from failproxy.reasons import (
    CONNECT_REASONS,
    REASON_INDEX,
    REASONS,
    RETRY_ON_NAMES,
    SENT_REASONS,
)

__all__ = ["CONNECT_REASONS", "REASONS", "REASON_INDEX", "RETRY_ON_NAMES", "SENT_REASONS"]

# RFC 9110 9.2.2 idempotent methods (CONNECT is never proxied).
IDEMPOTENT_METHODS: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


def idempotent(method: bytes) -> bool:
    """Is `method` in IDEMPOTENT_METHODS? GET, most requests, compared first: a set probe is
    ~0.25k instructions a request (bench.profiles.lockstep)."""
    return method == b"GET" or method in IDEMPOTENT_METHODS

# Response statuses that may trigger a failover, by status code.
STATUS_REASONS: Final = {502: "http_502", 503: "http_503", 504: "http_504"}
# The least of them: a response head below it is not looked up (a lookup with a boxed key,
# ~160 instructions a 200, exchange.on_response_head).
STATUS_REASON_MIN: Final = min(STATUS_REASONS)

_ERRNO_REASONS = {
    _errno.EAGAIN: "overloaded",  # == EWOULDBLOCK on Linux: UNIX listen backlog full
    _errno.ECONNREFUSED: "refused",
    _errno.ENOENT: "missing",
    _errno.ETIMEDOUT: "connect_timeout",
}


def classify_connect_errno(err: int | None) -> str:
    """Map a connect() errno to its reason; unknown errors are `unreachable`."""
    if err is None:
        return "unreachable"
    return _ERRNO_REASONS.get(err, "unreachable")


def errno_name(err: int | None) -> str | None:
    """`EAGAIN` for 11, as logged in the `errno` field; None when there is no errno."""
    if err is None:
        return None
    return _errno.errorcode.get(err, str(err))


def expand_retry_on(names: Sequence[str]) -> frozenset[str]:
    """`retry_on` as the set of reasons it covers: "connect" stands for the seven connect ones."""
    out: set[str] = set()
    for name in names:
        if name == "connect":
            out |= CONNECT_REASONS
        else:
            out.add(name)
    return frozenset(out)


def server_order(servers: Sequence[Upstream], self_address: Address | None) -> tuple[Upstream, ...]:
    """Primaries in listed order, then the backups; a backup list holding `self` is a ring after it.

    With backups [h1, h2, h3], h1 tries h2, h3, h1: one config serves every box, and overflow
    spreads around the ring instead of piling onto the first peer listed.
    """
    primaries = [s for s in servers if not s.backup]
    backups = [s for s in servers if s.backup]
    if self_address is not None:
        for i, server in enumerate(backups):
            if server.address == self_address:
                backups = backups[i + 1 :] + backups[: i + 1]
                break
    return tuple(primaries + backups)


def may_retry(
    reason: str,
    *,
    retry_on: frozenset[str],
    idempotent: bool,
    replayable: bool,
    retry_non_idempotent: bool,
) -> bool:
    """May a request that failed with `reason` move on to the next server?

    `idempotent`: the method is in IDEMPOTENT_METHODS. `replayable`: every byte sent so far is
    still held (no body, or a body within `retry_body_bytes`). Connect reasons sent nothing and
    are always safe; the others are safe only when the request can be sent again unchanged and
    either the method is idempotent or the operator said replays are fine.
    """
    if reason not in retry_on:
        return False
    if reason in CONNECT_REASONS:
        return True
    if not replayable:
        return False
    return idempotent or retry_non_idempotent


def may_retry_stale(*, idempotent: bool, replayable: bool, retry_non_idempotent: bool) -> bool:
    """May a request whose reused keep-alive connection failed before any response byte be re-sent
    once on a fresh connection to the same server? Never for a non-idempotent request unless the
    operator allows replays."""
    return replayable and (idempotent or retry_non_idempotent)


def exhausted_status(last_reason: str | None) -> int:
    """The status of a request that reached no server: 504 when the last attempt timed out."""
    if last_reason in ("connect_timeout", "timeout"):
        return 504
    return 502


def walk_limit_reached(attempts: int, tries: int, elapsed: float, retry_timeout: float) -> bool:
    """`tries` (0 = every server once) and `retry_timeout` (0 = no limit) bound the walk."""
    if tries and attempts >= tries:
        return True
    return bool(retry_timeout and elapsed >= retry_timeout)


def describe_order(
    cfg: Config,
    servers: Sequence[tuple[Upstream, str | None]] | None = None,
    self_address: Address | None = None,
    self_reason: str = "",
) -> list[str]:
    """The resolved server order as `failproxy check` prints it: what a request tries, in turn.

    `servers`: every server with the DNS name it came from (None: listed), as discovery/watch.py
    resolved them; by default the listed ones. `self_address`/`self_reason`: the address
    detected as this box's own and why; by default `upstream.self`.
    """
    if servers is None:
        servers = [(s, None) for s in cfg.upstream.servers]
    if self_address is None:
        self_address = cfg.upstream.self
    names = {s.address.text: dns for s, dns in servers}
    lines = []
    for n, server in enumerate(server_order([s for s, _ in servers], self_address), 1):
        role = "backup" if server.backup else "primary"
        dns = names.get(server.address.text)
        if dns:
            role += f", dns {dns}"
        if server.address == self_address:
            role += ", self: tried last" if server.backup else ", self"
            if self_reason:
                role += f"; {self_reason}"
        lines.append(f"{n}. {server.address.text} ({role})")
    return lines
