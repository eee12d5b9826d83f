"""How many connections wait in a UNIX listener's accept queue, read from the kernel.

Linux's sock_diag netlink interface reports, per listening AF_UNIX socket, the queued
connection count and the backlog (UNIX_DIAG_RQLEN): the way unicorn's author reads unicorn's
queue in the `raindrops` gem. Looking a listener up by path needs a dump of every listener, so
the path is resolved to the socket's inode once and later queries ask for that inode alone.
"""

from __future__ import annotations

import os
import socket
import struct

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
UDIAG_SHOW_NAME = 0x1
UDIAG_SHOW_RQLEN = 0x10
UNIX_DIAG_NAME = 0
UNIX_DIAG_RQLEN = 4
TCP_LISTEN = 10
NO_COOKIE = 0xFFFFFFFF

_NLMSGHDR = struct.Struct("=IHHII")
_REQ = struct.Struct("=BBHIIIII")
_MSG = struct.Struct("=BBBBIII")
_RTA = struct.Struct("=HH")
_RQLEN = struct.Struct("=II")


class QueueProbe:
    """Reads one UNIX listener's queue depth; `depth()` is None when it cannot be read."""

    __slots__ = ("_inode", "_path", "_seq", "_sock")

    def __init__(self, path: str) -> None:
        self._path = path
        self._inode = 0
        self._seq = 0
        self._sock: socket.socket | None = None

    def depth(self) -> int | None:
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
            if not self._inode:
                self._inode = self._find_inode()
                if not self._inode:
                    return None
            found = self._query(self._inode, dump=False)
            if found is None:
                # The app server restarted: a new socket has a new inode.
                self._inode = self._find_inode()
                if not self._inode:
                    return None
                found = self._query(self._inode, dump=False)
            return None if found is None else found[1]
        except OSError:
            return None

    def _find_inode(self) -> int:
        for inode, _queued, name in self._dump():
            if name == self._path:
                return inode
        return 0

    def _query(self, inode: int, dump: bool) -> tuple[int, int, str] | None:
        for entry in self._exchange(inode, dump):
            if entry[0] == inode:
                return entry
        return None

    def _dump(self) -> list[tuple[int, int, str]]:
        return self._exchange(0, True)

    def _exchange(self, inode: int, dump: bool) -> list[tuple[int, int, str]]:
        sock = self._sock
        assert sock is not None
        self._seq += 1
        flags = NLM_F_REQUEST | (NLM_F_DUMP if dump else 0)
        cookie = 0 if dump else NO_COOKIE
        req = _REQ.pack(
            socket.AF_UNIX,
            0,
            0,
            1 << TCP_LISTEN,
            inode,
            UDIAG_SHOW_NAME | UDIAG_SHOW_RQLEN,
            cookie,
            cookie,
        )
        sock.sendto(
            _NLMSGHDR.pack(_NLMSGHDR.size + len(req), SOCK_DIAG_BY_FAMILY, flags, self._seq, 0)
            + req,
            (0, 0),
        )
        out: list[tuple[int, int, str]] = []
        while True:
            data = sock.recv(65536)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
                if length < _NLMSGHDR.size:
                    return out
                if kind == NLMSG_DONE:
                    return out
                if kind == NLMSG_ERROR:
                    return out
                out.append(_parse(data, offset + _NLMSGHDR.size, offset + length))
                offset += (length + 3) & ~3
            if not dump:
                return out


def _parse(data: bytes, start: int, end: int) -> tuple[int, int, str]:
    _fam, _type, _state, _pad, inode, _c0, _c1 = _MSG.unpack_from(data, start)
    pos = start + _MSG.size
    queued = -1
    name = ""
    while pos + _RTA.size <= end:
        rta_len, rta_type = _RTA.unpack_from(data, pos)
        if rta_len < _RTA.size:
            break
        payload = data[pos + _RTA.size : pos + rta_len]
        if rta_type == UNIX_DIAG_RQLEN:
            queued = _RQLEN.unpack_from(payload)[0]
        elif rta_type == UNIX_DIAG_NAME:
            name = os.fsdecode(payload.split(b"\0", 1)[0]) if payload[:1] != b"\0" else ""
        pos += (rta_len + 3) & ~3
    return inode, queued, name
