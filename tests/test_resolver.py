"""The DNS-peer parts that stand alone: the `[[upstream.peers]]` and resolver keys, this box's
interface addresses from the kernel, and the stub resolver: its wire format, and its transport
against a real dnsmasq (many records: TCP after a truncated UDP answer; a dead and a silent
name server before a live one)."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dnstest import DNSMASQ, Dnsmasq
from support import free_port

from failproxy import dnsclient, netaddrs
from failproxy.config import ConfigError, loads, parse_address

UNIX = "[[upstream.server]]\naddress = 'unix:/tmp/app.sock'\n"


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        loads(text)
    return info.value.problems


# -- config ----------------------------------------------------------------------------------


def test_peers_keys_and_defaults() -> None:
    cfg = loads(UNIX + "[[upstream.peers]]\ndns = 'app.internal'\nport = 8080\n")
    (entry,) = cfg.upstream.peers
    assert (entry.dns, entry.port, entry.resolve_interval, entry.max_peers) == (
        "app.internal", 8080, 5.0, 32)
    assert (entry.fail_timeout, entry.max_fails, entry.max_conns) == (0.0, 1, 0)
    assert cfg.upstream.resolver == () and cfg.upstream.resolver_timeout == 1.0


def test_peers_alone_are_enough_and_resolver_forms() -> None:
    cfg = loads("[upstream]\nresolver = ['10.0.0.2', '[::1]:5353', '127.0.0.1:8600']\n"
                "[[upstream.peers]]\ndns = 'web.service.consul'\nport = 80\n")
    assert [a.text for a in cfg.upstream.resolver] == ["10.0.0.2:53", "[::1]:5353",
                                                       "127.0.0.1:8600"]
    assert cfg.upstream.servers == ()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[[upstream.peers]]\ndns = 'a.b'\nport = 80\nresolve_intervall = 1.0\n",
         "upstream.peers[0].resolve_intervall: unknown key (did you mean resolve_interval?)"),
        ("[[upstream.peers]]\nport = 80\n", "upstream.peers[0].dns: required"),
        ("[[upstream.peers]]\ndns = 'a.b'\n", "upstream.peers[0].port: required"),
        ("[[upstream.peers]]\ndns = 'a.b'\nport = 0\n",
         "upstream.peers[0].port: must be a port number 1..65535, got 0"),
        ("[[upstream.peers]]\ndns = '10.0.0.1'\nport = 80\n",
         "upstream.peers[0].dns: '10.0.0.1' is an address, not a name: list it as an "
         "[[upstream.server]]"),
        ("[[upstream.peers]]\ndns = 'bad_name!'\nport = 80\n",
         "upstream.peers[0].dns: must be a host name, got 'bad_name!'"),
        ("[[upstream.peers]]\ndns = 'a.b'\nport = 80\nresolve_interval = 0.0\n",
         "upstream.peers[0].resolve_interval: must be a number of seconds >= 0.1, got 0.0"),
        ("[[upstream.peers]]\ndns = 'a.b'\nport = 80\nmax_peers = 0\n",
         "upstream.peers[0].max_peers: must be an integer >= 1, got 0"),
        ("[[upstream.peers]]\ndns = 'a.b'\nport = 80\nmax_queue = 1\n",
         "upstream.peers[0].max_queue: unknown key (did you mean max_peers?)"),
        ("[[upstream.peers]]\ndns = 'a.b'\nport = 80\n[[upstream.peers]]\ndns = 'A.b.'\n"
         "port = 80\n", "upstream.peers[1].dns: A.b. port 80 duplicates upstream.peers[0]"),
        ("[[upstream.peers]]\ndns = 'a.b'\nport = 80\nmax_peers = 300\n",
         "upstream.peers: 1 servers and max_peers adding up to 301: at most 256"),
        ("[upstream]\nresolver = ['ns.example:53']\n[[upstream.peers]]\ndns = 'a.b'\nport = 80\n",
         "upstream.resolver[0]: a name server is an IP address (IP or IP:PORT), got "
         "'ns.example:53'"),
        ("[upstream]\nself = '10.0.0.1:81'\n[[upstream.peers]]\ndns = 'a.b'\nport = 80\n",
         "upstream.self: 10.0.0.1:81 matches no upstream.server address"),
    ],
)  # fmt: skip
def test_peers_problems_name_the_key_path(text: str, problem: str) -> None:
    assert problem in problems(UNIX + text)


def test_self_may_name_an_address_from_dns() -> None:
    cfg = loads(UNIX + "[upstream]\nself = '10.0.0.1:80'\n"
                "[[upstream.peers]]\ndns = 'a.b'\nport = 80\n")
    assert cfg.upstream.self == parse_address("10.0.0.1:80")


# -- this box's addresses -------------------------------------------------------------------


def test_own_addresses_leave_loopback_out() -> None:
    everything = dict(netaddrs.interface_addresses())
    assert everything.get("127.0.0.1") == "lo"  # read from the kernel, loopback included
    own = netaddrs.own_addresses()
    assert "127.0.0.1" not in own and "::1" not in own
    assert set(own) <= set(everything)


# -- the stub resolver ----------------------------------------------------------------------------


def _name(*labels: bytes) -> bytes:
    return b"".join(bytes([len(x)]) + x for x in labels) + b"\0"


def test_parse_response_follows_compression_and_keeps_the_type_asked() -> None:
    qid = 0x1234
    question = _name(b"www", b"example", b"test") + struct.pack("!HH", 1, 1)
    cname = b"\xc0\x0c" + struct.pack("!HHIH", 5, 1, 60, 6) + _name(b"app")[:-1] + b"\xc0\x10"
    a1 = b"\xc0\x2b" + struct.pack("!HHIH", 1, 1, 60, 4) + socket.inet_aton("10.0.0.7")
    aaaa = b"\xc0\x2b" + struct.pack("!HHIH", 28, 1, 60, 16) + socket.inet_pton(
        socket.AF_INET6, "fd00::1")
    msg = struct.pack("!HHHHHH", qid, 0x8180, 1, 3, 0, 0) + question + cname + a1 + aaaa
    got = dnsclient.parse_response(msg, qid, dnsclient.TYPE_A)
    assert got is not None and got.rcode == 0 and got.addresses == ["10.0.0.7"]
    assert dnsclient.parse_response(msg, qid + 1, dnsclient.TYPE_A) is None  # not ours
    with pytest.raises(dnsclient.DNSError, match="malformed"):
        dnsclient.parse_response(msg[:-3], qid, dnsclient.TYPE_A)
    query = dnsclient.build_query(7, "a.test", dnsclient.TYPE_AAAA)
    assert query[12:] == _name(b"a", b"test") + struct.pack("!HH", 28, 1) + (
        b"\0" + struct.pack("!HHIH", 41, 1232, 0, 0))


@pytest.fixture
def dnsmasq(tmp_path: Path) -> Iterator[Dnsmasq]:
    if DNSMASQ is None:
        pytest.skip("dnsmasq is not installed (Debian package dnsmasq-base)")
    server = Dnsmasq(tmp_path / "dns", "127.0.0.53", free_port("127.0.0.53"))
    server.start()
    yield server
    server.stop()


def test_resolve_many_records_over_tcp_after_truncation(dnsmasq: Dnsmasq) -> None:
    many = [f"10.1.{i // 250}.{i % 250 + 1}" for i in range(150)]  # > 1232 bytes over UDP
    dnsmasq.set_records([(ip, "many.test") for ip in many] + [("fd00::9", "many.test")])
    got = asyncio.run(dnsclient.resolve("many.test", [(dnsmasq.host, dnsmasq.port)], 2.0))
    # 150 A records (16 bytes each) cannot fit the 1232 bytes offered over UDP: getting all
    # of them means the truncated answer was asked again over TCP.
    assert got == [*sorted(many, key=lambda ip: tuple(map(int, ip.split(".")))), "fd00::9"]


def test_resolve_moves_past_a_dead_and_a_silent_name_server(dnsmasq: Dnsmasq) -> None:
    dnsmasq.set_records([("10.0.0.5", "one.test")])
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # bound, never answers
    silent.bind(("127.0.0.54", 0))
    dead = ("127.0.0.55", free_port("127.0.0.55"))  # nothing bound: ICMP refusal
    try:
        servers = [dead, silent.getsockname(), (dnsmasq.host, dnsmasq.port)]
        t0 = time.monotonic()
        got = asyncio.run(dnsclient.resolve("one.test", servers, 0.3))
        assert got == ["10.0.0.5"]
        assert time.monotonic() - t0 < 2.0
        with pytest.raises(dnsclient.DNSError) as info:
            asyncio.run(dnsclient.resolve("one.test", servers[:2], 0.3))
        assert "timed out after 0.3 s" in str(info.value)
        assert "refused" in str(info.value).lower()
        with pytest.raises(dnsclient.NoAddresses, match="NXDOMAIN"):
            asyncio.run(dnsclient.resolve("none.test", servers[2:], 0.3))
    finally:
        silent.close()
