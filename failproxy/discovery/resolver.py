"""The A and AAAA addresses of one peer name, asked with dnspython's asyncio stub resolver.

Why not getaddrinfo: the master resolves on its own event loop, and `loop.getaddrinfo` runs the
blocking call in a thread pool; the master forks workers, and a fork while another thread holds a
libc resolver or malloc lock can leave the child deadlocked (master.py keeps one thread for this
reason). dnspython's asyncio backend sends the queries on the loop's own sockets, and the name
servers are IP addresses, so nothing is looked up in a thread either.

Why dnspython and not our own wire format: an answer must be the answer to the query sent, or a
forged datagram becomes a peer. dnspython only takes a response from the address and port asked,
with the query's ID and the same question, and only the records owned by the name asked (or its
CNAME chain); anything else is ignored and the real answer, or the timeout, awaited.

The settings below are the ones nginx's `resolver` has, which the README promises: the name as
written (absolute: no search list, no /etc/hosts), no cache (`resolve_interval` decides when to
ask again, not the records' TTLs), EDNS0 offering 1232 bytes (RFC 9715's safe size) and TCP when
an answer is truncated, the configured name servers else resolv.conf's, re-read at every lookup.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Sequence

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

EDNS_PAYLOAD = 1232
RESOLV_CONF = "/etc/resolv.conf"


class DNSError(Exception):
    """A lookup that gave no usable answer; the message says why (as logged in `detail`)."""


class NoAddresses(DNSError):
    """The name exists but has no A/AAAA records, or does not exist (NXDOMAIN)."""


def system_name_servers(path: str = RESOLV_CONF) -> list[str]:
    """The `nameserver` lines of resolv.conf; none (or no file): 127.0.0.1, as libc does."""
    try:
        listed = dns.resolver.Resolver(filename=path).nameservers
    except dns.resolver.NoResolverConfiguration:
        return ["127.0.0.1"]
    return [str(ns) for ns in listed]


def make_resolver(servers: Sequence[tuple[str, int]], timeout: float,
                  path: str = RESOLV_CONF) -> dns.asyncresolver.Resolver:
    """A resolver asking `servers` (none: resolv.conf's), each in turn until one answers.

    `timeout` bounds one query to one name server; the lifetime of a lookup is one timeout per
    server, so a server that does not answer passes the question to the next and a lookup
    never waits longer than asking each of them once would.
    """
    resolver = dns.asyncresolver.Resolver(configure=False)
    try:
        if servers:
            resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port)
                                    for host, port in servers]
        else:
            resolver.nameservers = system_name_servers(path)
    except ValueError as exc:  # a resolv.conf line that is not an IP address
        raise DNSError(f"{path}: {exc}") from exc
    resolver.timeout = timeout
    resolver.lifetime = timeout * len(resolver.nameservers)
    resolver.use_edns(0, 0, EDNS_PAYLOAD)
    return resolver


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
    resolver = make_resolver(servers, timeout)
    try:
        qname = dns.name.from_text(name)  # absolute: no search list is ever applied
    except dns.exception.DNSException as exc:
        raise DNSError(f"{name}: {exc}") from exc
    results = await asyncio.gather(
        *(resolver.resolve(qname, rdtype, raise_on_no_answer=False)
          for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA)),
        return_exceptions=True,
    )
    found: set[str] = set()
    nxdomain = False
    for result in results:
        if isinstance(result, dns.resolver.NXDOMAIN):
            nxdomain = True
        elif isinstance(result, dns.exception.DNSException):
            raise DNSError(f"{name}: {result}") from result
        elif isinstance(result, BaseException):
            raise result
        else:
            found.update(str(ipaddress.ip_address(rdata.to_text())) for rdata in result)
    if not found:
        if nxdomain:
            raise NoAddresses(f"{name}: NXDOMAIN (no such name)")
        raise NoAddresses(f"{name}: no A or AAAA records")
    return sorted(found, key=address_key)
