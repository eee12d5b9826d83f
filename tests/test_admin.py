"""The admin endpoint of a real master (SPEC 7): figures summed over every worker, ever."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path
from typing import Any

import pytest
from support import free_port
from test_master import admin_get, get, rewrite, start_proxy, status, stopped, wait_until
from test_metrics import SPEC_METRICS, promtool_check, sample

import failproxy
from failproxy.process.master import MAX_ROUTES_SHOWN, merge_learned


def failovers(proxy: Any, src: str, dst: str, reason: str) -> float:
    code, body = admin_get(proxy, "/metrics")
    assert code == 200
    try:
        return sample(body.decode(), "failproxy_failovers_total",
                      **{"from": src, "to": dst}, reason=reason)
    except AssertionError:
        return 0


def test_healthz_status_and_metrics(tmp_path: Path, backend: Any, sockdir: Path) -> None:
    app = backend("app")
    missing = f"unix:{sockdir}/absent.sock"
    proxy = start_proxy(tmp_path, [missing, {"address": app.address, "backup": True}],
                        server={"workers": 2})
    try:
        assert admin_get(proxy, "/healthz") == (200, b"ok\n")
        for _ in range(3):
            assert get(proxy.port)[0] == 200
        st = status(proxy)
        assert st["version"] == failproxy.__version__ and st["pid"] == proxy.pid
        assert len(st["workers"]) == 2 and st["uptime"] > 0
        learned = ("concurrency", "service_ms")  # checked in test_status_shows_what_...
        assert [{k: v for k, v in u.items() if k not in learned} for u in st["upstreams"]] == [
            {"address": missing, "backup": False, "state": "up", "fails": 0, "requests": 0,
             "failovers": 3},
            {"address": app.address, "backup": True, "state": "up", "fails": 0, "requests": 3,
             "failovers": 0},
        ]
        assert all(key in u for u in st["upstreams"] for key in learned)
        assert isinstance(st["routes"], list)
        code, body = admin_get(proxy, "/metrics")
        assert code == 200
        text = body.decode()
        promtool_check(text)
        for name in SPEC_METRICS:
            assert f"# TYPE {name} " in text
        assert sample(text, "failproxy_requests_total", status="200") == 3
        assert sample(text, "failproxy_upstream_requests_total", upstream=app.address) == 3
        assert sample(text, "failproxy_upstream_up", upstream=missing) == 1
        assert admin_get(proxy, "/nope")[0] == 404
    finally:
        proxy.stop()


def test_failovers_total_counts_every_worker_and_survives_restarts(
        tmp_path: Path, backend: Any, sockdir: Path) -> None:
    app = backend("app")
    missing = f"unix:{sockdir}/absent.sock"
    proxy = start_proxy(tmp_path, [missing, {"address": app.address, "backup": True}],
                        server={"workers": 2})
    try:
        a, b = status(proxy)["workers"]
        with stopped(a):  # 7 requests through b
            assert [get(proxy.port)[0] for _ in range(7)] == [200] * 7
        with stopped(b):  # 5 through a
            assert [get(proxy.port)[0] for _ in range(5)] == [200] * 5
        assert failovers(proxy, missing, app.address, "missing") == 12
        assert status(proxy)["upstreams"][0]["failovers"] == 12
        _, body = admin_get(proxy, "/metrics")
        promtool_check(body.decode())

        os.kill(a, signal.SIGKILL)  # a's counts are folded in when it is reaped
        wait_until(lambda: a not in status(proxy)["workers"], 5)
        assert failovers(proxy, missing, app.address, "missing") == 12

        # A reload that reorders the servers: counters follow the addresses, not the indexes.
        since = proxy.log.mark()
        rewrite(proxy, [{"address": app.address}, missing])
        proxy.send_signal(signal.SIGHUP)
        proxy.log.wait_for_event("reloaded", since=since, timeout=10)
        assert get(proxy.port)[0] == 200
        wait_until(lambda: not status(proxy)["retiring"], 10)
        assert failovers(proxy, missing, app.address, "missing") == 12
        st = status(proxy)
        assert [u["address"] for u in st["upstreams"]] == [app.address, missing]
        assert st["upstreams"][0]["requests"] == 13
    finally:
        proxy.stop()


def test_status_reports_a_server_held_down(tmp_path: Path, sockdir: Path, backend: Any) -> None:
    app = backend("app")
    missing = f"unix:{sockdir}/absent.sock"
    proxy = start_proxy(tmp_path, [{"address": missing, "fail_timeout": 30.0},
                                   {"address": app.address, "backup": True}])
    try:
        assert get(proxy.port)[0] == 200
        up = status(proxy)["upstreams"][0]
        assert up["state"] == "down" and up["fails"] >= 1
        _, body = admin_get(proxy, "/metrics")
        assert sample(body.decode(), "failproxy_upstream_up", upstream=missing) == 0
    finally:
        proxy.stop()


def test_status_shows_what_the_workers_learned(tmp_path: Path, backend: Any) -> None:
    """SPEC 7: `concurrency` and `service_ms` on every upstream, `routes` merged over the
    workers (each publishes once a second: polled, never slept on)."""
    app = backend("app", unix=True)
    spare = backend("spare")
    proxy = start_proxy(tmp_path, [app, {"address": spare.address, "backup": True}],
                        server={"workers": 2})
    try:
        st = status(proxy)
        assert isinstance(st["routes"], list)
        for upstream in st["upstreams"]:
            assert "concurrency" in upstream and "service_ms" in upstream
        code, body = admin_get(proxy, "/metrics")
        assert code == 200
        promtool_check(body.decode())
        assert sample(body.decode(), "failproxy_held_requests") == 0  # idle

        answered = 0
        for i in range(1, 7):
            # Mostly "app"; the backup now and then: a worker reads its sibling's requests in
            # flight as the table holds them (at once in the compiled build, as of the sibling's
            # last loop turn end in the pure one: loadshare.py), and on a loaded box the sibling
            # that just answered may not have written it yet (W = 1 here).
            code, backend_name, _ = get(proxy.port, f"/items/{i}?page=2")
            assert code == 200 and backend_name in ("app", "spare")
            answered += 1

        def learned_route() -> dict[str, Any] | None:
            routes = status(proxy)["routes"]
            return next((r for r in routes if r["route"] == "GET /items/:id"
                         and r["count"] >= answered), None)

        route = wait_until(learned_route, 10, "GET /items/:id learned from every answer")
        assert route["class"] in ("slow", "fast") and route["ms"] >= 0
        st = status(proxy)
        assert len(st["routes"]) <= MAX_ROUTES_SHOWN
        assert [r["ms"] for r in st["routes"]] == sorted((r["ms"] for r in st["routes"]),
                                                         reverse=True)
        # The primary (a UNIX socket with a backup: the room policy) has learned figures.
        primary = wait_until(lambda: next(u for u in status(proxy)["upstreams"]
                                          if u["address"] == app.address
                                          and u["concurrency"] is not None), 10)
        assert isinstance(primary["concurrency"], int) and primary["concurrency"] >= 1
        assert primary["service_ms"] is None or primary["service_ms"] >= 0
        _, body = admin_get(proxy, "/metrics")
        assert sample(body.decode(), "failproxy_held_requests") == 0  # nothing held now
    finally:
        proxy.stop()


def test_merge_learned_over_workers() -> None:
    boards: list[dict[str, Any]] = [
        {"upstreams": {"a": {"concurrency": 2, "service_ms": 10.0},
                       "b": {"concurrency": 5, "service_ms": 1.0}},
         "routes": [{"route": "GET /slow", "class": "slow", "ms": 300.0, "count": 3},
                    {"route": "GET /tie", "class": "fast", "ms": 5.0, "count": 2},
                    {"route": "GET /x", "class": "fast", "ms": 1.0, "count": 1}]},
        {"upstreams": {"a": {"concurrency": 4, "service_ms": 20.0}},
         "routes": [{"route": "GET /slow", "class": "fast", "ms": 100.0, "count": 1},
                    {"route": "GET /tie", "class": "slow", "ms": 7.0, "count": 2}]},
        {},  # a worker that published nothing useful yet
    ]
    learned, routes = merge_learned(boards)
    assert learned == {"a": {"concurrency": 4, "service_ms": 15.0},
                       "b": {"concurrency": 5, "service_ms": 1.0}}
    assert routes == [
        {"route": "GET /slow", "class": "slow", "ms": 250.0, "count": 4},  # most count: slow
        {"route": "GET /tie", "class": "slow", "ms": 6.0, "count": 4},  # a tie: slow
        {"route": "GET /x", "class": "fast", "ms": 1.0, "count": 1},
    ]
    many = [{"routes": [{"route": f"GET /r{i}", "class": "fast", "ms": float(i), "count": 1}
                        for i in range(80)]}]
    _, top = merge_learned(many)
    assert [r["route"] for r in top] == [f"GET /r{i}" for i in range(79, 29, -1)]
    assert merge_learned([]) == ({}, [])


def test_hup_moves_the_admin_endpoint(tmp_path: Path, backend: Any) -> None:
    proxy = start_proxy(tmp_path, [backend("app")])
    try:
        old = proxy.admin_listen
        new = f"127.0.0.1:{free_port()}"
        since = proxy.log.mark()
        proxy.admin_listen = new
        rewrite(proxy)
        proxy.send_signal(signal.SIGHUP)
        proxy.log.wait_for_event("reloaded", since=since, timeout=10)
        assert admin_get(proxy, "/healthz") == (200, b"ok\n")
        host, port = old.split(":")
        with pytest.raises(OSError):
            socket.create_connection((host, int(port)), timeout=1).close()
    finally:
        proxy.stop()
