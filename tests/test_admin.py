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
        assert st["upstreams"] == [
            {"address": missing, "backup": False, "state": "up", "fails": 0, "requests": 0,
             "failovers": 3},
            {"address": app.address, "backup": True, "state": "up", "fails": 0, "requests": 3,
             "failovers": 0},
        ]
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
