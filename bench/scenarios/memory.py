"""Scenario "memory": RSS per idle keep-alive client connection.

N client connections are opened to one proxy worker, each sends one request and reads the
response, then stays open (idle keep-alive). The worker's VmRSS (/proc/<pid>/status) before
and after gives the growth per connection. failproxy (1 worker) is the subject; nginx
(1 worker) and HAProxy (1 thread) are measured the same way for scale. The harness raises
RLIMIT_NOFILE (inherited by the servers) as far as the box allows.
"""

from __future__ import annotations

import contextlib
import resource
import socket
import time
from dataclasses import dataclass
from typing import Any

from bench.instruments.procs import Proc, Processes, StartError, children, rss_kb
from bench.instruments.system import free_port, log
from bench.targets import servers

HOST = "127.0.0.1"
REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"


@dataclass(frozen=True)
class Params:
    connections: int
    kinds: tuple[str, ...] = ("failproxy", "nginx", "haproxy")


def read_response(sock: socket.socket) -> int:
    """Read one HTTP response with a Content-Length body; returns the status."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(4096)
        if not data:
            raise ConnectionError("closed before the response head")
        buf += data
    head, _, body = buf.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        data = sock.recv(4096)
        if not data:
            raise ConnectionError("closed inside the body")
        body += data
    return int(head.split(b" ", 2)[1])


def open_idle(port: int, n: int) -> list[socket.socket]:
    """n keep-alive connections, each having made one request; raises on any failure."""
    socks = []
    try:
        for _ in range(n):
            s = socket.create_connection((HOST, port), timeout=5)
            socks.append(s)
            s.sendall(REQUEST)
            status = read_response(s)
            if status != 200:
                raise RuntimeError(f"status {status}")
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


def still_open(socks: list[socket.socket], sample: int = 20) -> int:
    """How many of a sample of the held connections still answer a second request."""
    ok = 0
    step = max(1, len(socks) // sample)
    for s in socks[::step][:sample]:
        with contextlib.suppress(OSError, ConnectionError, ValueError, IndexError):
            s.sendall(REQUEST)
            if read_response(s) == 200:
                ok += 1
    return ok


def _worker_pid(master: int) -> int:
    kids = children(master)
    return kids[0] if len(kids) == 1 else master


def run(params: Params, procs: Processes) -> dict[str, Any]:
    unix_path = str(procs.workdir / "up.sock")
    servers.start_fast_upstream(procs, "upstream", unix_path)
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    rows = []
    for kind in params.kinds:
        n = params.connections
        if kind == "haproxy":  # HAProxy needs 2 fds per connection below RLIMIT_NOFILE
            n = min(n, (nofile - 100) // 2 - 100)
        n = min(n, nofile - 500)
        try:
            rows.append(_one(procs, kind, unix_path, n))
        except (StartError, OSError, RuntimeError) as exc:
            log(f"  !! {kind}: {exc}")
            rows.append({"kind": kind, "connections": n, "error": str(exc)[:2000]})
    return {"params": {"connections": params.connections, "rlimit_nofile": nofile},
            "rows": rows}


def _one(procs: Processes, kind: str, unix_path: str, n: int) -> dict[str, Any]:
    port = free_port()
    name = f"mem-{kind}"
    proc: Proc | None
    if kind == "failproxy":
        cfg = servers.failproxy_config(
            listen=[f"{HOST}:{port}"], servers=[{"address": f"unix:{unix_path}"}], workers=1,
            log_file=str(procs.workdir / f"{name}.log"), max_connections=n + 1000)
        proc = servers.start_failproxy(procs, name, cfg, probe=(HOST, port))
    elif kind == "nginx":
        proc = servers.start_nginx_proxy(procs, name, HOST, port, f"unix:{unix_path}",
                                         workers=1, access_log=True,
                                         worker_connections=n + 1000).proc
    elif kind == "haproxy":
        proc = servers.start_haproxy(procs, name, HOST, port, unix_path, access_log=True,
                                     maxconn=n + 100).proc
    else:
        raise ValueError(kind)
    assert proc is not None
    try:
        time.sleep(0.3)
        pid = _worker_pid(proc.pid)
        # warm-up: some connections and requests, so that pools and buffers exist
        for s in open_idle(port, 100):
            s.close()
        time.sleep(0.5)
        before = rss_kb(pid)
        t0 = time.monotonic()
        socks = open_idle(port, n)
        opened_s = time.monotonic() - t0
        try:
            time.sleep(1.0)
            after = rss_kb(pid)
            alive = still_open(socks)
        finally:
            for s in socks:
                s.close()
        time.sleep(1.0)
        released = rss_kb(pid)
    finally:
        procs.stop(proc)
    per_conn = (after - before) * 1024 / n
    log(f"  {kind:<9} {n} idle connections: RSS {before} -> {after} KiB "
        f"({per_conn:,.0f} B/conn); after closing {released} KiB; "
        f"{alive}/20 sampled still open")
    return {"kind": kind, "connections": n, "error": None, "rss_before_kb": before,
            "rss_after_kb": after, "rss_after_close_kb": released,
            "bytes_per_conn": round(per_conn, 1), "open_seconds": round(opened_s, 2),
            "sample_still_open": alive, "sample_size": 20}
