"""Shared-memory worker counters: what a forked worker writes, the master sums; promtool agrees."""

from __future__ import annotations

import os
import shutil
import subprocess
import timeit

import orjson
import pytest

from failproxy.routing.policy import REASON_INDEX
from failproxy.telemetry.metrics import BOARD_BYTES, DURATION_BUCKETS, Totals, WorkerMetrics, render

SPEC_METRICS = (
    "failproxy_requests_total", "failproxy_upstream_requests_total", "failproxy_failovers_total",
    "failproxy_upstream_exhausted_total", "failproxy_request_duration_seconds",
    "failproxy_upstream_connect_duration_seconds", "failproxy_connections_active",
    "failproxy_upstream_up", "failproxy_held_requests",
)
ADDRS = ["unix:/tmp/app.sock", "10.0.0.2:8080", "10.0.0.3:8080"]


def promtool_check(text: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian package prometheus) is not installed")
    proc = subprocess.run([promtool, "check", "metrics"], input=text.encode(),
                          capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample line, matched by name and labels (label order as rendered)."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        metric, _, rest = key.partition("{")
        if metric != name:
            continue
        got = dict(part.split("=", 1) for part in rest.rstrip("}").split(",") if part)
        if {k: v.strip('"') for k, v in got.items()} == labels:
            return float(value)
    raise AssertionError(f"no sample {name}{labels}")


def test_counts_written_in_a_forked_child_are_read_by_the_parent() -> None:
    m = WorkerMetrics(len(ADDRS))
    pid = os.fork()
    if pid == 0:  # the worker: only hot-path calls
        m.request(200, 0.002)
        m.request(502, 0.3)
        m.upstream_request(1)
        m.failover(0, 1, REASON_INDEX["missing"])
        m.failover(0, 1, REASON_INDEX["missing"])
        m.failover(1, 2, REASON_INDEX["refused"])
        m.exhausted()
        m.connect_duration(1, 0.0003)
        m.connection_opened()
        m.server_state(2, False, 3)
        m.ready()
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    assert m.is_ready()
    t = Totals()
    t.add(m, ADDRS, gauges=True)
    assert t.status == {200: 1, 502: 1}
    assert t.failovers[(ADDRS[0], ADDRS[1], "missing")] == 2
    assert t.failovers[(ADDRS[1], ADDRS[2], "refused")] == 1
    assert t.server_failovers[ADDRS[0]] == 2
    assert t.server_requests[ADDRS[1]] == 1
    assert t.exhausted == 1 and t.active == 1
    assert t.down[ADDRS[2]] == 1 and t.fails[ADDRS[2]] == 3
    assert sum(t.duration) == 2 and t.duration_sum == pytest.approx(0.302)
    m.close()


def test_retired_totals_keep_counters_monotonic_across_a_changed_server_list() -> None:
    retired = Totals()
    old = WorkerMetrics(2)
    old.upstream_request(1)
    old.connection_opened()
    retired.add(old, ["unix:/a", "h1:80"], gauges=False)  # reaped: gauges are dropped
    old.close()
    new = WorkerMetrics(2)  # reload swapped the order
    new.upstream_request(0)
    total = retired.copy()
    total.add(new, ["h1:80", "unix:/a"], gauges=True)
    assert total.server_requests["h1:80"] == 2
    assert total.active == 0
    assert retired.server_requests["h1:80"] == 1  # copy() did not alias


def test_page_is_valid_prometheus_text() -> None:
    m = WorkerMetrics(len(ADDRS))
    for status, duration in ((200, 0.0001), (200, 20.0), (404, 0.01), (504, 0.5)):
        m.request(status, duration)
    m.failover(0, 2, REASON_INDEX["overloaded"])
    m.connect_duration(2, 0.002)
    t = Totals()
    t.add(m, ADDRS, gauges=True)
    text = render(t, [*ADDRS, 'odd"name\\'], workers=2)
    promtool_check(text)
    for name in SPEC_METRICS:
        assert f"# TYPE {name} " in text and f"# HELP {name} " in text
    assert sample(text, "failproxy_requests_total", status="200") == 2
    assert sample(text, "failproxy_failovers_total", **{"from": ADDRS[0], "to": ADDRS[2]},
                  reason="overloaded") == 1
    assert sample(text, "failproxy_request_duration_seconds_bucket", le="+Inf") == 4
    assert sample(text, "failproxy_request_duration_seconds_bucket",
                  le=repr(DURATION_BUCKETS[0])) == 1
    assert sample(text, "failproxy_upstream_connect_duration_seconds_count", upstream=ADDRS[2]) == 1
    assert 'upstream="odd\\"name\\\\"' in text
    m.close()


def test_empty_page_is_valid() -> None:
    promtool_check(render(Totals(), [], workers=0))


def test_hot_path_costs_well_under_two_microseconds() -> None:
    m = WorkerMetrics(8)
    calls = {
        "request": lambda: m.request(200, 0.003),
        "failover": lambda: m.failover(0, 7, 2),
        "connect_duration": lambda: m.connect_duration(3, 0.0002),
        "upstream_request": lambda: m.upstream_request(5),
    }
    for name, call in calls.items():
        best = min(timeit.repeat(call, number=20000, repeat=5)) / 20000
        assert best < 2e-6, f"{name}: {best * 1e9:.0f} ns per call"
    m.close()


def test_closed_slot_no_longer_reports_ready() -> None:
    m = WorkerMetrics(1)
    m.ready()
    m.close()
    assert not m.is_ready()
    m.close()  # idempotent


def test_a_workers_counts_reach_shared_memory_once_per_loop_iteration() -> None:
    """Attached to a loop (as in a worker), the pure twin of the slot writer gathers changes in
    lists and writes them to shared memory at the end of the iteration: what the master reads is
    then exact. (The Cython twin writes each at once: tests/test_slot.py.)"""
    import asyncio

    from failproxy.telemetry.slot import SlotWriterPy

    async def main() -> None:
        m = WorkerMetrics(2, SlotWriterPy)
        m.attach(asyncio.get_running_loop())
        for _ in range(3):
            m.request(200, 0.003)
        m.upstream_request(1)
        m.connection_opened()
        m.connection_opened()
        m.connection_closed()
        q, d = m.snapshot()
        assert q[200] == 0 and d[0] == 0.0, "not written before the iteration ends"
        await asyncio.sleep(0)
        totals = Totals()
        totals.add(m, ["a", "b"], gauges=True)
        assert totals.status[200] == 3
        assert totals.duration_sum == pytest.approx(0.009)
        assert totals.server_requests["b"] == 1
        assert totals.active == 1
        m.request(504, 0.2)
        m.flush()  # what a stopping worker does last
        assert m.snapshot()[0][504] == 1
        m.close()

    asyncio.run(main())


def test_held_requests_is_a_gauge_of_live_workers_only() -> None:
    live, gone = WorkerMetrics(1), WorkerMetrics(1)
    live.held_requests(+1)
    live.held_requests(+1)
    live.held_requests(-1)
    gone.held_requests(+3)  # reaped while holding: its held requests went with it
    retired = Totals()
    retired.add(gone, ["a"], gauges=False)
    totals = retired.copy()
    totals.add(live, ["a"], gauges=True)
    assert totals.held == 1
    text = render(totals, ["a"], workers=1)
    promtool_check(text)
    assert "# HELP failproxy_held_requests Requests held in failproxy waiting for a free " \
           "worker (overflow policy).\n# TYPE failproxy_held_requests gauge" in text
    assert sample(text, "failproxy_held_requests") == 1
    assert sample(render(Totals(), [], workers=0), "failproxy_held_requests") == 0
    live.close()
    gone.close()


def learned_data(n_routes: int, route_len: int = 10) -> dict[str, object]:
    return {
        "upstreams": {"unix:/app.sock": {"concurrency": 4, "service_ms": 12.5}},
        "routes": [{"route": f"GET /r{i:0{route_len}d}", "class": "slow" if i < 3 else "fast",
                    "ms": 500.0 - i, "count": i + 1} for i in range(n_routes)],
    }


def test_board_round_trip_through_a_forked_worker() -> None:
    m = WorkerMetrics(1)
    assert m.read_learned() is None  # nothing published yet
    data = learned_data(5)
    pid = os.fork()
    if pid == 0:
        m.publish_learned(data)
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    assert m.read_learned() == data
    assert m.read_learned() == data  # unchanged: the same answer again
    m.publish_learned(learned_data(2))
    assert m.read_learned() == learned_data(2)
    m.close()
    assert m.read_learned() is None
    m.publish_learned(data)  # closed: nothing to write to, no error


def test_a_board_too_large_keeps_the_slowest_routes_as_valid_json() -> None:
    m = WorkerMetrics(1)
    data = learned_data(2000, route_len=60)
    assert len(orjson.dumps(data)) > BOARD_BYTES
    m.publish_learned(data)
    got = m.read_learned()
    assert got is not None
    assert got["upstreams"] == data["upstreams"]
    kept = got["routes"]
    assert 0 < len(kept) < 2000
    assert kept == data["routes"][: len(kept)]  # dropped from the end: the fastest
    assert len(orjson.dumps(got)) <= BOARD_BYTES - 16
    # nearly everything that fits is kept: one more route would not have
    assert len(orjson.dumps({**got, "routes": data["routes"][: len(kept) + 1]})) > BOARD_BYTES - 16
    m.close()


def test_a_board_read_during_a_write_gives_the_previous_blob_or_none() -> None:
    m = WorkerMetrics(1)
    first = learned_data(1)

    def half_written() -> None:
        """A writer stopped mid-write: sequence odd, length and bytes of something else."""
        m._bq[0] += 1
        m._bq[1] = 40
        m._bb[:40] = b'{"upstreams": {"x": {"concurr' + b"\xff" * 11

    half_written()
    assert m.read_learned() is None  # never read a whole one yet
    m._bq[0] += 1  # (the writer finishes, here with a blob that is not whole JSON)
    assert m.read_learned() is None  # never garbage, never an exception
    m.publish_learned(first)
    assert m.read_learned() == first
    half_written()
    assert m.read_learned() == first
    m.close()


def test_a_reader_racing_a_writer_never_sees_a_torn_board() -> None:
    """A forked writer publishes two blobs of different sizes in a tight loop; every read in
    the parent meanwhile is one of them (or None before the first)."""
    m = WorkerMetrics(1)
    blobs = [learned_data(3), learned_data(300, route_len=40)]
    pid = os.fork()
    if pid == 0:
        for i in range(20000):
            m.publish_learned(blobs[i % 2])
        os._exit(0)
    while True:
        done = os.waitpid(pid, os.WNOHANG)[0] == pid
        got = m.read_learned()
        assert got is None or got in blobs
        if done:
            break
    assert m.read_learned() == blobs[1]  # the last one written
    m.close()
