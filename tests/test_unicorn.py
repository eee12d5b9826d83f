"""End to end with real unicorn: a UNIX listener with backlog 5 and a TCP listener with backlog
1024, two workers; concurrent slow requests fill the socket and overflow to TCP (`overloaded`)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import free_port

pytestmark = pytest.mark.timeout(60)

UNICORN = shutil.which("unicorn")

CONFIG_RU = """\
app = lambda do |env|
  sleep 0.5 if env["PATH_INFO"] == "/slow"
  [200, {"Content-Type" => "text/plain"}, ["pid=#{Process.pid} path=#{env['PATH_INFO']}\\n"]]
end
run app
"""


class Unicorn:
    """Real unicorn in `d`: `workers` workers on a UNIX socket (backlog 5) and a TCP port
    (backlog 1024), running the Rack app `app`."""

    def __init__(self, d: Path, workers: int = 2, app: str = CONFIG_RU) -> None:
        self.dir = d
        self.workers = workers
        self.sock = str(d / "app.sock")
        self.port = free_port()
        self.unix_address = f"unix:{self.sock}"
        self.tcp_address = f"127.0.0.1:{self.port}"
        (d / "config.ru").write_text(app)
        (d / "unicorn.conf.rb").write_text(
            f"worker_processes {workers}\n"
            f'listen "{self.sock}", :backlog => 5\n'
            f'listen "127.0.0.1:{self.port}", :backlog => 1024\n'
            f'pid "{d / "unicorn.pid"}"\n'
            "timeout 30\n"
            "preload_app true\n")
        self.err = open(d / "unicorn.err", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [UNICORN or "unicorn", "-c", "unicorn.conf.rb", "config.ru"], cwd=d,
            stdout=self.err, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)

    def log(self) -> str:
        return (self.dir / "unicorn.err").read_text(errors="replace")

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"unicorn exited {self.proc.returncode}:\n{self.log()}")
            text = self.log()
            if all(f"worker={i} ready" in text for i in range(self.workers)):
                return
            time.sleep(0.1)
        raise AssertionError(f"unicorn not ready in {timeout}s:\n{self.log()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self.err.close()


@pytest.fixture
def unicorn(sockdir: Path) -> Iterator[Unicorn]:
    if UNICORN is None:
        pytest.skip("unicorn is not installed (Debian package `unicorn`; the Makefile installs it)")
    u = Unicorn(sockdir)
    try:
        u.wait_ready()
        yield u
    finally:
        u.stop()


def _get(port: int, path: str, out: list[Any]) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    out.append(data)


def test_unicorn_overflow_to_tcp(proxy, unicorn) -> None:
    """The seed's policy (`overflow = "ring"`): a full backlog is an EAGAIN, the request moves
    to the TCP port at once. (The default `room` policy goes there before the backlog fills:
    test_room.py.)"""
    fp = proxy([unicorn.unix_address, {"address": unicorn.tcp_address, "backup": True}],
               upstream={"read_timeout": 30.0, "overflow": "ring"},
               headers={"upstream_header": True})
    # the fast path goes to the UNIX socket
    out: list[Any] = []
    _get(fp.port, "/fast", out)
    assert out[0].startswith(b"HTTP/1.1 200"), out[0][:200]
    assert b"path=/fast" in out[0]
    ev = fp.log.wait_for_event("request", path="/fast")
    assert ev["upstream"] == unicorn.unix_address and ev["overflowed"] is False

    n = 16  # > 2 workers + 6 queued on the UNIX socket (backlog 5 holds 6)
    out = []
    threads = [threading.Thread(target=_get, args=(fp.port, "/slow", out)) for _ in range(n)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(40)
    took = time.monotonic() - t0
    assert len(out) == n
    assert all(r.startswith(b"HTTP/1.1 200") and b"path=/slow" in r for r in out), \
        [r[:120] for r in out if not r.startswith(b"HTTP/1.1 200")]
    reqs = fp.log.wait_for_events("request", n, path="/slow", timeout=5)
    overflowed = [r for r in reqs if r["overflowed"]]
    direct = [r for r in reqs if not r["overflowed"]]
    assert overflowed, "some requests overflowed to TCP"
    assert direct, "some requests were served through the UNIX socket"
    assert all(r["upstream"] == unicorn.tcp_address for r in overflowed)
    assert all(r["upstreams"] == [unicorn.unix_address, unicorn.tcp_address] for r in overflowed)
    assert all(r["upstream"] == unicorn.unix_address for r in direct)
    fos = fp.log.find("failover", path="/slow")
    assert len(fos) == len(overflowed)
    for f in fos:
        assert f["reason"] == "overloaded", f
        assert f["errno"] == "EAGAIN", f
        assert f["from"] == unicorn.unix_address and f["to"] == unicorn.tcp_address
        assert f["elapsed_ms"] < 500
    via_tcp = [r for r in out if f"X-Failproxy-Upstream: {unicorn.tcp_address}".encode().lower()
               in r.lower()]
    assert len(via_tcp) == len(overflowed)
    # 16 x 0.5 s on 2 workers: about 4 s whatever the path
    assert took < 15, took
