"""What failproxy learns, end to end (SPEC 4.3, 4.4): real unicorn, real peers, real sockets.

- A box whose one worker is busy for seconds, with two peers that each serve many requests at
  once: every request is answered by the peers, at once, none stranded waiting for the busy
  worker (before: a peer was assumed to have this box's worker count, the rest were held, and
  after hold_timeout sent home behind the busy worker).
- At capacity, with a route learned slow: fast requests that arrive while slow ones wait take
  the next free worker, before the waiting slow ones; no slow request is dropped.
- `routes.shed_after`: a slow-route request held that long gets 503 with Retry-After.
Orders of events are asserted, not durations, except where a duration is the point, and then
with a margin of several times what it should take.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from backends import HTTPBackend, Reply
from support import free_port
from test_unicorn import UNICORN, Unicorn

APP = """\
app = lambda do |env|
  path = env["PATH_INFO"]
  if path == "/busy"
    File.write("{dir}/busy.started", "1")
    sleep 20
  elsif path.start_with?("/reports/")
    File.write("{dir}/report.started", path)
    sleep {report_s}
  end
  [200, {{"Content-Type" => "text/plain"}}, ["pid=#{{Process.pid}} path=#{{path}}\\n"]]
end
run app
"""


def _get(port: int, path: str, out: list[tuple[str, float, bytes]]) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    out.append((path, time.monotonic(), data))


def _wait_file(path: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def _one_worker_box(sockdir: Path, report_s: float = 1.5) -> Unicorn:
    if UNICORN is None:
        pytest.skip("unicorn is not installed (Debian package `unicorn`; the Makefile installs it)")
    box = Unicorn(sockdir, workers=1, app=APP.format(dir=sockdir, report_s=report_s))
    box.wait_ready()
    return box


@pytest.fixture
def box(sockdir: Path) -> Iterator[Unicorn]:
    b = _one_worker_box(sockdir)
    try:
        yield b
    finally:
        b.stop()


@pytest.mark.shares
@pytest.mark.parametrize("learn", [True, False], ids=["routes-learned", "routes-not-learned"])
def test_peers_bigger_than_this_box_take_every_request_at_once(proxy, box, sockdir,
                                                               learn: bool) -> None:
    """Also with `routes.learn` off (and the slow route listed): each peer's answers are then
    read against its own service time.

    40 clients, 4 requests each, one after another: equal peers share them within 1.5x (the
    issue asked 2x). The first round is slow start, and its last step goes to the peer that
    answers first (the other is full), so a single burst splits unevenly by nature (40 at once
    split 13:27 once). Measured under two busy loops, 5 runs each: 1.16-1.50x when the first
    answer of the route taught the peer that gave it nothing (it started slow start a step
    behind); 1.00-1.16x with that fixed. That was too few runs: while each peer was weighed by
    its own slow-start limit, the one that got ahead took more from then on (each answer adds
    one to its limit), and under four busy loops at nice -5 98 runs split up to 1.81x (6 over
    1.5x, one in CI). Peers in slow start now share one size (Room._frontier): 60 runs
    1.00-1.25x, median 1.05x."""
    def answer(_req: Any) -> Reply:
        return Reply(200, headers=[("Content-Type", "text/plain")], body=b"peer\n", delay=0.05)

    def client(i: int) -> None:
        for k in range(rounds):
            _get(fp.port, f"/items/{i}{k}", out)

    peers = [HTTPBackend(name, handler=answer, backlog=256) for name in ("p1", "p2")]
    try:
        admin = free_port()
        fp = proxy([box.unix_address, *({"address": p.address, "backup": True} for p in peers),
                    {"address": box.tcp_address, "backup": True}],
                   upstream={"self": box.tcp_address, "read_timeout": 30.0},
                   admin={"listen": f"127.0.0.1:{admin}"},
                   # not learned: the operator says which route is slow
                   routes={"learn": True} if learn else {"learn": False, "slow": ["/busy"]})
        out: list[tuple[str, float, bytes]] = []
        busy = threading.Thread(target=_get, args=(fp.port, "/busy", out))
        busy.start()
        _wait_file(sockdir / "busy.started")  # the box's one worker is taken for 20 s
        n, rounds = 40, 4
        t0 = time.monotonic()
        fast = [threading.Thread(target=client, args=(i,)) for i in range(n)]
        for t in fast:
            t.start()
        for t in fast:
            t.join(30)
        answered = [(p, t, d) for p, t, d in out if p.startswith("/items/")]
        assert len(answered) == n * rounds
        wrong = [(p, d[-60:]) for p, _, d in answered if not d.endswith(b"peer\n")]
        assert not wrong and all(d.startswith(b"HTTP/1.1 200") for _, _, d in answered), wrong
        # while the box's worker is busy for 20 s, all were answered by the peers; each peer
        # takes 50 ms per request and serves them all at once: seconds would mean held and
        # sent home (hold_timeout is 2 s)
        took = max(t for _, t, _ in answered) - t0
        assert took < 10.0, f"{took:.1f} s"
        reqs = fp.log.wait_for_events("request", n * rounds, timeout=10)
        where = Counter(r["upstream"] for r in reqs if r["path"].startswith("/items/"))
        assert set(where) <= {p.address for p in peers}, where
        a, b = (where[p.address] for p in peers)
        assert max(a, b) <= 1.5 * min(a, b), where
        # what it learned, in /status: each peer takes more at once than this box's one worker
        deadline = time.monotonic() + 10
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/status", timeout=5) as r:
                ups = {u["address"]: u for u in json.load(r)["upstreams"]}
            if all(ups[p.address]["concurrency"] for p in peers) or time.monotonic() > deadline:
                break
            time.sleep(0.1)  # the workers publish what they learned once a second
        for p in peers:
            assert ups[p.address]["concurrency"] > 1, ups
            assert ups[p.address]["service_ms"] >= 50, ups
        assert ups[box.unix_address]["concurrency"] == 1
    finally:
        for p in peers:
            p.stop()


@pytest.mark.shares
def test_at_capacity_fast_requests_go_before_waiting_slow_ones(proxy, box, sockdir) -> None:
    fp = proxy([box.unix_address, {"address": box.tcp_address, "backup": True}],
               upstream={"self": box.tcp_address, "read_timeout": 30.0},
               routes={"slow_ms": 200.0})
    out: list[tuple[str, float, bytes]] = []
    _get(fp.port, "/reports/0", out)  # teaches failproxy that GET /reports/:id is slow
    learned = fp.log.wait_for_event("request", path="/reports/0")
    assert learned["route"] == "GET /reports/:id" and learned["upstream_ms"] > 200
    marker = sockdir / "report.started"
    marker.unlink()
    slow = [threading.Thread(target=_get, args=(fp.port, f"/reports/{i}", out))
            for i in (1, 2, 3)]
    slow[0].start()
    _wait_file(marker)  # the one worker serves a report for 1.5 s
    for t in slow[1:]:
        t.start()
    mark = fp.log.mark()
    fast = [threading.Thread(target=_get, args=(fp.port, f"/items/{i}", out)) for i in range(5)]
    for t in fast:
        t.start()
    for t in slow + fast:
        t.join(60)
    done = {p: t for p, t, _ in out}
    assert all(d.startswith(b"HTTP/1.1 200") for _, _, d in out), "nothing dropped"
    assert len(out) == 9
    # the next free worker went to the fast requests, though two reports had waited longer
    last_fast = max(done[f"/items/{i}"] for i in range(5))
    assert last_fast < min(done["/reports/2"], done["/reports/3"]), done
    reqs = {r["path"]: r for r in fp.log.wait_for_events("request", 8, timeout=10, since=mark)}
    for i in (2, 3):
        r = reqs[f"/reports/{i}"]
        assert r["upstream"] == box.unix_address, "held in failproxy, never queued in unicorn"
        assert r["held_ms"] is not None


def test_shed_after_answers_a_slow_route_held_that_long_503(proxy, box, sockdir) -> None:
    fp = proxy([box.unix_address, {"address": box.tcp_address, "backup": True}],
               upstream={"self": box.tcp_address, "read_timeout": 30.0},
               routes={"slow": ["/reports/"], "shed_after": 0.3})
    out: list[tuple[str, float, bytes]] = []
    first = threading.Thread(target=_get, args=(fp.port, "/reports/1", out))
    first.start()
    _wait_file(sockdir / "report.started")
    _get(fp.port, "/reports/2", out)  # held behind the first, then shed
    first.join(30)
    answers = dict((p, d) for p, _, d in out)
    assert answers["/reports/1"].startswith(b"HTTP/1.1 200")
    shed = answers["/reports/2"]
    assert shed.startswith(b"HTTP/1.1 503"), shed[:200]
    assert b"\r\nRetry-After: 1\r\n" in shed
    ev = fp.log.wait_for_event("shed", path="/reports/2")
    assert ev["route"] == "GET /reports/:id" and ev["held_ms"] >= 300
    req = fp.log.wait_for_event("request", path="/reports/2")
    assert req["status"] == 503 and req["upstream"] is None
