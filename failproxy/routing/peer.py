"""A peer: one `[[upstream.server]]` as one worker sees it (nginx's word for it).

It holds what the worker knows of that server: passive health, its in-flight requests from this
worker, and its idle keep-alive connections. An exchange takes a peer's in-flight slot with
`acquire()` and gives it back with `release()`, as nginx's peer get/free: one pair, called from
one place in the exchange, so no path can leak a slot and leave a `max_conns` server "busy"
forever.

`fail_timeout = 0` (the default) means the server is never marked down: it is tried on every
request. That is the point of failproxy; nginx instead benches a UNIX socket for the rest of the
second after a single EAGAIN unless `max_fails=0`.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable

from mypy_extensions import trait

from failproxy.config import Upstream, UpstreamConfig
from failproxy.routing.loadshare import LoadSharing
from failproxy.routing.queue_depth import QueueProbe


@trait
class Pooled:
    """What the idle pool needs of a connection (upstream.UpstreamConnection implements it; a
    mypyc trait, so compiled code calls it natively)."""

    __slots__ = ()

    def reusable(self, now: float, careful: bool) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


def pack_sockaddr(family: int, sockaddr: str | tuple[str, int]) -> bytes:
    """The C `struct sockaddr` of an address, what connect(2) takes: built once per peer, so a
    connect passes it as it is (proxy/connect.py), where `socket.connect` parses the Python
    form again each time."""
    if family == socket.AF_UNIX:
        assert isinstance(sockaddr, str)
        return struct.pack("=H", family) + os.fsencode(sockaddr)
    assert isinstance(sockaddr, tuple)
    host, port = sockaddr
    if family == socket.AF_INET:
        return (struct.pack("=H", family) + struct.pack("!H", port)
                + socket.inet_pton(family, host) + bytes(8))
    # sockaddr_in6: family, port, flow info, address, scope id (no scope: not link-local)
    return (struct.pack("=H", family) + struct.pack("!HI", port, 0)
            + socket.inet_pton(family, host) + struct.pack("=I", 0))


class Peer:
    """One upstream server in one worker."""

    __slots__ = (
        "_older",
        "_others",
        "_others_of",
        "_publish",
        "_warm",
        "address",
        "backup",
        "down_until",
        "fail_timeout",
        "fails",
        "family",
        "first_fail",
        "header_line",
        "index",
        "inflight",
        "is_unix",
        "keepalive",
        "keepalive_requests",
        "keepalive_timeout",
        "max_conns",
        "max_fails",
        "max_queue",
        "packed",
        "queue_probe",
        "share",
        "sockaddr",
        "spare",
        "waiting",
    )

    def __init__(
        self,
        index: int,
        conf: Upstream,
        upstream: UpstreamConfig,
        resolved: tuple[int, tuple[str, int]] | None = None,
    ) -> None:
        """`resolved` (family, sockaddr): the address was resolved already (a peer from DNS,
        discovery/watch.py), so no lookup happens here."""
        addr = conf.address
        self.index = index
        self.address = addr.text
        self.backup = conf.backup
        # `upstream_header = true`: the response line naming who answered, built once.
        self.header_line = b"X-Failproxy-Upstream: " + addr.text.encode() + b"\r\n"
        self.is_unix = addr.is_unix
        self.sockaddr: str | tuple[str, int]
        if addr.is_unix:
            self.family = int(socket.AF_UNIX)
            self.sockaddr = addr.path
        elif resolved is not None:
            self.family = resolved[0]
            self.sockaddr = resolved[1]
        else:
            # Resolved once, when the worker starts (as nginx does): a blocking lookup per
            # connect would stall every connection of the worker.
            info = socket.getaddrinfo(addr.host, addr.port, type=socket.SOCK_STREAM)[0]
            self.family = int(info[0])
            self.sockaddr = (str(info[4][0]), int(info[4][1]))
        self.packed = pack_sockaddr(self.family, self.sockaddr)
        self.fail_timeout = conf.fail_timeout
        self.max_fails = conf.max_fails
        self.max_conns = conf.max_conns
        self.max_queue = conf.max_queue
        self.queue_probe = QueueProbe(addr.path) if conf.max_queue and addr.is_unix else None
        self.keepalive = upstream.keepalive
        self.keepalive_requests = upstream.keepalive_requests
        self.keepalive_timeout = upstream.keepalive_timeout
        self.inflight = 0
        # Of those, the ones with no response head yet: what the overflow policy counts (a
        # pull-model worker that wrote its answer is free again), published to the other
        # workers when there are several (loadshare.py).
        self.waiting = 0
        self.share: LoadSharing | None = None
        # the table's two methods, bound once (share_load): a call by name from the compiled
        # build looks the method up on each call (~150 instructions), four times a request
        self._publish: Callable[[int, int], None] | None = None
        self._others: Callable[[int], int] | None = None
        self._others_of: Callable[[int, int], int] | None = None
        self.spare = -1  # the fd of an unconnected UNIX socket, see proxy/connect.py
        self.fails = 0
        self.first_fail = 0.0
        self.down_until = 0.0
        # Idle keep-alive connections, taken most recently used first (LIFO, as nginx): the
        # warmest connection is the least likely to have been closed by the upstream. The
        # warmest is kept apart (`_warm`), the others in `_older`, oldest first: with one
        # connection going back and forth, a list would empty and refill on every request, and
        # CPython frees a list's storage when it empties and reallocates it on the next append
        # (~500 instructions a request, bench.profiles.realsock).
        self._warm: Pooled | None = None
        self._older: list[Pooled] = []

    # -- the in-flight slot ------------------------------------------------------------------

    def share_load(self, share: LoadSharing | None) -> None:
        """Publish this server's waiting count to, and read the other workers' from, `share`."""
        self.share = share
        self._publish = share.publish if share is not None else None
        self._others = share.others if share is not None else None
        self._others_of = share.others_of if share is not None else None

    def acquire(self) -> None:
        self.inflight += 1
        self.waiting += 1
        publish = self._publish
        if publish is not None:
            publish(self.index, self.waiting)

    def answered(self) -> None:
        """The request holding a slot got its response head."""
        self.waiting -= 1
        publish = self._publish
        if publish is not None:
            publish(self.index, self.waiting)

    def release(self, answered: bool) -> None:
        self.inflight -= 1
        if not answered:
            self.waiting -= 1
            publish = self._publish
            if publish is not None:
                publish(self.index, self.waiting)

    def others(self) -> int:
        """The other workers' requests awaiting this server's answer."""
        others = self._others
        return others(self.index) if others is not None else 0

    def others_with(self, other: Peer | None) -> int:
        """`others` of this server and `other` summed (None: this one's alone), in one call
        into the table: the overflow policy counts a box's UNIX socket and its own TCP port
        together, once a choice."""
        others_of = self._others_of
        if others_of is None:
            return 0
        return others_of(self.index, other.index if other is not None else -1)

    def busy(self) -> bool:
        """`max_conns`: that many requests of this worker already in flight to it."""
        return 0 < self.max_conns <= self.inflight

    def queue_full(self) -> bool:
        """`max_queue`: that many connections already wait in its accept queue."""
        probe = self.queue_probe
        if probe is None:
            return False
        depth = probe.depth()
        return depth is not None and depth >= self.max_queue

    # -- passive health (only with fail_timeout > 0) ---------------------------------------

    def is_down(self, now: float) -> bool:
        return self.down_until > now

    def record_failure(self, now: float) -> bool:
        """Count a failure; True when this one marks the server down."""
        if not self.fail_timeout:
            return False
        if self.fails == 0 or now - self.first_fail > self.fail_timeout:
            self.fails = 0
            self.first_fail = now
        self.fails += 1
        if self.max_fails and self.fails >= self.max_fails and self.down_until <= now:
            self.down_until = now + self.fail_timeout
            return True
        return False

    def record_success(self) -> bool:
        """Reset the failure count; True when the server was down (or on probation) before."""
        was_failing = self.down_until > 0.0
        self.fails = 0
        self.down_until = 0.0
        return was_failing

    # -- idle pool ---------------------------------------------------------------------------

    @property
    def idle(self) -> list[Pooled]:
        """The idle connections, oldest first (a new list: for status and tests)."""
        warm = self._warm
        return [*self._older, warm] if warm is not None else list(self._older)

    def has_idle(self) -> bool:
        return self._warm is not None

    def take_idle(self, now: float, careful: bool) -> Pooled | None:
        """The most recently used idle connection still fit to carry a request.

        `careful` (a request that must not be replayed) refuses connections that may be closing:
        idle for more than half their keep-alive allowance.
        """
        while True:
            conn = self._warm
            if conn is None:
                return None
            older = self._older
            self._warm = older.pop() if older else None
            if conn.reusable(now, careful):
                return conn
            if not careful:
                conn.close()
            else:
                # Too old for this request but maybe fine for an idempotent one: keep it, as
                # the oldest.
                self._put_oldest(conn)
                return None

    def _put_oldest(self, conn: Pooled) -> None:
        if self._warm is None:
            self._warm = conn
        else:
            self._older.insert(0, conn)

    def put_idle(self, conn: Pooled) -> bool:
        """Keep a connection for reuse; False when the pool is full (the caller closes it)."""
        warm = self._warm
        if warm is None:
            if self.keepalive < 1:
                return False
            self._warm = conn
            return True
        if len(self._older) + 1 >= self.keepalive:
            return False
        self._older.append(warm)
        self._warm = conn
        return True

    def forget_idle(self, conn: Pooled) -> None:
        # Tested first: most connections that end are not idle (unicorn closes each one), and
        # a remove() that raises ValueError costs ~8k instructions (bench.profiles.realsock --mode
        # close).
        if conn is self._warm:
            older = self._older
            self._warm = older.pop() if older else None
        elif conn in self._older:
            self._older.remove(conn)

    def close_idle(self) -> None:
        while self._warm is not None:
            conn = self._warm
            older = self._older
            self._warm = older.pop() if older else None
            conn.close()
        if self.spare >= 0:
            os.close(self.spare)
            self.spare = -1


def build_peers(upstream: UpstreamConfig) -> list[Peer]:
    return [Peer(i, s, upstream) for i, s in enumerate(upstream.servers)]
