"""Backups from DNS (`[[upstream.peers]]`), with a real dnsmasq whose records change mid-test
(or a name server of the test's own that forges answers), a real `failproxy serve`, and real
backends on their own 127.x addresses (all of 127.0.0.0/8 is bindable on Linux, so each "host"
has an address of its own and every peer the same port, as DNS peers have). Self detection
needs addresses that are on one box's interfaces and not on the others': those tests make two
network namespaces joined by a veth pair.

What each test proves is in its docstring. Every wait is for a logged event, never a sleep.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from backends import HTTPBackend, Reply
from dnstest import DNSMASQ, FORGERIES, Dnsmasq, ForgingDNS, Netns, can_make_netns, veth_pair
from support import REPO, Proxy, free_port

pytestmark = pytest.mark.skipif(
    DNSMASQ is None, reason="dnsmasq is not installed (Debian package dnsmasq-base; the "
    "Makefile installs it)")

INTERVAL = 0.2  # resolve_interval in these tests: a change is seen within ~0.2 s



def order_lines(stdout: str) -> list[str]:
    """`failproxy check` output less its last line, which names the overflow policy."""
    return [line for line in stdout.splitlines()
            if not line.startswith(("overflow: ", "routes: "))]

def _net() -> str:
    """A 127.A.B. prefix of this test's own, so concurrent runs do not share addresses."""
    return f"127.{random.randint(64, 250)}.{random.randint(1, 250)}."


@pytest.fixture
def net() -> str:
    return _net()


@pytest.fixture
def dns(tmp_path: Path, net: str) -> Iterator[Dnsmasq]:
    server = Dnsmasq(tmp_path / "dns", net + "53", free_port(net + "53"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def same_port_backends(net: str) -> Iterator[Callable[..., HTTPBackend]]:
    """`make(host_number, name)`: an HTTPBackend on NET.<n>, every one on the same port."""
    made: list[HTTPBackend] = []
    port = free_port(net + "200")

    def make(n: int, name: str, **kw: Any) -> HTTPBackend:
        b = HTTPBackend(name, f"{net}{n}:{port}", **kw)
        made.append(b)
        return b

    make.port = port  # type: ignore[attr-defined]
    yield make
    for b in made:
        b.stop()


def _start(proxy: Callable[..., Proxy], sockdir: Path, dns: Dnsmasq, name: str, port: int,
           **kw: Any) -> Proxy:
    """A proxy whose local app socket is missing (every request fails over to the backups)
    and whose backups come from `name` in `dns`."""
    peers = {"dns": name, "port": port, "resolve_interval": INTERVAL}
    peers.update(kw.pop("peers", {}))
    upstream = {"resolver": [dns.address], "resolver_timeout": 0.3}
    upstream.update(kw.pop("upstream", {}))
    return proxy([{"address": f"unix:{sockdir / 'app.sock'}"}], peers=[peers],
                 upstream=upstream, **kw)


def _applied(p: Proxy, since: int, **match: Any) -> dict[str, Any]:
    """The worker's `peers_applied`: it now serves with that list."""
    return p.log.wait_for_event("peers_applied", timeout=5.0, since=since, **match)


def _status(p: Proxy, admin_port: int) -> dict[str, Any]:
    with socket.create_connection(("127.0.0.1", admin_port), timeout=5) as s:
        s.sendall(b"GET /status HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return json.loads(data.split(b"\r\n\r\n", 1)[1])


def _metrics(admin_port: int) -> str:
    with socket.create_connection(("127.0.0.1", admin_port), timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data.split(b"\r\n\r\n", 1)[1].decode()


def _sample(text: str, name: str, **labels: str) -> float:
    want = name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no {want} in /metrics")


def test_peers_follow_dns_added_removed_in_flight(
    proxy: Callable[..., Proxy], sockdir: Path, dns: Dnsmasq, net: str,
    same_port_backends: Callable[..., HTTPBackend],
) -> None:
    """A peer added to DNS takes the overflow after the next resolve; a removed one gets no new
    request, while the request already in flight to it still completes; `peers_changed` names
    what was added and removed; /status follows the list and /metrics keeps the removed
    address's counters."""
    port = same_port_backends.port  # type: ignore[attr-defined]
    name = "app.cluster.test"
    dead = f"{net}1:{port}"  # in DNS from the start, nothing listens: refused
    dns.set_records([(net + "1", name)])
    admin = free_port()
    p = _start(proxy, sockdir, dns, name, port, admin={"listen": f"127.0.0.1:{admin}"})
    _applied(p, 0, added=[dead])
    first = p.log.wait_for_event("peers_changed", dns=name)
    assert first["added"] == [dead] and first["removed"] == []
    assert p.request("GET", "/before").status == 502  # unix missing, the only peer refuses

    b2 = same_port_backends(2, "b2", handler=lambda r: Reply(
        200, headers=[("X-Backend", "b2")], body=b"b2", delay=1.5 if r.target == "/slow" else 0))
    mark = p.log.mark()
    dns.set_records([(net + "1", name), (net + "2", name)])
    changed = p.log.wait_for_event("peers_changed", since=mark, timeout=5.0)
    assert changed["added"] == [b2.address] and changed["removed"] == []
    assert changed["peers"] == [dead, b2.address]
    _applied(p, mark, added=[b2.address])
    r = p.request("GET", "/after-add")
    assert r.status == 200 and r.header("X-Backend") == "b2"
    ev = p.log.wait_for_event("request", path="/after-add")
    assert ev["upstreams"] == [f"unix:{sockdir / 'app.sock'}", dead, b2.address]

    # A slow request is in flight to b2 when DNS drops b2 for b3.
    slow = p.connect(timeout=10)
    slow.send(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    b2.wait_requests(2)
    b3 = same_port_backends(3, "b3")
    mark = p.log.mark()
    dns.set_records([(net + "1", name), (net + "3", name)])
    changed = p.log.wait_for_event("peers_changed", since=mark, timeout=5.0)
    assert changed["added"] == [b3.address] and changed["removed"] == [b2.address]
    _applied(p, mark, removed=[b2.address])
    for i in range(6):
        r = p.request("GET", f"/after-remove/{i}")
        assert r.status == 200 and r.header("X-Backend") == "b3"
    assert [q.target for q in b2.seen()] == ["/after-add", "/slow"]  # nothing new
    answer = slow.read_response(timeout=10)
    assert answer.status == 200 and answer.body == b"b2"  # the in-flight one finished
    slow.close()

    status = _status(p, admin)
    listed = [(u["address"], u.get("dns")) for u in status["upstreams"]]
    assert listed == [(f"unix:{sockdir / 'app.sock'}", None), (dead, name), (b3.address, name)]
    assert status["peers"][0]["addresses"] == [dead, b3.address]
    by_address = {u["address"]: u for u in status["upstreams"]}
    assert by_address[b3.address]["requests"] == 6
    text = _metrics(admin)
    # b2's counters outlive its removal (monotonic, keyed by address)
    assert _sample(text, "failproxy_upstream_requests_total", upstream=b2.address) == 2
    assert _sample(text, "failproxy_upstream_requests_total", upstream=b3.address) == 6
    assert f'failproxy_upstream_up{{upstream="{b2.address}"}}' not in text


def test_dns_down_or_empty_keeps_the_last_list(
    proxy: Callable[..., Proxy], sockdir: Path, dns: Dnsmasq, net: str,
    same_port_backends: Callable[..., HTTPBackend],
) -> None:
    """A name server that stops answering, and then one that answers NXDOMAIN, each log
    `resolve_failed` and keep the last good list: requests still reach the peer. When DNS
    answers again, the new list is taken."""
    port = same_port_backends.port  # type: ignore[attr-defined]
    name = "rr.cluster.test"
    b2 = same_port_backends(2, "b2")
    dns.set_records([(net + "2", name)])
    p = _start(proxy, sockdir, dns, name, port)
    _applied(p, 0, added=[b2.address])

    dns.stop()
    mark = p.log.mark()
    failed = p.log.wait_for_event("resolve_failed", since=mark)
    assert failed["kept"] == [b2.address] and failed["dns"] == name
    p.log.wait_for_event("resolve_failed", since=mark, failures=3)  # still failing, still kept
    r = p.request("GET", "/dns-down")
    assert r.status == 200 and r.header("X-Backend") == "b2"

    dns.start()
    dns.set_records([(net + "9", "other.test")])  # the name is gone: NXDOMAIN
    mark = p.log.mark()
    nx = p.log.wait_for_event("resolve_failed", since=mark,
                              detail=lambda d: "NXDOMAIN" in d)
    assert nx["kept"] == [b2.address]
    r = p.request("GET", "/nxdomain")
    assert r.status == 200 and r.header("X-Backend") == "b2"
    assert not p.log.find("peers_changed", since=mark)
    assert not p.log.find("peers_applied", since=mark)

    b3 = same_port_backends(3, "b3")
    dns.set_records([(net + "3", name)])
    changed = p.log.wait_for_event("peers_changed", since=mark, timeout=5.0)
    assert changed["added"] == [b3.address] and changed["removed"] == [b2.address]
    _applied(p, mark, added=[b3.address])
    r = p.request("GET", "/dns-back")
    assert r.status == 200 and r.header("X-Backend") == "b3"


def test_forged_answers_never_become_peers(
    proxy: Callable[..., Proxy], sockdir: Path, net: str,
    same_port_backends: Callable[..., HTTPBackend],
) -> None:
    """Issue 19: a forged DNS answer was taken for the peer list. A name server that answers
    with a forgery (another question, a record owned by another name, another ID, from another
    address) instead of the genuine answer gets `resolve_failed` and the last list kept, for
    every kind; one that sends the forgery before the genuine answer changes the list to the
    genuine one only. The forged address never reaches `peers_changed` or a worker."""
    port = same_port_backends.port  # type: ignore[attr-defined]
    name = "forged.cluster.test"
    forged = f"{net}66:{port}"  # nothing listens there
    server = ForgingDNS(net + "53", net + "54", forged=net + "66")
    try:
        server.set(None, records={name: [net + "2"]})
        b2 = same_port_backends(2, "b2")
        p = proxy([{"address": f"unix:{sockdir / 'app.sock'}"}],
                  peers=[{"dns": name, "port": port, "resolve_interval": INTERVAL}],
                  upstream={"resolver": [server.address], "resolver_timeout": 0.3})
        _applied(p, 0, added=[b2.address])

        for kind in FORGERIES:
            mark = p.log.mark()
            server.set(kind, then_genuine=kind == "owner")
            # The second failure since the switch came from a lookup begun after it.
            failed = p.log.wait_for_events("resolve_failed", 2, since=mark)[-1]
            assert server.sent[kind] >= 1
            assert failed["dns"] == name and failed["kept"] == [b2.address], kind
            assert not p.log.find("peers_changed", since=mark), kind
            r = p.request("GET", f"/forged-{kind}")
            assert r.status == 200 and r.header("X-Backend") == "b2"

        b3 = same_port_backends(3, "b3")
        mark = p.log.mark()
        server.set("question", then_genuine=True, records={name: [net + "3"]})
        changed = p.log.wait_for_event("peers_changed", since=mark, timeout=5.0)
        assert changed["added"] == [b3.address] and changed["removed"] == [b2.address]
        _applied(p, mark, added=[b3.address])
        r = p.request("GET", "/genuine")
        assert r.status == 200 and r.header("X-Backend") == "b3"
        for ev in p.log.find("peers_changed") + p.log.find("peers_applied"):
            assert forged not in [*ev.get("peers", ()), *ev["added"]], ev
    finally:
        server.stop()


def test_a_new_worker_starts_with_the_current_list(
    proxy: Callable[..., Proxy], sockdir: Path, dns: Dnsmasq, net: str,
    same_port_backends: Callable[..., HTTPBackend],
) -> None:
    """A worker that replaces one that died serves its very first request with the list the
    master holds now (read from the shared table before it accepts), not the list its config
    file names, and not after a first timer tick."""
    port = same_port_backends.port  # type: ignore[attr-defined]
    name = "late.cluster.test"
    dns.set_records([(net + "1", name)])  # refused
    p = _start(proxy, sockdir, dns, name, port, peers={"resolve_interval": 0.5})
    _applied(p, 0)
    b2 = same_port_backends(2, "b2")
    mark = p.log.mark()
    dns.set_records([(net + "2", name)])
    _applied(p, mark, added=[b2.address])
    (worker,) = p.serving_pids()
    mark = p.log.mark()
    os.kill(worker, signal.SIGKILL)
    started = p.log.wait_for_event("worker_started", since=mark)
    # Requests queue in the shared listen backlog until the new worker accepts: the first one
    # it answers must already go to b2.
    r = p.request("GET", "/first")
    assert r.status == 200 and r.header("X-Backend") == "b2"
    applied = p.log.find("peers_applied", since=mark, worker_pid=started["worker_pid"])
    assert applied and applied[0]["added"] == [b2.address]


def test_reload_keeps_the_list_and_takes_a_new_name(
    proxy: Callable[..., Proxy], sockdir: Path, dns: Dnsmasq, net: str,
    same_port_backends: Callable[..., HTTPBackend],
) -> None:
    """HUP: the new workers start with the last good answer of a name that stays (even while
    DNS is down), and a name added by the new config is resolved before they start."""
    port = same_port_backends.port  # type: ignore[attr-defined]
    b2 = same_port_backends(2, "b2")
    b3 = same_port_backends(3, "b3")
    dns.set_records([(net + "2", "old.test"), (net + "3", "new.test")])
    p = _start(proxy, sockdir, dns, "old.test", port)
    _applied(p, 0, added=[b2.address])
    dns.stop()
    p.log.wait_for_event("resolve_failed")
    mark = p.log.mark()
    p.send_signal(signal.SIGHUP)  # the same config: DNS is down, the list is kept
    p.log.wait_for_event("reloaded", since=mark)
    applied = p.log.wait_for_event("peers_applied", since=mark)
    assert applied["added"] == [b2.address]
    assert p.request("GET", "/kept").header("X-Backend") == "b2"

    dns.start()
    text = p.config_path.read_text().replace('dns = "old.test"', 'dns = "new.test"')
    p.config_path.write_text(text)
    mark = p.log.mark()
    p.send_signal(signal.SIGHUP)
    p.log.wait_for_event("reloaded", since=mark)
    changed = p.log.wait_for_event("peers_changed", since=mark)
    assert changed["dns"] == "new.test" and changed["added"] == [b3.address]
    assert p.request("GET", "/new").header("X-Backend") == "b3"


def test_several_entries_and_ipv6_sorted_and_deduplicated(
    proxy: Callable[..., Proxy], sockdir: Path, dns: Dnsmasq, net: str,
    same_port_backends: Callable[..., HTTPBackend],
) -> None:
    """A and AAAA records both become backups, sorted (IPv4 first); an address already listed
    is not repeated; `failproxy check` prints the order it resolved."""
    port = same_port_backends.port  # type: ignore[attr-defined]
    dns.set_records([(net + "3", "a.test"), (net + "2", "a.test"), ("::1", "a.test")])
    cfg = Proxy(sockdir / "check", [{"address": f"unix:{sockdir / 'app.sock'}"},
                                    {"address": f"{net}3:{port}", "backup": True}],
                upstream={"resolver": [dns.address]},
                peers=[{"dns": "a.test", "port": port}])
    out = subprocess.run([sys.executable, "-m", "failproxy", "check", str(cfg.config_path)],
                         capture_output=True, text=True, timeout=30,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert order_lines(out.stdout) == [
        "ok",
        f"1. unix:{sockdir / 'app.sock'} (primary)",
        f"2. {net}3:{port} (backup)",
        f"3. {net}2:{port} (backup, dns a.test)",
        f"4. [::1]:{port} (backup, dns a.test)",
        "no self: no backup address is on this box's interfaces",
    ]


# -- self, detected: two "boxes" in network namespaces of this test's own ------------------------

BOX = "198.51.100."  # RFC 5737 TEST-NET-2, only inside the namespaces made here


@pytest.fixture
def boxes() -> Iterator[tuple[Netns, Netns]]:
    """Namespace `one` holds 198.51.100.1 (this box); `others` holds .2 and .3 (two other
    boxes); a veth pair joins them."""
    why = can_make_netns()
    if why:
        pytest.skip(why)
    tag = f"{os.getpid() % 100000}{random.randint(0, 99)}"
    one, others = Netns(f"fp1-{tag}"), Netns(f"fp2-{tag}")
    try:
        veth_pair(one, f"fpa{tag}", others, f"fpb{tag}")
        one.run("addr", "add", BOX + "1/24", "dev", f"fpa{tag}")
        others.run("addr", "add", BOX + "2/24", "dev", f"fpb{tag}")
        others.run("addr", "add", BOX + "3/24", "dev", f"fpb{tag}")
        yield one, others
    finally:
        one.delete()
        others.delete()


def test_self_detected_from_the_interfaces_and_tried_last(
    tmp_path: Path, sockdir: Path, boxes: tuple[Netns, Netns],
) -> None:
    """With nothing but a DNS name in the config, each box finds its own address among the
    resolved peers from its interfaces and tries it last (`failproxy check` says which and
    why); on box 1 a request walks .2, .3 and then .1, its own."""
    one, others = boxes
    port = 8080
    dns = Dnsmasq(tmp_path / "dns", BOX + "1", 5353, netns=one.name)
    dns.start()
    backends: list[HTTPBackend] = []
    p = None
    try:
        name = "app.boxes.test"
        dns.set_records([(BOX + "1", name), (BOX + "2", name), (BOX + "3", name)])
        common = dict(upstream={"resolver": [dns.address]},
                      peers=[{"dns": name, "port": port, "resolve_interval": INTERVAL}])
        p = Proxy(tmp_path / "box1", [{"address": f"unix:{sockdir / 'app.sock'}"}],
                  command_prefix=one.exec_prefix(), socket_factory=one.socket, **common)
        # One config file for every box: `failproxy check` on box 1, and on box 2.
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        argv = [sys.executable, "-m", "failproxy", "check", str(p.config_path)]
        on_one = subprocess.run([*one.exec_prefix(), *argv], capture_output=True, text=True,
                                env=env, timeout=30)
        on_others = subprocess.run([*others.exec_prefix(), *argv], capture_output=True,
                                   text=True, env=env, timeout=30)
        assert on_one.returncode == 0, on_one.stderr
        veth_one = f"fpa{one.name.split('-')[1]}"
        veth_two = f"fpb{one.name.split('-')[1]}"
        assert order_lines(on_one.stdout)[2:] == [
            f"2. {BOX}2:{port} (backup, dns {name})",
            f"3. {BOX}3:{port} (backup, dns {name})",
            f"4. {BOX}1:{port} (backup, dns {name}, self: tried last; "
            f"{BOX}1 is on interface {veth_one})",
        ]
        # .2 and .3 are both on box 2's namespace: the first is taken, the other is named.
        assert order_lines(on_others.stdout)[2:] == [
            f"2. {BOX}3:{port} (backup, dns {name})",
            f"3. {BOX}1:{port} (backup, dns {name})",
            f"4. {BOX}2:{port} (backup, dns {name}, self: tried last; {BOX}2 is on interface "
            f"{veth_two}; also on this box, not taken as self: {BOX}3:{port})",
        ]

        # Box 1 serving: .2 and .3 refuse (nothing listens there), .1 is box 1's app.
        own = HTTPBackend("box1", f"{BOX}1:{port}", sock=one.socket())
        backends.append(own)
        p.start()
        detected = p.log.wait_for_event("self_detected")
        assert detected["address"] == f"{BOX}1:{port}" and detected["detected"] is True
        assert detected["reason"] == f"{BOX}1 is on interface {veth_one}"
        r = p.request("GET", "/walk")
        assert r.status == 200 and r.header("X-Backend") == "box1"
        ev = p.log.wait_for_event("request", path="/walk")
        assert ev["upstreams"] == [f"unix:{sockdir / 'app.sock'}", f"{BOX}2:{port}",
                                   f"{BOX}3:{port}", f"{BOX}1:{port}"]
        # Box 2's app comes up: box 1's overflow now goes there first, its own port last.
        two = HTTPBackend("box2", f"{BOX}2:{port}", sock=others.socket())
        backends.append(two)
        r = p.request("GET", "/ring")
        assert r.status == 200 and r.header("X-Backend") == "box2"
        assert [q.target for q in own.seen()] == ["/walk"]
    finally:
        if p is not None:
            p.stop()
        for b in backends:
            b.stop()
        dns.stop()


def test_explicit_self_wins_over_detection(
    tmp_path: Path, sockdir: Path, boxes: tuple[Netns, Netns],
) -> None:
    """`upstream.self` set explicitly is used as written, even where another backup is on an
    interface of this box."""
    one, _others = boxes
    port = 8080
    dns = Dnsmasq(tmp_path / "dns", BOX + "1", 5353, netns=one.name)
    dns.start()
    try:
        name = "app.boxes.test"
        dns.set_records([(BOX + "1", name), (BOX + "2", name), (BOX + "3", name)])
        p = Proxy(tmp_path / "box1", [{"address": f"unix:{sockdir / 'app.sock'}"}],
                  upstream={"resolver": [dns.address], "self": f"{BOX}2:{port}"},
                  peers=[{"dns": name, "port": port}])
        out = subprocess.run(
            [*one.exec_prefix(), sys.executable, "-m", "failproxy", "check",
             str(p.config_path)], capture_output=True, text=True, timeout=30,
            env={**os.environ, "PYTHONPATH": str(REPO)})
        assert out.returncode == 0, out.stderr
        assert order_lines(out.stdout)[2:] == [
            f"2. {BOX}3:{port} (backup, dns {name})",
            f"3. {BOX}1:{port} (backup, dns {name})",
            f"4. {BOX}2:{port} (backup, dns {name}, self: tried last)",
        ]
    finally:
        dns.stop()


def test_self_detected_among_listed_backups(tmp_path: Path, boxes: tuple[Netns, Netns]) -> None:
    """Without DNS too: with `self` unset, the listed backup on this box's interface is self
    (box 1 and box 2 read the same file); a loopback backup never is."""
    one, others = boxes
    listed = [{"address": "unix:/tmp/app.sock"}, *(
        {"address": f"{host}:8080", "backup": True}
        for host in (f"{BOX}1", "127.0.0.1", f"{BOX}2"))]
    p = Proxy(tmp_path / "listed", listed)
    argv = [sys.executable, "-m", "failproxy", "check", str(p.config_path)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    tag = one.name.split("-")[1]
    on_one = subprocess.run([*one.exec_prefix(), *argv], capture_output=True, text=True,
                            env=env, timeout=30)
    assert order_lines(on_one.stdout)[2:] == [
        "2. 127.0.0.1:8080 (backup)",
        f"3. {BOX}2:8080 (backup)",
        f"4. {BOX}1:8080 (backup, self: tried last; {BOX}1 is on interface fpa{tag})",
    ]
    on_others = subprocess.run([*others.exec_prefix(), *argv], capture_output=True, text=True,
                               env=env, timeout=30)
    assert order_lines(on_others.stdout)[2:] == [
        f"2. {BOX}1:8080 (backup)",
        "3. 127.0.0.1:8080 (backup)",
        f"4. {BOX}2:8080 (backup, self: tried last; {BOX}2 is on interface fpb{tag})",
    ]


