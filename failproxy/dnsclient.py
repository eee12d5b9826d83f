"""A small DNS stub resolver on the asyncio loop: A and AAAA records of one name, nothing else.

Why not getaddrinfo: the master resolves on its own event loop, and `loop.getaddrinfo` runs the
blocking call in a thread pool; the master forks workers, and a fork while another thread holds a
libc resolver or malloc lock can leave the child deadlocked (master.py keeps one thread for this
reason). So the queries are sent here, on the loop's own sockets: UDP with EDNS0 (a 1232-byte
answer, RFC 9715's safe size), TCP when an answer comes back truncated (RFC 7766), each name
server in turn. As nginx's `resolver` does, the name is looked up as written (no search list,
no /etc/hosts) and the name servers are the configured ones, else /etc/resolv.conf's.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import struct
from collections.abc import Sequence

TYPE_A = 1
TYPE_CNAME = 5
TYPE_AAAA = 28
TYPE_OPT = 41
CLASS_IN = 1
EDNS_PAYLOAD = 1232
RCODES = {1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}
RESOLV_CONF = "/etc/resolv.conf"
_HEADER = struct.Struct("!HHHHHH")
_RR = struct.Struct("!HHIH")


class DNSError(Exception):
    """A lookup that gave no usable answer; the message says why (as logged in `detail`)."""


class NoAddresses(DNSError):
    """The name exists but has no A/AAAA records, or does not exist (NXDOMAIN)."""


def system_name_servers(path: str = RESOLV_CONF) -> list[tuple[str, int]]:
    """The `nameserver` lines of resolv.conf; none (or no file): 127.0.0.1, as libc does."""
    servers: list[tuple[str, int]] = []
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            host = parts[1].split("%", 1)[0]  # a link-local server's %scope is not kept
            with contextlib.suppress(ValueError):
                servers.append((str(ipaddress.ip_address(host)), 53))
    return servers or [("127.0.0.1", 53)]


# -- wire format (RFC 1035 4.1) ---------------------------------------------------------------


def encode_name(name: str) -> bytes:
    out = bytearray()
    for label in name.rstrip(".").split("."):
        raw = label.encode("idna") if not label.isascii() else label.encode()
        if not 0 < len(raw) < 64:
            raise DNSError(f"{name!r} is not a valid DNS name")
        out += bytes([len(raw)]) + raw
    return bytes(out) + b"\0"


def build_query(qid: int, name: str, qtype: int) -> bytes:
    """A recursive query for `name`/`qtype` with an EDNS0 OPT record offering EDNS_PAYLOAD."""
    header = _HEADER.pack(qid, 0x0100, 1, 0, 0, 1)  # RD; one question, one additional (OPT)
    question = encode_name(name) + struct.pack("!HH", qtype, CLASS_IN)
    opt = b"\0" + _RR.pack(TYPE_OPT, EDNS_PAYLOAD, 0, 0)
    return header + question + opt


def _skip_name(msg: bytes, pos: int) -> int:
    """The offset just past the (possibly compressed) name at `pos`."""
    while True:
        if pos >= len(msg):
            raise DNSError("malformed answer: a name runs past the end")
        length = msg[pos]
        if length & 0xC0 == 0xC0:
            if pos + 2 > len(msg):
                raise DNSError("malformed answer: a cut compression pointer")
            return pos + 2
        if length & 0xC0:
            raise DNSError("malformed answer: unknown label type")
        pos += 1 + length
        if length == 0:
            return pos


class Answer:
    """One parsed response: its rcode, whether it was truncated, and the addresses it gave."""

    __slots__ = ("addresses", "rcode", "truncated")

    def __init__(self, rcode: int, truncated: bool, addresses: list[str]) -> None:
        self.rcode = rcode
        self.truncated = truncated
        self.addresses = addresses


def parse_response(msg: bytes, qid: int, qtype: int) -> Answer | None:
    """The answer to query `qid`, or None when `msg` answers something else (ignored, as a
    stub resolver must: a stray or spoofed datagram is not an answer)."""
    if len(msg) < _HEADER.size:
        return None
    rid, flags, qdcount, ancount, _ns, _ar = _HEADER.unpack_from(msg)
    if rid != qid or not flags & 0x8000:
        return None
    rcode = flags & 0xF
    truncated = bool(flags & 0x0200)
    pos = _HEADER.size
    for _ in range(qdcount):
        pos = _skip_name(msg, pos) + 4
    addresses: list[str] = []
    for _ in range(ancount):
        pos = _skip_name(msg, pos)
        if pos + _RR.size > len(msg):
            if truncated:
                break
            raise DNSError("malformed answer: a record runs past the end")
        rtype, rclass, _ttl, rdlength = _RR.unpack_from(msg, pos)
        pos += _RR.size
        rdata = msg[pos : pos + rdlength]
        if len(rdata) != rdlength:
            if truncated:
                break
            raise DNSError("malformed answer: record data runs past the end")
        pos += rdlength
        # The answer section holds the name's records and its CNAME chain's: keep the type asked.
        if rclass != CLASS_IN or rtype != qtype:
            continue
        if rtype == TYPE_A and rdlength == 4:
            addresses.append(socket.inet_ntop(socket.AF_INET, rdata))
        elif rtype == TYPE_AAAA and rdlength == 16:
            addresses.append(socket.inet_ntop(socket.AF_INET6, rdata))
    return Answer(rcode, truncated, addresses)


# -- transport ----------------------------------------------------------------------------------


async def _udp(server: tuple[str, int], query: bytes, qid: int, qtype: int,
               timeout: float) -> Answer:
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        # Connected: the kernel drops datagrams from any other source, and a closed port
        # answers ECONNREFUSED at once (ICMP) instead of a timeout.
        sock.connect(server)
        await loop.sock_sendall(sock, query)
        async with asyncio.timeout(timeout):
            while True:
                msg = await loop.sock_recv(sock, 65535)
                answer = parse_response(msg, qid, qtype)
                if answer is not None:
                    return answer
    finally:
        sock.close()


async def _tcp(server: tuple[str, int], query: bytes, qid: int, qtype: int,
               timeout: float) -> Answer:
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(server[0], server[1])
        try:
            writer.write(struct.pack("!H", len(query)) + query)
            await writer.drain()
            (length,) = struct.unpack("!H", await reader.readexactly(2))
            msg = await reader.readexactly(length)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    answer = parse_response(msg, qid, qtype)
    if answer is None:
        raise DNSError("the TCP answer does not match the query")
    return answer


def _where(server: tuple[str, int]) -> str:
    host, port = server
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def query(name: str, qtype: int, servers: Sequence[tuple[str, int]],
                timeout: float) -> list[str]:
    """The addresses of one record type: each server in turn until one answers (NOERROR or
    NXDOMAIN are answers; a timeout, a refusal, SERVFAIL or REFUSED move on to the next)."""
    errors: list[str] = []
    for server in servers:
        qid = int.from_bytes(os.urandom(2), "big")
        packet = build_query(qid, name, qtype)
        try:
            answer = await _udp(server, packet, qid, qtype, timeout)
            if answer.truncated:
                answer = await _tcp(server, packet, qid, qtype, timeout)
        except TimeoutError:
            errors.append(f"{_where(server)}: timed out after {timeout:g} s")
            continue
        except OSError as exc:
            errors.append(f"{_where(server)}: {exc.strerror or exc}")
            continue
        except (DNSError, EOFError, asyncio.IncompleteReadError) as exc:
            errors.append(f"{_where(server)}: {exc or type(exc).__name__}")
            continue
        if answer.rcode == 3:
            raise NoAddresses(f"{name}: NXDOMAIN (no such name) from {_where(server)}")
        if answer.rcode:
            errors.append(f"{_where(server)}: {RCODES.get(answer.rcode, answer.rcode)}")
            continue
        return answer.addresses
    raise DNSError(f"{name}: " + ("; ".join(errors) or "no name server"))


def address_key(address: str) -> tuple[int, bytes]:
    """Sort order of addresses: IPv4 first, then numerically."""
    ip = ipaddress.ip_address(address)
    return (ip.version, ip.packed)


async def resolve(name: str, servers: Sequence[tuple[str, int]], timeout: float) -> list[str]:
    """Every A and AAAA address of `name`, sorted (IPv4 first, then numerically).

    Both queries must succeed: when one fails the lookup fails (the caller keeps its last good
    list) rather than dropping the addresses of one family because one query was lost. No
    address at all is a failure too (`NoAddresses`).
    """
    results = await asyncio.gather(
        query(name, TYPE_A, servers, timeout),
        query(name, TYPE_AAAA, servers, timeout),
        return_exceptions=True,
    )
    found: set[str] = set()
    failures: list[BaseException] = []
    for result in results:
        if isinstance(result, BaseException):
            failures.append(result)
        else:
            found.update(result)
    for failure in failures:
        if not isinstance(failure, DNSError):
            raise failure
    hard = [f for f in failures if not isinstance(f, NoAddresses)]
    if hard:
        raise DNSError(str(hard[0]))
    if not found:
        if failures:
            raise failures[0]
        raise NoAddresses(f"{name}: no A or AAAA records")
    return sorted(found, key=address_key)
