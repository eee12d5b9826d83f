"""The demo app server (real processes, real sockets) and a short `failproxy demo` run."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from failproxy import demoapp

ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                     else "")
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class App:
    proc: subprocess.Popen[bytes]
    sock_path: str
    port: int


@contextlib.contextmanager
def run_app(workers: int) -> Iterator[App]:
    tmp = tempfile.mkdtemp(prefix="fpdemo-")
    sock_path = os.path.join(tmp, "app.sock")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "failproxy.demoapp", "--name", "t1", "--unix", sock_path,
         "--tcp", f"127.0.0.1:{port}", "--workers", str(workers)],
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
        pids: set[str] = set()

        def slow2() -> None:
            _, headers, _ = _exchange(_unix(app.sock_path),
                                      b"GET /slow?ms=400 HTTP/1.1\r\nHost: x\r\n\r\n")
            pids.add(headers["x-served-by"])

        start = time.monotonic()
        threads = [threading.Thread(target=slow2) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        # Two workers: both requests in parallel, each on its own worker.
        assert time.monotonic() - start < 0.78  # one after the other would take 0.8 s
        assert len(pids) == 2


def test_full_unix_backlog_gives_eagain_on_nonblocking_connect() -> None:
    with run_app(workers=2) as app:
        held: list[socket.socket] = []
        try:
            for _ in range(2):  # occupy both workers
                s = _unix(app.sock_path)
                s.sendall(b"GET /slow?ms=2000 HTTP/1.1\r\nHost: x\r\n\r\n")
                held.append(s)
            time.sleep(0.3)
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


def test_term_stops_workers_and_removes_socket() -> None:
    with run_app(workers=2) as app:
        worker_pids = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(app.proc.pid)],
            capture_output=True, text=True, check=False).stdout.split()
        assert len(worker_pids) == 2
        os.kill(app.proc.pid, signal.SIGTERM)
        assert app.proc.wait(5) == 0
        assert not os.path.exists(app.sock_path)
        time.sleep(0.2)
        for pid in worker_pids:
            with pytest.raises(ProcessLookupError):
                os.kill(int(pid), 0)


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


def test_demo_runs_and_cleans_up() -> None:
    tmp = tempfile.mkdtemp(prefix="fpd-")  # short: UNIX socket paths are limited to 107 bytes
    try:
        env = _env()
        env["TMPDIR"] = tmp
        proc = subprocess.run(
            [sys.executable, "-m", "failproxy", "demo", "--requests", "60", "--quiet"],
            env=env, capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        out = proc.stdout
        assert "summary: 60 requests" in out
        assert "front (client->proxy)" in out and "app (X-Served-By)" in out
        assert "p50 ms" in out and "p99 ms" in out
        assert " 0 errors" in out, out
        # Every temp file and socket is gone.
        assert os.listdir(tmp) == []
        # And no demo process survives it.
        left = subprocess.run(["pgrep", "-f", f"failproxy.*{tmp}"], capture_output=True,
                              text=True, check=False).stdout.split()
        assert left == []
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
