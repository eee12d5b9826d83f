"""The rules of DNS peers, without I/O: self detection, the max_peers window, metric slots that
pass from one address to another (every counter stays with its address), the peer table a worker
reads, and a worker context swapping its list between requests."""

from __future__ import annotations

import asyncio
import socket

from failproxy.config import loads, parse_address
from failproxy.discovery.peertable import PeerTable, PeerWatch, peer_upstream
from failproxy.discovery.watch import Discovery, find_self, window
from failproxy.proxy.context import WorkerContext
from failproxy.telemetry.metrics import Totals, WorkerMetrics, render

UNIX = "[[upstream.server]]\naddress = 'unix:/tmp/app.sock'\n"


# -- self, window ------------------------------------------------------------------------------


def test_find_self_first_local_backup_with_the_reason() -> None:
    backups = [parse_address(t) for t in ("10.0.0.1:80", "10.0.0.2:80", "[fd00::3]:80",
                                          "host.example:80")]
    got = find_self(backups, {"10.0.0.2": "eth0", "fd00::3": "eth1"})
    assert got.address == backups[1] and got.detected
    assert got.reason == ("10.0.0.2 is on interface eth0; also on this box, not taken as "
                          "self: [fd00::3]:80")
    none = find_self(backups, {"10.9.9.9": "eth0"})
    assert none.address is None and "no backup address" in none.reason
    broken = find_self(backups, None, "Operation not permitted")
    assert broken.address is None and "Operation not permitted" in broken.reason


def test_window_keeps_self_and_the_peers_after_it() -> None:
    ring = [f"10.0.0.{i}:80" for i in range(1, 7)]
    assert window(ring, None, 10) == ring
    assert window(ring, None, 3) == ring[:3]
    # self .5 and the two after it around the ring (.6, .1), sorted again
    assert window(ring, "10.0.0.5:80", 3) == ["10.0.0.1:80", "10.0.0.5:80", "10.0.0.6:80"]


# -- slots and metrics ---------------------------------------------------------------------------


def _discovery(max_peers: int = 2) -> Discovery:
    cfg = loads(UNIX + f"[[upstream.peers]]\ndns = 'a.test'\nport = 80\nmax_peers = {max_peers}\n")
    return Discovery(cfg)


def _answer(d: Discovery, *ips: str) -> None:
    d.entries[0].resolved = list(ips)
    d.update()


def test_slots_stay_with_their_address_and_pass_on_oldest_freed_first() -> None:
    d = _discovery(max_peers=2)
    reassigned: list[tuple[int, str | None]] = []
    d.on_reassign = lambda slot: reassigned.append((slot, d.owners[slot]))
    _answer(d, "10.0.0.1", "10.0.0.2")
    assert d.rows == [(1, "10.0.0.1:80", 0), (2, "10.0.0.2:80", 0)]
    _answer(d, "10.0.0.2")
    assert d.rows == [(2, "10.0.0.2:80", 0)] and d.owners[1] == "10.0.0.1:80"  # last owner kept
    assert reassigned == []
    _answer(d, "10.0.0.2", "10.0.0.3")  # no never-used slot left: .1's passes on, folded first
    assert reassigned == [(1, "10.0.0.1:80")]
    assert d.rows == [(2, "10.0.0.2:80", 0), (1, "10.0.0.3:80", 0)]  # in address order
    generation = d.table.generation
    _answer(d, "10.0.0.3", "10.0.0.2")  # same set: nothing published
    assert d.table.generation == generation


def test_a_slot_that_changes_address_keeps_every_counter_with_its_address() -> None:
    d = _discovery(max_peers=1)
    _answer(d, "10.0.0.1")
    worker = WorkerMetrics(d.n_slots)
    retired = Totals()
    base = None

    def totals() -> Totals:
        t = retired.copy()
        t.add(worker, d.owners, gauges=True, base=base)
        return t

    worker.upstream_request(1)
    worker.upstream_request(1)
    worker.failover(0, 1, 0)
    worker.connect_duration(1, 0.001)
    assert totals().server_requests["10.0.0.1:80"] == 2

    def fold(slot: int) -> None:
        nonlocal base
        base = retired.fold_server(worker, d.owners, slot, base)

    d.on_reassign = fold
    _answer(d, "10.0.0.2")  # the only slot passes from .1 to .2
    worker.upstream_request(1)
    worker.failover(0, 1, 0)
    t = totals()
    assert t.server_requests["10.0.0.1:80"] == 2 and t.server_requests["10.0.0.2:80"] == 1
    assert t.failovers[("unix:/tmp/app.sock", "10.0.0.1:80", "overloaded")] == 1
    assert t.failovers[("unix:/tmp/app.sock", "10.0.0.2:80", "overloaded")] == 1
    assert sum(t.connect["10.0.0.1:80"]) == 1 and sum(t.connect["10.0.0.2:80"]) == 0
    assert t.server_failovers["unix:/tmp/app.sock"] == 2
    page = render(t, ["unix:/tmp/app.sock", "10.0.0.2:80"], 1)
    assert 'failproxy_upstream_requests_total{upstream="10.0.0.1:80"} 2' in page
    assert 'failproxy_upstream_up{upstream="10.0.0.1:80"}' not in page
    worker.close()


# -- the table and a worker's swap ---------------------------------------------------------------


def test_peer_table_read_only_when_new() -> None:
    table = PeerTable(4)
    assert table.read() is None
    table.publish("10.0.0.1:80", [(1, "10.0.0.1:80", 0)])
    got = table.read()
    assert got is not None and got.generation == 1 and got.self_address == "10.0.0.1:80"
    assert got.rows == ((1, "10.0.0.1:80", 0),)
    assert table.read(known=1) is None
    table.publish(None, [])
    again = table.read(known=1)
    assert again is not None and again.generation == 2 and again.rows == ()
    table.close()


def test_worker_context_swaps_peers_between_requests() -> None:
    cfg = loads(UNIX + "[[upstream.peers]]\ndns = 'a.test'\nport = 80\nmax_conns = 3\n")
    loop = asyncio.new_event_loop()
    try:
        ctx = WorkerContext(cfg, WorkerMetrics(1 + 32), loop)
        table = PeerTable(33)
        watch = PeerWatch(table, cfg.upstream, ctx)
        assert watch.check() is None
        entry = cfg.upstream.peers[0]
        table.publish("10.0.0.2:80", [(1, "10.0.0.1:80", 0), (2, "10.0.0.2:80", 0),
                                      (3, "10.0.0.3:80", 0)])
        assert watch.check() == (["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"], [])
        assert [p.address for p in ctx.order] == ["unix:/tmp/app.sock", "10.0.0.3:80",
                                                  "10.0.0.1:80", "10.0.0.2:80"]
        kept = ctx.order[1]
        assert kept.index == 3 and kept.max_conns == 3 and kept.sockaddr == ("10.0.0.3", 80)
        held = ctx.order[2]  # an exchange in flight holds this one
        table.publish("10.0.0.2:80", [(2, "10.0.0.2:80", 0), (3, "10.0.0.3:80", 0),
                                      (4, "[fd00::4]:80", 0)])
        assert watch.check() == (["[fd00::4]:80"], ["10.0.0.1:80"])
        assert ctx.order[1] is kept  # its state and pool stay
        assert [p.address for p in ctx.order] == ["unix:/tmp/app.sock", "10.0.0.3:80",
                                                  "[fd00::4]:80", "10.0.0.2:80"]
        assert held.keepalive == 0  # its busy connections are not pooled again
        v6 = ctx.order[2]
        assert v6.family == socket.AF_INET6 and v6.sockaddr == ("fd00::4", 80)
        assert ctx.first is ctx.order[0]
        assert peer_upstream(entry, parse_address("10.0.0.9:80")).backup
        table.close()
    finally:
        loop.close()


