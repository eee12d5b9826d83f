"""The DNS-peer parts that stand alone: the `[[upstream.peers]]` and resolver keys, this box's
interface addresses from the kernel, and the lookups (dnspython's stub resolver as resolver.py
sets it up) over real sockets: against a real dnsmasq (many records: TCP after a truncated UDP
answer, on the stdlib loop the master runs and on uvloop, without a thread; a dead and a silent
name server before a live one), and against a server of the test's own that forges answers."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop
from dnstest import DNSMASQ, FORGERIES, Dnsmasq, ForgingDNS
from support import free_port

from failproxy.config import ConfigError, loads, parse_address
from failproxy.discovery import netaddrs
from failproxy.discovery import resolver as dnsclient

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


# -- the lookups ----------------------------------------------------------------------------------

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], loop: str = "asyncio") -> T:
    """`coro` on a new loop: the stdlib one (the master's) or uvloop's."""
    factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


@pytest.fixture
def dnsmasq(tmp_path: Path) -> Iterator[Dnsmasq]:
    if DNSMASQ is None:
        pytest.skip("dnsmasq is not installed (Debian package dnsmasq-base)")
    server = Dnsmasq(tmp_path / "dns", "127.0.0.53", free_port("127.0.0.53"))
    server.start()
    yield server
    server.stop()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_resolve_many_records_over_tcp_after_truncation(dnsmasq: Dnsmasq, loop: str) -> None:
    many = [f"10.1.{i // 250}.{i % 250 + 1}" for i in range(150)]  # > 1232 bytes over UDP
    dnsmasq.set_records([(ip, "many.test") for ip in many] + [("fd00::9", "many.test")])

    async def lookup() -> tuple[list[str], int, int]:
        before = threading.active_count()
        got = await dnsclient.resolve("many.test", [(dnsmasq.host, dnsmasq.port)], 2.0)
        return got, before, threading.active_count()

    got, threads_before, threads_after = run(lookup(), loop)
    # 150 A records (16 bytes each) cannot fit the 1232 bytes offered over UDP: getting all
    # of them means the truncated answer was asked again over TCP.
    assert got == [*sorted(many, key=lambda ip: tuple(map(int, ip.split(".")))), "fd00::9"]
    # The master forks: no resolver thread (an executor's getaddrinfo) may have been started.
    assert threads_after == threads_before


def test_resolve_moves_past_a_dead_and_a_silent_name_server(dnsmasq: Dnsmasq) -> None:
    """A server that is gone and one that never answers each cost one `timeout`, then the next
    server answers; with no live server the lookup fails after one timeout per server, naming
    each; NXDOMAIN is an answer, not a reason to ask the next."""
    dnsmasq.set_records([("10.0.0.5", "one.test")])
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # bound, never answers
    silent.bind(("127.0.0.54", 0))
    dead = ("127.0.0.55", free_port("127.0.0.55"))  # nothing bound
    try:
        servers = [dead, silent.getsockname(), (dnsmasq.host, dnsmasq.port)]
        t0 = time.monotonic()
        assert run(dnsclient.resolve("one.test", servers, 0.3)) == ["10.0.0.5"]
        assert time.monotonic() - t0 < 2.0
        t0 = time.monotonic()
        with pytest.raises(dnsclient.DNSError) as info:
            run(dnsclient.resolve("one.test", servers[:2], 0.3))
        # One timeout per server (and a 0.1 s backoff), not dnspython's default 5 s lifetime.
        assert time.monotonic() - t0 < 1.5
        detail = str(info.value)
        assert detail.startswith("one.test: ") and "timed out" in detail
        for host, port in servers[:2]:
            assert f"{host}@{port}" in detail
        with pytest.raises(dnsclient.NoAddresses, match="NXDOMAIN"):
            run(dnsclient.resolve("none.test", servers[2:], 0.3))
    finally:
        silent.close()


def test_system_name_servers_from_resolv_conf(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("# comment\nsearch corp.example\nnameserver 10.0.0.2\nnameserver fd00::53\n")
    assert dnsclient.system_name_servers(str(conf)) == ["10.0.0.2", "fd00::53"]
    resolver = dnsclient.make_resolver([], 0.5, str(conf))
    assert resolver.search == [] and resolver.lifetime == 1.0  # the search line is not used
    conf.write_text("search corp.example\n")
    assert dnsclient.system_name_servers(str(conf)) == ["127.0.0.1"]  # none listed: as libc
    assert dnsclient.system_name_servers(str(tmp_path / "missing")) == ["127.0.0.1"]


@pytest.fixture
def forging() -> Iterator[ForgingDNS]:
    server = ForgingDNS("127.0.0.56", "127.0.0.57", forged="127.0.0.66")
    yield server
    server.stop()


@pytest.mark.parametrize("kind", ["question", "id", "source"])
def test_a_forged_answer_is_ignored_and_the_genuine_one_taken(forging: ForgingDNS,
                                                              kind: str) -> None:
    """A forgery that arrives first, with another question, another ID or from another address,
    is not taken for the answer: the genuine answer behind it is."""
    forging.set(kind, then_genuine=True, records={"app.test": ["127.0.0.7", "127.0.0.8"]})
    got = run(dnsclient.resolve("app.test", [forging.server], 1.0))
    assert got == ["127.0.0.7", "127.0.0.8"]
    assert forging.sent[kind] >= 1  # a forgery was sent, before the genuine answer


@pytest.mark.parametrize("kind", FORGERIES)
def test_a_forged_answer_alone_gives_no_address(forging: ForgingDNS, kind: str) -> None:
    """With only forgeries coming back the lookup fails (the caller keeps its last list); a
    record owned by another name is not taken even in an answer to our very question."""
    forging.set(kind, then_genuine=kind == "owner", records={"app.test": ["127.0.0.7"]})
    with pytest.raises(dnsclient.DNSError) as info:
        run(dnsclient.resolve("app.test", [forging.server], 0.3))
    assert "127.0.0.66" not in str(info.value)
    if kind == "owner":
        assert isinstance(info.value, dnsclient.NoAddresses)
        assert str(info.value) == "app.test: no A or AAAA records"
    else:
        assert "timed out" in str(info.value)
    assert forging.sent[kind] >= 1
