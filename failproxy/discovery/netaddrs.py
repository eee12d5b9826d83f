"""This box's own addresses, read from the kernel: rtnetlink's RTM_GETADDR dump (the table
`ip addr` prints), with the standard library only.

"Local" here means *assigned to an interface*, not "the kernel would accept it": on Linux all of
127.0.0.0/8 is routed to `lo` (its `local` route), but only the addresses an interface holds
identify a box. Loopback addresses (127.0.0.0/8, ::1) are every box's, so they never tell boxes
apart; `own_addresses` leaves them out, and link-local ones (fe80::/10, 169.254/16: no DNS
record names them).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct

RTM_NEWADDR = 20
RTM_GETADDR = 22
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_LABEL = 3
_NLMSG = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_RTATTR = struct.Struct("=HH")  # len, type


def _align(n: int) -> int:
    return (n + 3) & ~3


def interface_addresses() -> list[tuple[str, str]]:
    """Every (address, interface name) the kernel has assigned, loopback ones included.

    Raises OSError when rtnetlink cannot be read (not Linux, or a seccomp filter).
    """
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    try:
        sock.settimeout(2.0)
        sock.bind((0, 0))
        seq = os.getpid() & 0x7FFFFFFF
        body = _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        header = _NLMSG.pack(_NLMSG.size + len(body), RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP,
                             seq, 0)
        sock.send(header + body)
        out: list[tuple[str, str]] = []
        while True:
            data = sock.recv(65536)
            pos = 0
            while pos + _NLMSG.size <= len(data):
                length, kind, _flags, _seq, _pid = _NLMSG.unpack_from(data, pos)
                if length < _NLMSG.size:
                    return out
                if kind == NLMSG_DONE:
                    return out
                if kind == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", data, pos + _NLMSG.size)
                    raise OSError(-code, os.strerror(-code))
                if kind == RTM_NEWADDR:
                    found = _parse_addr(data[pos + _NLMSG.size : pos + length])
                    if found is not None:
                        out.append(found)
                pos += _align(length)
    finally:
        sock.close()


def _parse_addr(msg: bytes) -> tuple[str, str] | None:
    family, _prefix, _flags, _scope, index = _IFADDRMSG.unpack_from(msg)
    pos = _IFADDRMSG.size
    attrs: dict[int, bytes] = {}
    while pos + _RTATTR.size <= len(msg):
        length, kind = _RTATTR.unpack_from(msg, pos)
        if length < _RTATTR.size:
            break
        attrs[kind] = msg[pos + _RTATTR.size : pos + length]
        pos += _align(length)
    # IFA_LOCAL is the interface's own address (IFA_ADDRESS is the far end on a point-to-point
    # link); IPv6 gives only IFA_ADDRESS.
    raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
    if raw is None or family not in (socket.AF_INET, socket.AF_INET6):
        return None
    address = socket.inet_ntop(family, raw)
    label = attrs.get(IFA_LABEL)
    if label is not None:
        name = label.split(b"\0", 1)[0].decode(errors="replace")
    else:
        try:
            name = socket.if_indextoname(index)
        except OSError:
            name = f"if{index}"
    return address, name


def own_addresses() -> dict[str, str]:
    """address -> interface name, for the addresses that can tell this box from another one
    (loopback left out); raises OSError as `interface_addresses`."""
    out: dict[str, str] = {}
    for address, name in interface_addresses():
        ip = ipaddress.ip_address(address)
        if not (ip.is_loopback or ip.is_link_local):
            out.setdefault(address, name)
    return out
