"""The demo app server (real processes, real sockets), the demo's pieces in-process, and a short
`failproxy demo` run whose comparison table is read back and checked against itself."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import free_port

from failproxy import config
from failproxy.demo import cluster as demo
from failproxy.demo import demoapp
from failproxy.routing import routes

ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                     else "")
    return env


@dataclass
class App:
    proc: subprocess.Popen[bytes]
    sock_path: str
    port: int


@contextlib.contextmanager
def run_app(workers: int, *extra: str) -> Iterator[App]:
    tmp = tempfile.mkdtemp(prefix="fpdemo-")
    sock_path = os.path.join(tmp, "app.sock")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "failproxy.demo.demoapp", "--name", "t1", "--unix", sock_path,
         "--tcp", f"127.0.0.1:{port}", "--workers", str(workers), *extra],
        env=_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while True:
            assert proc.poll() is None, "demo app exited at start"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "demo app did not listen"
                time.sleep(0.05)
        yield App(proc, sock_path, port)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
        shutil.rmtree(tmp, ignore_errors=True)


def _unix(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    return s


def _tcp(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _exchange(sock: socket.socket, request: bytes) -> tuple[int, dict[str, str], bytes]:
    with sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split(" ")[1]), headers, body


def _accept_queue(path: str) -> int:
    """Connections waiting in the accept queue of the UNIX listener at `path` (ss's Recv-Q)."""
    out = subprocess.run(["ss", "-xlH", "src", path], capture_output=True, text=True,
                         check=True).stdout.split()
    return int(out[2])


def _wait_accept_queue_empty(path: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (queued := _accept_queue(path)) != 0:
        assert time.monotonic() < deadline, f"{queued} connections never accepted"
        time.sleep(0.02)


def _alive(pid: int) -> bool:
    """Running, and not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_serves_fast_and_echo_on_both_listeners() -> None:
    with run_app(workers=1) as app:
        status, headers, body = _exchange(_unix(app.sock_path),
                                          b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 200 and body == b"fast\n"
        assert headers["connection"] == "close"
        assert headers["x-served-via"] == "unix"
        name, pid = headers["x-served-by"].split("/")
        assert name == "t1" and int(pid) != app.proc.pid

        payload = bytes(range(256)) * 400
        status, headers, body = _exchange(
            _tcp(app.port),
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(payload)
            + payload)
        assert status == 200 and body == payload
        assert headers["x-served-via"] == "tcp"
        assert int(headers["content-length"]) == len(payload)

        status, _, body = _exchange(
            _unix(app.sock_path),
            b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
        assert status == 200 and body == b"abcde"

        status, _, _ = _exchange(_tcp(app.port), b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 404


def test_route_shaped_paths_reports_slow_items_fast() -> None:
    with run_app(1, "--slow-ms", "150") as app:
        start = time.monotonic()
        status, _, body = _exchange(_unix(app.sock_path),
                                    b"GET /reports/42 HTTP/1.1\r\nHost: x\r\n\r\n")
        took = time.monotonic() - start
        assert status == 200 and body == b"slow 150 ms\n"
        assert took >= 0.14, took
        # ?ms= still says how long, as on /slow; /slow keeps its 100 ms default.
        status, _, body = _exchange(_tcp(app.port),
                                    b"GET /reports/7?ms=20 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 200 and body == b"slow 20 ms\n"
        status, _, body = _exchange(_tcp(app.port), b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 200 and body == b"slow 100 ms\n"
        start = time.monotonic()
        status, _, body = _exchange(_unix(app.sock_path),
                                    b"GET /items/42 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 200 and body == b"fast\n"
        assert time.monotonic() - start < 0.1
        for path in (b"/reports/", b"/items/", b"/items"):
            status, _, _ = _exchange(_tcp(app.port),
                                     b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path)
            assert status == 404, path


def test_one_request_at_a_time_per_worker() -> None:
    with run_app(workers=1) as app:
        results: list[tuple[float, str]] = []

        def slow() -> None:
            _, headers, _ = _exchange(_unix(app.sock_path),
                                      b"GET /slow?ms=300 HTTP/1.1\r\nHost: x\r\n\r\n")
            results.append((time.monotonic(), headers["x-served-by"]))

        start = time.monotonic()
        threads = [threading.Thread(target=slow) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        finish = sorted(t - start for t, _ in results)
        assert len(finish) == 3
        # One worker: the three sleeps run one after another.
        assert finish[2] >= 0.85, finish
        assert len({by for _, by in results}) == 1

    with run_app(workers=2) as app:
        done: list[tuple[float, str]] = []

        def slow2() -> None:
            _, headers, _ = _exchange(_unix(app.sock_path),
                                      b"GET /slow?ms=600 HTTP/1.1\r\nHost: x\r\n\r\n")
            done.append((time.monotonic(), headers["x-served-by"]))

        threads = [threading.Thread(target=slow2) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        # Two workers: both requests in parallel, each on its own worker. One after the other,
        # the second answer would come at least 0.6 s (its whole sleep, on the server) after
        # the first, however loaded the machine; in parallel they come together.
        assert len(done) == 2 and len({by for _, by in done}) == 2, done
        (first, _), (second, _) = sorted(done)
        assert second - first < 0.3, (first, second)


def test_full_unix_backlog_gives_eagain_on_nonblocking_connect() -> None:
    with run_app(workers=2) as app:
        held: list[socket.socket] = []
        try:
            for _ in range(2):  # occupy both workers
                s = _unix(app.sock_path)
                s.sendall(b"GET /slow?ms=2000 HTTP/1.1\r\nHost: x\r\n\r\n")
                held.append(s)
            _wait_accept_queue_empty(app.sock_path)  # both workers took theirs
            queued = 0
            while True:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.setblocking(False)
                try:
                    s.connect(app.sock_path)
                except BlockingIOError as exc:
                    s.close()
                    assert exc.errno == errno.EAGAIN
                    break
                held.append(s)
                queued += 1
                assert queued <= 50, "the UNIX backlog never filled"
            # listen(5): the kernel queues backlog + 1 connections.
            assert queued == demoapp.UNIX_BACKLOG + 1
            # The TCP listener (backlog 1024) still takes connections.
            _tcp(app.port).close()
            # The first slow requests still complete.
            held[0].settimeout(5)
            assert held[0].recv(100).startswith(b"HTTP/1.1 200")
        finally:
            for s in held:
                s.close()


def _children(pid: int) -> list[str]:
    return subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)],
                          capture_output=True, text=True, check=False).stdout.split()


def test_term_stops_workers_and_removes_socket() -> None:
    with run_app(workers=2) as app:
        # the app listens before it forks its workers: wait for both (under load, make
        # test-stress once saw none yet)
        deadline = time.monotonic() + 10
        while len(worker_pids := _children(app.proc.pid)) < 2:
            assert time.monotonic() < deadline, f"workers: {worker_pids}"
            time.sleep(0.02)
        assert len(worker_pids) == 2
        os.kill(app.proc.pid, signal.SIGTERM)
        assert app.proc.wait(5) == 0
        assert not os.path.exists(app.sock_path)
        deadline = time.monotonic() + 10
        for pid in worker_pids:  # gone (a zombie not reaped yet still answers kill 0)
            while _alive(int(pid)):
                assert time.monotonic() < deadline, f"worker {pid} outlived its master"
                time.sleep(0.02)


def test_killed_worker_is_replaced() -> None:
    with run_app(workers=1) as app:
        _, headers, _ = _exchange(_unix(app.sock_path), b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\n")
        old = int(headers["x-served-by"].split("/")[1])
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while True:
            try:
                _, headers, _ = _exchange(_unix(app.sock_path),
                                          b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\n")
                new = int(headers["x-served-by"].split("/")[1])
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert new != old


# ---------------------------------------------------------------------------- the demo's pieces


def _hosts(tmp: str) -> list[demo.Host]:
    return [demo.Host(name=f"host{i}", ip=ip, app_port=9000 + i,
                      sock_path=os.path.join(tmp, f"host{i}.sock"),
                      app_err_path=os.path.join(tmp, f"host{i}.app.stderr"))
            for i, ip in enumerate(demo.HOST_IPS, 1)]


def _front(host: demo.Host, phase: demo.Phase, tmp: str, admin_port: int = 0) -> demo.Front:
    base = os.path.join(tmp, f"{host.name}.{phase.key}")
    if phase.kind == "nginx":
        return demo.Front(host=host, phase=phase, proxy_port=8000,
                          log_path=base + ".access.log", cfg_path=base + ".conf",
                          err_path=base + ".stderr", error_log=base + ".error.log")
    return demo.Front(host=host, phase=phase, proxy_port=8000, log_path=base + ".log",
                      cfg_path=base + ".toml", err_path=base + ".stderr", admin_port=admin_port)


def test_phase_configs_socket_only_then_failproxy_defaults(tmp_path: Path) -> None:
    hosts = _hosts(str(tmp_path))
    assert [p.key for p in demo.PHASES] == ["socket", "nginx", "failproxy"]
    socket_only, room = demo.SOCKET_ONLY, demo.FAILPROXY
    cfg = config.loads(demo._config_text(_front(hosts[0], socket_only, str(tmp_path)), hosts))
    assert [s.address.text for s in cfg.upstream.servers] == [f"unix:{hosts[0].sock_path}"]
    assert cfg.upstream.self is None
    assert cfg.admin.listen is None

    cfg = config.loads(demo._config_text(_front(hosts[1], room, str(tmp_path), 9181), hosts))
    # An admin listener, for the routes and figures it learned (GET /status).
    assert cfg.admin.listen is not None and cfg.admin.listen.text == f"{hosts[1].ip}:9181"
    servers = cfg.upstream.servers
    assert [s.address.text for s in servers] == [f"unix:{hosts[1].sock_path}"] + [
        h.app_tcp for h in hosts]
    assert [s.backup for s in servers] == [False, True, True, True]
    assert cfg.upstream.self is not None and cfg.upstream.self.text == hosts[1].app_tcp
    # Nothing tuned: the defaults, whatever they are, are what the demo shows.
    defaults = config.UpstreamConfig()
    assert (cfg.upstream.overflow, cfg.upstream.hold_timeout) == ("room", defaults.hold_timeout)
    assert cfg.upstream.overflow == defaults.overflow
    assert cfg.upstream.retry_on == defaults.retry_on


def test_same_seeded_schedule_each_phase() -> None:
    plan = demo._plan(300)
    assert plan == demo._plan(300)
    kinds = {i: [k for f, k, _ in plan if f == i] for i in range(3)}
    assert 0.6 < kinds[0].count("slow") / len(kinds[0]) < 0.95
    assert kinds[1].count("slow") == kinds[2].count("slow") == 0
    # Route-shaped: each kind on its own route, as failproxy's route learning keys them.
    method = {"slow": b"GET", "fast": b"GET", "echo": b"POST"}
    keys = {kind: {routes.route_key(method[kind], path.encode()) for _, k, path in plan
                   if k == kind} for kind in ("slow", "fast", "echo")}
    assert keys == {"slow": {demo.SLOW_ROUTE}, "fast": {"GET /items/:id"},
                    "echo": {"POST /echo"}}
    assert len({path for _, k, path in plan if k == "slow"}) > 50  # many ids, one route
    assert config.RoutesConfig().slow_ms < demo.SLOW_MS  # so it is learned slow


def test_nginx_config_is_the_seeds(tmp_path: Path) -> None:
    hosts = _hosts(str(tmp_path))
    for host in hosts:
        front = _front(host, demo.NGINX, str(tmp_path))
        text = demo.nginx_config_text(front, hosts)
        servers = re.findall(r"^\s*server (\S+)(.*);$", text, re.M)
        # The UNIX socket first, never marked down; then every app TCP port as a backup, in
        # the ring order failproxy uses with `self`: the box's own last.
        i = hosts.index(host)
        ring = hosts[i + 1:] + hosts[:i + 1]
        assert servers == [(f"unix:{host.sock_path}", " fail_timeout=0")] + [
            (h.app_tcp, " backup") for h in ring]
        assert servers[-1][0] == host.app_tcp
        assert "      proxy_pass http://app;" in text
        assert "      proxy_http_version 1.1;" in text
        assert "      proxy_next_upstream error timeout;" in text
        assert f"    listen {front.proxy_addr};" in text
        assert f"  access_log {front.log_path} demo;" in text
        assert "$upstream_addr" in text and "escape=json" in text
        # What the command line sets must not be in the file too (nginx: "is duplicate").
        for directive in ("daemon", "master_process", "worker_processes", "error_log", "pid"):
            assert not re.search(rf"^\s*{directive}\s", text, re.M), directive
        for line in text.splitlines():  # every temp path under the demo's temp dir
            if "_temp_path" in line:
                assert line.split()[1].startswith(str(tmp_path)), line
    assert demo.ring(hosts, hosts[1]) == [hosts[2], hosts[0], hosts[1]]

    front = _front(hosts[0], demo.NGINX, str(tmp_path))
    cmd = demo.nginx_command("/usr/sbin/nginx", front, str(tmp_path))
    assert cmd[:5] == ["/usr/sbin/nginx", "-p", f"{tmp_path}/", "-c", front.cfg_path]
    assert cmd[5] == "-g"
    assert cmd[6] == ("daemon off; master_process on; worker_processes 1; "
                      f"error_log {front.error_log}; pid {front.pid_path};")
    assert front.pid_path.startswith(str(tmp_path))
    assert front.tmp_dir.startswith(str(tmp_path))

    nginx = demo.find_nginx()
    if nginx is None:
        return
    # nginx itself takes it (as the current user, every path in the temp dir).
    Path(front.cfg_path).write_text(demo.nginx_config_text(front, hosts))
    os.makedirs(front.tmp_dir)
    check = subprocess.run([*demo.nginx_command(nginx, front, str(tmp_path)), "-t"],
                           capture_output=True, text=True, timeout=30, check=False)
    assert check.returncode == 0, check.stderr
    assert "syntax is ok" in check.stderr


def test_nginx_missing_skips_its_phase_and_says_how_to_get_it(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        tmp_path: Path) -> None:
    monkeypatch.setattr(demo.shutil, "which", lambda _name: None)
    monkeypatch.setattr(demo, "NGINX_FALLBACKS", ())
    assert demo.find_nginx() is None
    phases, message = demo.select_phases(None)
    assert phases == [demo.SOCKET_ONLY, demo.FAILPROXY]
    assert "apt-get install nginx-light" in message and "skipped" in message
    assert "\n" not in message

    # With it there: all three, nginx's between the other two, and nothing said.
    fake = tmp_path / "nginx"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setattr(demo, "NGINX_FALLBACKS", (str(fake),))
    assert demo.find_nginx() == str(fake)
    assert demo.select_phases(str(fake)) == ([demo.SOCKET_ONLY, demo.NGINX, demo.FAILPROXY], "")

    # main() says it once, first, and runs the other phases (a cluster that fails to start
    # here: no process is started by this test).
    monkeypatch.setattr(demo, "NGINX_FALLBACKS", ())
    made: list[list[demo.Phase]] = []

    class NoCluster:
        def __init__(self, phases: list[demo.Phase], nginx: str | None) -> None:
            assert nginx is None
            made.append(list(phases))
            self.hosts: list[demo.Host] = []

        def start(self) -> None:
            raise RuntimeError("not in this test")

        def close(self) -> None:
            pass

    monkeypatch.setattr(demo, "Cluster", NoCluster)
    assert demo.main(["--requests", "3", "--quiet"]) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[0] == demo.NGINX_MISSING
    assert out.count("apt-get install nginx-light") == 1
    assert "(UNIX socket only, failproxy)" in out
    assert made == [[demo.SOCKET_ONLY, demo.FAILPROXY]]


def test_learned_routes_printout_from_status(tmp_path: Path) -> None:
    hosts = _hosts(str(tmp_path))
    h1, h2, h3 = hosts
    status = {
        "version": "x", "pid": 1, "workers": [2],
        "routes": [
            {"route": "GET /reports/:id", "class": "slow", "ms": 301.26, "count": 160},
            {"route": "POST /echo", "class": "fast", "ms": 1.04, "count": 21},
            {"route": "GET /items/:id", "class": "fast", "ms": 0.91, "count": 19},
        ],
        "upstreams": [
            {"address": f"unix:{h1.sock_path}", "backup": False, "requests": 98,
             "concurrency": 2, "service_ms": 120.44},
            {"address": h2.app_tcp, "backup": True, "requests": 52, "concurrency": 5,
             "service_ms": 250.0},
            {"address": h3.app_tcp, "backup": True, "requests": 0, "concurrency": None,
             "service_ms": None},
        ],
    }
    text = demo.learned_section(status, demo._labels(hosts), "host1", "http://x/status")
    lines = text.splitlines()
    assert "what host1's failproxy learned" in text and "http://x/status" in text
    assert "routes.slow_ms = 200 ms" in text
    row = {line.split("  ")[2].strip(): line.split() for line in lines
           if line.startswith("    GET ") or line.startswith("    POST ")}
    assert row["GET /reports/:id"][-3:] == ["slow", "301.3", "160"]
    assert row["POST /echo"][-3:] == ["fast", "1.0", "21"]
    assert row["GET /items/:id"][-3:] == ["fast", "0.9", "19"]
    assert ("  learned slow: GET /reports/:id; fast: POST /echo, GET /items/:id" in text)
    ups = {" ".join(line.split()[:2]): line.split()[2:] for line in lines
           if line.startswith("    host")}
    assert ups == {"host1 unix": ["2", "120.4", "98"], "host2 tcp": ["5", "250.0", "52"],
                   "host3 tcp": ["-", "-", "0"]}
    # Nothing learned yet, or no /status at all: said so.
    empty = demo.learned_section({"routes": [], "upstreams": []}, {}, "host1", "w")
    assert "none learned" in empty
    assert "not read (http://x/status: timed out)" in demo.learned_section(
        None, {}, "host1", "http://x/status: timed out")


def test_log_tailer_reads_nginx_access_and_error_logs(tmp_path: Path) -> None:
    hosts = _hosts(str(tmp_path))
    fronts = [_front(h, demo.NGINX, str(tmp_path)) for h in hosts]
    h1, h2, h3 = hosts
    unix = f"unix:{h1.sock_path}"
    err = ('2026/12/04 07:32:50 [error] 16542#16542: *26 connect() to {addr} failed ({code}: '
           'Resource temporarily unavailable) while connecting to upstream, client: 127.0.0.1, '
           'server: , request: "{method} {uri} HTTP/1.1", upstream: "http://{addr}:{uri}", '
           'host: "127.0.1.1:47003"\n')
    Path(fronts[0].error_log).write_text(
        err.format(addr=unix, code=11, method="GET", uri="/reports/1")
        + err.format(addr=unix, code=11, method="POST", uri="/echo")
        + err.format(addr=unix, code=11, method="POST", uri="/echo")
        + err.format(addr=unix, code=111, method="GET", uri="/items/9")
        + err.format(addr=h2.app_tcp, code=111, method="GET", uri="/items/9")
        + err.format(addr=h3.app_tcp, code=111, method="GET", uri="/items/9")
        + err.format(addr=h1.app_tcp, code=111, method="GET", uri="/items/9")
        + "2026/12/04 07:32:50 [crit] 1#1: something else\n")
    access = [
        {"status": 200, "method": "GET", "uri": "/reports/1", "upstream": f"{unix}, {h2.app_tcp}"},
        {"status": 200, "method": "POST", "uri": "/echo", "upstream": f"{unix}, {h3.app_tcp}"},
        {"status": 200, "method": "GET", "uri": "/items/2", "upstream": unix},
        {"status": 200, "method": "GET", "uri": "/items/3", "upstream": h1.app_tcp},
        {"status": 502, "method": "GET", "uri": "/items/9",
         "upstream": f"{unix}, {h2.app_tcp}, {h3.app_tcp}, {h1.app_tcp}"},
    ]
    Path(fronts[0].log_path).write_text("".join(json.dumps({"event": "request", **a}) + "\n"
                                                for a in access))
    out_path = tmp_path / "out"
    with open(out_path, "w") as out:
        tailer = demo.LogTailer(fronts, out, False, time.monotonic())
        tailer.poll()
        tailer.stop()
    st = tailer.stats
    assert st.answered == {("host1", "host2 tcp"): 1, ("host1", "host3 tcp"): 1,
                           ("host1", "host1 unix"): 1, ("host1", "host1 tcp"): 1,
                           ("host1", demo.NONE): 1}
    # Each move to the next server, with the reason of the attempt that failed; /items/3 went
    # straight to a backup: nginx took the socket for down.
    assert st.failovers == {"overloaded": 2, "refused": 3, "skipped_down": 1}
    assert st.exhausted == 1
    assert st.routes[("host1 unix", "host2 tcp")] == 2
    assert st.routes[("host1 unix", "host1 tcp")] == 1
    # The other POST /echo's failed connect waits for its own access log line.
    assert st.pending == {("host1", "POST", "/echo"): ["overloaded EAGAIN"]}
    assert st.logged_requests == {"host1": 5}
    assert any("something else" in e for e in st.errors)
    printed = out_path.read_text()
    assert "host1 nginx  GET /reports/1  host1 unix -> host2 tcp  [overloaded EAGAIN]" in printed
    assert "host1 nginx  GET /items/3  host1 unix -> host1 tcp  [skipped_down]" in printed
    assert "host1 nginx  GET /items/9  every server failed ['refused'" in printed
    assert demo.nginx_attempt("2026/12/04 07:32:50 [error] 1#1: *2 upstream timed out (110: "
                              "Connection timed out) while reading response header from "
                              'upstream, client: 1.2.3.4, server: , request: "GET /a HTTP/1.1",'
                              ' upstream: "http://127.0.1.2:9/a", host: "h"') == (
        "timeout", "", "127.0.1.2:9", "GET", "/a")


def test_log_tailer_counts_and_prints_new_reasons(tmp_path: Path) -> None:
    hosts = _hosts(str(tmp_path))
    fronts = [_front(h, demo.FAILPROXY, str(tmp_path)) for h in hosts]
    h1, h2 = hosts[0], hosts[1]
    events: list[dict[str, object]] = [
        {"event": "failover", "method": "GET", "path": "/fast", "from": f"unix:{h1.sock_path}",
         "to": h2.app_tcp, "reason": "workers_busy", "errno": None, "elapsed_ms": 0.1},
        {"event": "failover", "method": "GET", "path": "/slow", "from": f"unix:{h1.sock_path}",
         "to": h2.app_tcp, "reason": "held", "errno": None, "elapsed_ms": 123.4},
        {"event": "failover", "method": "GET", "path": "/slow", "from": f"unix:{h1.sock_path}",
         "to": h1.app_tcp, "reason": "hold_timeout", "errno": None, "elapsed_ms": 2000.2},
        {"event": "request", "upstream": h2.app_tcp, "held_ms": None},
        {"event": "request", "upstream": h2.app_tcp, "held_ms": 123.4},
        {"event": "request", "upstream": h1.app_tcp, "held_ms": 2000.2},
        {"event": "request", "upstream": f"unix:{h1.sock_path}", "held_ms": None},
        {"event": "request", "upstream": None, "status": 502, "held_ms": None},
    ]
    Path(fronts[0].log_path).write_text("".join(json.dumps(e) + "\n" for e in events))
    for quiet in (True, False):
        out_path = tmp_path / f"out{quiet}"
        with open(out_path, "w") as out:
            tailer = demo.LogTailer(fronts, out, quiet, time.monotonic())
            tailer.poll()
            tailer.stop()
        st = tailer.stats
        assert st.failovers == {"workers_busy": 1, "held": 1, "hold_timeout": 1}
        assert st.answered == {("host1", "host2 tcp"): 2, ("host1", "host1 tcp"): 1,
                               ("host1", "host1 unix"): 1, ("host1", demo.NONE): 1}
        assert st.held_ms == {"host1": [123.4, 2000.2]}
        printed = out_path.read_text()
        if quiet:
            assert printed == ""
        else:
            assert "host1 unix -> host2 tcp  [workers_busy]" in printed
            assert "host1 unix -> host2 tcp  [held after 123 ms]" in printed
            assert "host1 unix -> host1 tcp  [hold_timeout after 2000 ms]" in printed


def _run(phase: demo.Phase, fast_ms: Sequence[float], slow_ms: Sequence[float],
         errors: int = 0) -> demo.PhaseRun:
    results = [demo.Result(front="host2", kind="fast", latency=ms / 1000, served_by="host2/1")
               for ms in fast_ms]
    results += [demo.Result(front="host1", kind="slow", latency=ms / 1000, served_by="host1/1")
                for ms in slow_ms]
    results += [demo.Result(front="host1", kind="slow", latency=0.001, error="HTTP 502")
                for _ in range(errors)]
    stats = demo.LogStats()
    stats.answered[("host1", "host1 unix")] = len(slow_ms)
    stats.answered[("host1", demo.NONE)] = errors
    return demo.PhaseRun(phase, results, stats, 1.0)


def test_comparison_ratio_is_computed_from_the_table(tmp_path: Path) -> None:
    hosts = _hosts(str(tmp_path))
    before = _run(demo.SOCKET_ONLY, [2.0] * 95 + [800.0] * 5, [900.0] * 10, errors=3)
    after = _run(demo.FAILPROXY, [2.0] * 95 + [40.0] * 5, [300.0] * 10)
    text = demo.comparison(hosts, [before, after])
    table = _parse_table(text)
    assert table["requests ok/sent"] == ["110/113", "110/110"]
    assert table["errors"] == ["3", "0"]
    assert table["fast p99 ms"] == ["800.0", "40.0"]
    assert table["slow p50 ms"] == ["900.0", "300.0"]
    assert table["none (502/504)"] == ["3", "0"]
    assert table["host2 fast p99 ms"] == ["800.0", "40.0"]
    assert table["host1 fast p99 ms"] == ["-", "-"]  # no fast request of host1's in this data
    assert "failproxy cut the fast-request p99 20.0x: from 800.0 ms" in text
    assert "UNIX socket only errors: HTTP 502 x3" in text
    assert "GET /reports/:id (300 ms in the app)" in text
    # Worse with failproxy: said so, not hidden.
    worse = _run(demo.FAILPROXY, [2.0] * 95 + [1600.0] * 5, [300.0] * 10)
    text = demo.comparison(hosts, [before, worse])
    assert "did not cut the fast-request p99: it rose 2.0x, from 800.0 ms" in text

    # With nginx: a third column between the two, and failproxy against each.
    nginx = _run(demo.NGINX, [2.0] * 95 + [200.0] * 5, [600.0] * 10)
    text = demo.comparison(hosts, [before, nginx, after])
    table = _parse_table(text)
    head = text[text.index("\ncomparison: "):].split("\n\n")[1].splitlines()[0].split()
    assert head == ["UNIX", "socket", "only", "nginx", "failproxy"]
    assert table["fast p99 ms"] == ["800.0", "200.0", "40.0"]
    assert table["slow p50 ms"] == ["900.0", "600.0", "300.0"]
    assert ("failproxy cut the fast-request p99 20.0x: from 800.0 ms (UNIX socket only) to "
            "40.0 ms (failproxy)") in text
    assert ("failproxy cut the fast-request p99 5.0x: from 200.0 ms (nginx) to 40.0 ms "
            "(failproxy)") in text


# ---------------------------------------------------------------------------- the demo itself


def _parse_table(out: str) -> dict[str, list[str]]:
    """The comparison table: row label -> its cells (the last words of the line, one a phase)."""
    text = out[out.index("\ncomparison: "):]
    lines = text.split("\n\n")[1].splitlines()
    assert re.fullmatch(r"\s+-+(\s+-+){2,}", lines[1]), lines[:2]
    columns = len(lines[1].split()) - 1
    table = {}
    for line in lines[2:]:
        words = line.split()
        if len(words) > columns and not line.rstrip().endswith(":"):
            label = " ".join(words[:-columns])
            assert label not in table, label
            table[label] = words[-columns:]
    return table


def test_demo_compares_socket_only_with_failproxy() -> None:
    n = 150  # 40 requests a second, as the default run: host1's workers are offered ~160 %
    with_nginx = demo.find_nginx() is not None
    tmp = tempfile.mkdtemp(prefix="fpd-")  # short: UNIX socket paths are limited to 107 bytes
    try:
        env = _env()
        env["TMPDIR"] = tmp
        proc = subprocess.run(
            [sys.executable, "-m", "failproxy", "demo", "--requests", str(n), "--duration",
             "3.75"], env=env, capture_output=True, text=True, timeout=120, check=False)
        out = proc.stdout
        assert proc.returncode == 0, out + proc.stderr
        # Every phase ran, the socket-only one first and failproxy's last (nginx's between
        # them when it is installed), each with every request.
        of = 3 if with_nginx else 2
        starts = [out.index(f"phase {i} of {of}: ") for i in range(1, of + 1)]
        end = out.index("\ncomparison: ")
        assert starts == sorted(starts) and starts[-1] < end
        texts = [out[a:b] for a, b in zip(starts, [*starts[1:], end], strict=True)]
        phase1, phase2 = texts[0], texts[-1]
        assert phase1.startswith("phase 1 of ")
        assert phase1.startswith(f"phase 1 of {of}: UNIX socket only")
        assert phase2.startswith(f"phase {of} of {of}: failproxy")
        assert f"UNIX socket only: {n} requests in" in phase1
        assert f"failproxy: {n} requests in" in phase2
        if with_nginx:
            assert demo.NGINX_MISSING not in out
            assert texts[1].startswith("phase 2 of 3: nginx, the seed's config: ")
            assert f"nginx: {n} requests in" in texts[1]
        else:
            assert demo.NGINX_MISSING in out

        t = _parse_table(out)
        head = out[end:].split("\n\n")[1].splitlines()[0].split()
        assert head == ["UNIX", "socket", "only", *(["nginx"] if with_nginx else []),
                        "failproxy"]
        last = of - 1  # failproxy's column
        ok1, sent1 = map(int, t["requests ok/sent"][0].split("/"))
        assert t["requests ok/sent"][last] == f"{n}/{n}" and sent1 == n
        errors = list(map(int, t["errors"]))
        errors1 = errors[0]
        assert errors[last] == 0, out
        assert errors1 == n - ok1
        fast99 = [float(v) for v in t["fast p99 ms"]]
        host1_fast99 = [float(v) for v in t["host1 fast p99 ms"]]
        for key in ("fast p50 ms", "slow p50 ms", "slow p99 ms"):
            assert all(float(v) > 0 for v in t[key]), (key, t[key])
        # Without failover host1's backlog fills: 502s, or fast requests behind slow ones.
        assert errors1 > 0 or host1_fast99[0] > host1_fast99[last], out

        # Where host1's requests went, from host1's proxy's log: each one counted once.
        host1_sent = (n + 2) // 3
        dests = ["host1 unix", "host2 tcp", "host3 tcp", "host1 tcp", "none (502/504)"]
        counts = [[int(t[d][i]) for d in dests] for i in range(of)]
        assert all(sum(c) == host1_sent for c in counts), t
        unix1, peer2, peer3, home1, none1 = counts[0]
        assert (peer2, peer3, home1) == (0, 0, 0)  # socket only: nowhere else to go
        assert none1 == errors1  # every socket-only error is host1's 502
        assert unix1 == host1_sent - errors1
        unix2, peer2, peer3, home2, none2 = counts[last]
        assert none2 == 0 and peer2 + peer3 > 0, t  # failproxy: the overflow went to the peers
        assert unix2 > 0  # and host1 still served what its workers had room for
        assert int(t["answered off their box"][0]) == 0
        assert int(t["answered off their box"][last]) >= peer2 + peer3
        if with_nginx:  # nginx's overflow went to its backups, its own TCP port among them
            unix_n, peer2_n, peer3_n, home_n, _ = counts[1]
            assert unix_n > 0 and peer2_n + peer3_n + home_n > 0, t
            assert int(t["answered off their box"][1]) >= peer2_n + peer3_n
            ok_n, sent_n = map(int, t["requests ok/sent"][1].split("/"))
            assert sent_n == n and errors[1] == n - ok_n

        # Failovers: none without backups; with failproxy at least one per request host1's
        # socket did not answer, each with its reason, shown live as they happened.
        failovers = [int(v) for v in t["failovers"]]
        assert failovers[0] == 0
        assert failovers[last] >= peer2 + peer3 + home2
        labels = list(t)
        reasons = {k: v for k, v in t.items() if labels.index(k) > labels.index("failovers")}
        for col in range(of):  # the reasons add up to the failovers, in each column
            assert sum(int(v[col]) for v in reasons.values()) == failovers[col], t
        assert set(reasons) <= {"workers_busy", "queued", "held", "hold_timeout", "overloaded",
                                "refused", "skipped_down", "failed"}, reasons
        assert re.search(r"host1 proxy  \S+ \S+  host1 unix -> host[23] tcp  "
                         r"\[(workers_busy|queued|held|overloaded)", phase2), phase2
        if errors1:
            assert "every server failed ['overloaded'] -> 502" in phase1
        if with_nginx and failovers[1]:
            assert re.search(r"host1 nginx  \S+ \S+  host1 unix -> host[123] tcp  "
                             r"\[(overloaded EAGAIN|skipped_down)\]", texts[1]), texts[1]

        # The ratio lines say what the table says: failproxy against each other phase.
        titles = ["UNIX socket only", *(["nginx"] if with_nginx else [])]
        for col, title in enumerate(titles):
            m = re.search(r"failproxy (?:cut the fast-request p99|did not cut the fast-request "
                          rf"p99: it rose) ([\d.]+)x[:,] from ([\d.]+) ms \({title}\) to "
                          r"([\d.]+) ms \(failproxy\)", out)
            assert m, (title, out)
            ratio, before, after = map(float, m.groups())
            assert [before, after] == [fast99[col], fast99[last]]
            bigger, smaller = max(before, after), min(before, after)
            assert abs(ratio - bigger / smaller) <= 0.051, (ratio, before, after)
        assert "failproxy cut the fast-request p99" in out  # against socket-only at least

        # What host1's failproxy learned, from its /status: the slow route, and its peers.
        learned = out[out.index("\nwhat host1's failproxy learned (GET /status"):]
        m = re.search(r"^    GET /reports/:id +slow +([\d.]+) +(\d+)$", learned, re.M)
        assert m, learned
        assert float(m.group(1)) > config.RoutesConfig().slow_ms and int(m.group(2)) > 0
        assert "  learned slow: GET /reports/:id;" in learned
        assert not re.search(r"^    (GET /items/:id|POST /echo) +slow", learned, re.M), learned
        assert re.search(r"^    host1 unix +\d+ +[\d.]+ +\d+$", learned, re.M), learned
        assert re.search(r"^    host[23] tcp +\d+ +[\d.]+ +\d+$", learned, re.M), learned

        # Every temp file and socket is gone.
        assert os.listdir(tmp) == []
        # And no demo process survives it.
        left = subprocess.run(["pgrep", "-f", f"(failproxy|nginx).*{tmp}"], capture_output=True,
                              text=True, check=False).stdout.split()
        assert left == []
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
