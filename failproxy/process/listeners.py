"""The client-facing listening sockets: bound once by the master, shared by every worker.

One socket per configured address, inherited by the workers through fork (never one SO_REUSEPORT
socket per worker: such a socket drops its queued connections when its worker exits). Across a
USR2 re-exec the sockets travel as file descriptors listed in `FAILPROXY_FD` (as unicorn's
`UNICORN_FD`); the new master matches them to its configured addresses by `getsockname()`, so a
connection queued during the hand-over is accepted by whichever generation gets to it first.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from collections.abc import Iterable, Sequence

from failproxy.config import Address, Config

FD_ENV = "FAILPROXY_FD"
ADMIN_BACKLOG = 128

# What identifies a bound socket: ("unix", path, 0) or ("tcp", numeric host, port).
Key = tuple[str, str, int]


class ListenError(Exception):
    """An address could not be bound; the message names it."""


def configured(cfg: Config) -> tuple[Address, ...]:
    """The addresses whose sockets `worker_main` gets, in this order: listen, then tls_listen."""
    return cfg.server.listen + cfg.server.tls_listen


def _resolve(address: Address) -> tuple[socket.AddressFamily, tuple[str, int]]:
    infos = socket.getaddrinfo(address.host or None, address.port, socket.AF_UNSPEC,
                               socket.SOCK_STREAM, 0, socket.AI_PASSIVE | socket.AI_NUMERICSERV)
    family, _type, _proto, _canon, sockaddr = infos[0]
    return family, (str(sockaddr[0]), int(sockaddr[1]))


def address_key(address: Address) -> Key:
    if address.is_unix:
        return ("unix", address.path, 0)
    _family, (host, port) = _resolve(address)
    return ("tcp", host, port)


def socket_key(sock: socket.socket) -> Key | None:
    """What an inherited socket is bound to, or None when it is no listener of ours."""
    try:
        name = sock.getsockname()
        if sock.type != socket.SOCK_STREAM:
            return None
    except OSError:
        return None
    if sock.family == socket.AF_UNIX:
        path = name.decode() if isinstance(name, bytes) else str(name)
        return ("unix", path, 0) if path else None
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        return ("tcp", str(name[0]), int(name[1]))
    return None


def _remove_stale_unix(path: str) -> None:
    """Remove a socket file nobody listens on (left by a crash); refuse to touch anything else."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ListenError(f"unix:{path}: exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)  # a full accept queue must answer EAGAIN, not wait
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return
    except BlockingIOError:
        pass  # queue full: someone listens
    except FileNotFoundError:
        return
    finally:
        probe.close()
    raise ListenError(f"unix:{path}: address already in use")


def bind_one(address: Address, backlog: int) -> socket.socket:
    """Bind and listen on one address; the socket is non-blocking and not inheritable."""
    try:
        if address.is_unix:
            _remove_stale_unix(address.path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(address.path)
                os.chmod(address.path, 0o666)
            except BaseException:
                sock.close()
                raise
        else:
            family, sockaddr = _resolve(address)
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    # "[::]:80" next to "0.0.0.0:80" must not collide (nginx's ipv6only=on).
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(sockaddr)
            except BaseException:
                sock.close()
                raise
        sock.listen(backlog)
        sock.setblocking(False)
        return sock
    except ListenError:
        raise
    except OSError as exc:
        reason = errno.errorcode.get(exc.errno or 0, "") or str(exc)
        detail = f"{exc.strerror or exc} ({reason})"
        raise ListenError(f"{address.text}: cannot listen: {detail}") from exc


def inherit(env_value: str | None) -> dict[Key, socket.socket]:
    """Adopt the listening sockets a previous master passed in `FAILPROXY_FD` ("3,4,7")."""
    found: dict[Key, socket.socket] = {}
    for part in (env_value or "").split(","):
        part = part.strip()
        if not part.isdigit():
            continue
        try:
            sock = socket.socket(fileno=int(part))
        except OSError:
            continue
        key = socket_key(sock)
        if key is None or key in found:
            sock.close()
            continue
        os.set_inheritable(sock.fileno(), False)
        sock.setblocking(False)
        found[key] = sock
    return found


def close(sock: socket.socket, *, unlink: bool) -> None:
    """Close the master's copy; workers still holding theirs keep accepting until they stop."""
    key = socket_key(sock)
    sock.close()
    if unlink and key is not None and key[0] == "unix":
        with contextlib.suppress(OSError):
            os.unlink(key[1])


class ListenerSet:
    """The master's listening sockets by address; reloads bind or close only the difference."""

    def __init__(self, inherited: dict[Key, socket.socket] | None = None) -> None:
        self._inherited = dict(inherited or {})
        self._socks: dict[str, socket.socket] = {}  # address text -> socket

    def acquire(self, address: Address, backlog: int) -> socket.socket:
        """The inherited socket for `address`, else a new bind (the admin listener uses this)."""
        taken = self._inherited.pop(address_key(address), None)
        if taken is not None:
            taken.listen(backlog)  # adopt the configured backlog
            return taken
        return bind_one(address, backlog)

    def update(self, addresses: Sequence[Address], backlog: int) -> list[socket.socket]:
        """Make the set match `addresses`; all or nothing. Returns the sockets no longer wanted
        (the caller closes them); raises ListenError with nothing changed when a bind fails."""
        added: dict[str, socket.socket] = {}
        try:
            for address in addresses:
                if address.text not in self._socks and address.text not in added:
                    added[address.text] = self.acquire(address, backlog)
        except BaseException:
            for sock in added.values():
                close(sock, unlink=True)
            raise
        wanted = {a.text for a in addresses}
        removed = [s for text, s in self._socks.items() if text not in wanted]
        self._socks = {t: s for t, s in self._socks.items() if t in wanted} | added
        for text, sock in self._socks.items():
            if text not in added:
                with contextlib.suppress(OSError):
                    sock.listen(backlog)  # a reload may change the backlog
        return removed

    def sockets(self, addresses: Iterable[Address]) -> list[socket.socket]:
        return [self._socks[a.text] for a in addresses]

    def all(self) -> list[socket.socket]:
        return list(self._socks.values())

    def close_unused_inherited(self) -> None:
        """Inherited sockets the new config does not name: the old master still owns their paths."""
        for sock in self._inherited.values():
            sock.close()
        self._inherited.clear()

    def close_all(self, *, unlink: bool) -> None:
        for sock in self._socks.values():
            close(sock, unlink=unlink)
        self._socks.clear()
