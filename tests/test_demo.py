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

from failproxy import config, demo, demoapp

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


# ---------------------------------------------------------------------------- the demo's pieces


def _hosts(tmp: str) -> list[demo.Host]:
    return [demo.Host(name=f"host{i}", ip=ip, app_port=9000 + i,
                      sock_path=os.path.join(tmp, f"host{i}.sock"),
                      app_err_path=os.path.join(tmp, f"host{i}.app.stderr"))
            for i, ip in enumerate(demo.HOST_IPS, 1)]


def _front(host: demo.Host, phase: demo.Phase, tmp: str) -> demo.Front:
    base = os.path.join(tmp, f"{host.name}.{phase.key}")
    return demo.Front(host=host, phase=phase, proxy_port=8000, log_path=base + ".log",
                      cfg_path=base + ".toml", err_path=base + ".stderr")


def test_phase_configs_socket_only_then_failproxy_defaults(tmp_path: Path) -> None:
    hosts = _hosts(str(tmp_path))
    socket_only, room = demo.PHASES
    cfg = config.loads(demo._config_text(_front(hosts[0], socket_only, str(tmp_path)), hosts))
    assert [s.address.text for s in cfg.upstream.servers] == [f"unix:{hosts[0].sock_path}"]
    assert cfg.upstream.self is None

    cfg = config.loads(demo._config_text(_front(hosts[1], room, str(tmp_path)), hosts))
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


def test_log_tailer_counts_and_prints_new_reasons(tmp_path: Path) -> None:
    hosts = _hosts(str(tmp_path))
    fronts = [_front(h, demo.PHASES[1], str(tmp_path)) for h in hosts]
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
    before = _run(demo.PHASES[0], [2.0] * 95 + [800.0] * 5, [900.0] * 10, errors=3)
    after = _run(demo.PHASES[1], [2.0] * 95 + [40.0] * 5, [300.0] * 10)
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
    # Worse with failproxy: said so, not hidden.
    text = demo.comparison(hosts, [after, before])
    assert "did not cut the fast-request p99: it rose 20.0x, from 40.0 ms" in text


# ---------------------------------------------------------------------------- the demo itself


def _parse_table(out: str) -> dict[str, list[str]]:
    """The comparison table: row label -> its two cells (the last two words of the line)."""
    text = out[out.index("\ncomparison: "):]
    lines = text.split("\n\n")[1].splitlines()
    assert re.fullmatch(r"\s+-+\s+-+\s+-+", lines[1]), lines[:2]
    table = {}
    for line in lines[2:]:
        words = line.split()
        if len(words) >= 3 and not line.rstrip().endswith(":"):
            label = " ".join(words[:-2])
            assert label not in table, label
            table[label] = words[-2:]
    return table


def test_demo_compares_socket_only_with_failproxy() -> None:
    n = 150  # 40 requests a second, as the default run: host1's workers are offered ~160 %
    tmp = tempfile.mkdtemp(prefix="fpd-")  # short: UNIX socket paths are limited to 107 bytes
    try:
        env = _env()
        env["TMPDIR"] = tmp
        proc = subprocess.run(
            [sys.executable, "-m", "failproxy", "demo", "--requests", str(n), "--duration",
             "3.75"], env=env, capture_output=True, text=True, timeout=90, check=False)
        out = proc.stdout
        assert proc.returncode == 0, out + proc.stderr
        # Both phases ran, the socket-only one first, each with every request.
        first, second = out.index("phase 1 of 2: UNIX socket only"), out.index("phase 2 of 2")
        assert first < second < out.index("\ncomparison: ")
        phase1, phase2 = out[first:second], out[second:out.index("\ncomparison: ")]
        assert f"UNIX socket only: {n} requests in" in phase1
        assert f"failproxy: {n} requests in" in phase2

        t = _parse_table(out)
        ok1, sent1 = map(int, t["requests ok/sent"][0].split("/"))
        assert t["requests ok/sent"][1] == f"{n}/{n}" and sent1 == n
        errors1, errors2 = map(int, t["errors"])
        assert errors2 == 0, out
        assert errors1 == n - ok1
        fast99 = [float(v) for v in t["fast p99 ms"]]
        host1_fast99 = [float(v) for v in t["host1 fast p99 ms"]]
        for key in ("fast p50 ms", "slow p50 ms", "slow p99 ms"):
            assert all(float(v) > 0 for v in t[key]), (key, t[key])
        # Without failover host1's backlog fills: 502s, or fast requests behind slow ones.
        assert errors1 > 0 or host1_fast99[0] > host1_fast99[1], out

        # Where host1's requests went, from host1's proxy's log: each one counted once.
        host1_sent = (n + 2) // 3
        dests = ["host1 unix", "host2 tcp", "host3 tcp", "host1 tcp", "none (502/504)"]
        counts = [[int(t[d][i]) for d in dests] for i in (0, 1)]
        assert sum(counts[0]) == sum(counts[1]) == host1_sent, t
        unix1, peer2, peer3, home1, none1 = counts[0]
        assert (peer2, peer3, home1) == (0, 0, 0)  # socket only: nowhere else to go
        assert none1 == errors1  # every socket-only error is host1's 502
        assert unix1 == host1_sent - errors1
        unix2, peer2, peer3, home2, none2 = counts[1]
        assert none2 == 0 and peer2 + peer3 > 0, t  # failproxy: the overflow went to the peers
        assert unix2 > 0  # and host1 still served what its workers had room for
        assert int(t["answered off their box"][0]) == 0
        assert int(t["answered off their box"][1]) >= peer2 + peer3

        # Failovers: none without backups; with failproxy at least one per request host1's
        # socket did not answer, each with its reason, shown live as they happened.
        failovers = [int(v) for v in t["failovers"]]
        assert failovers[0] == 0
        assert failovers[1] >= peer2 + peer3 + home2
        reasons = {k.strip(): v for k, v in t.items()
                   if k in ("workers_busy", "queued", "held", "hold_timeout", "overloaded")}
        assert sum(int(v[1]) for v in reasons.values()) == failovers[1], t
        assert re.search(r"host1 proxy  \S+ \S+  host1 unix -> host[23] tcp  "
                         r"\[(workers_busy|queued|held|overloaded)", phase2), phase2
        if errors1:
            assert "every server failed ['overloaded'] -> 502" in phase1

        # The ratio line says what the table says.
        m = re.search(r"failproxy cut the fast-request p99 ([\d.]+)x: from ([\d.]+) ms "
                      r"\(UNIX socket only\) to ([\d.]+) ms \(failproxy\)", out)
        assert m, out
        ratio, before, after = map(float, m.groups())
        assert [before, after] == fast99
        assert abs(ratio - before / after) <= 0.051, (ratio, before, after)

        # Every temp file and socket is gone.
        assert os.listdir(tmp) == []
        # And no demo process survives it.
        left = subprocess.run(["pgrep", "-f", f"failproxy.*{tmp}"], capture_output=True,
                              text=True, check=False).stdout.split()
        assert left == []
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
