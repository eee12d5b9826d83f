"""`failproxy demo`: the seed's 3-host cluster on loopback, driven by skewed load.

Three hosts on 127.0.1.1-3. Each runs a pre-fork demo app server (`failproxy.demoapp`: 2 workers,
a UNIX socket with backlog 5 and a TCP port with backlog 1024) and a failproxy in front of it
(UNIX socket first, then the three app TCP ports as backups, the ring starting after itself).
A client spreads a bounded burst of requests round-robin over the three proxies, as round-robin
DNS would, with the slow actions clustered on host1. The failover decisions are printed as the
proxies log them, and a summary table ends the run. Every process and socket is cleaned up, also
on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

HOST_IPS = ("127.0.1.1", "127.0.1.2", "127.0.1.3")
APP_WORKERS = 2
SLOW_MS = 300
SLOW_SHARE = (0.8, 0.0, 0.0)  # share of each front host's traffic that is /slow: all on host1
ECHO_SHARE = 0.1  # share of the rest that is a small POST /echo (the rest is GET /fast)
DEFAULT_REQUESTS = 600
DEFAULT_RATE = 40.0  # requests per second when --duration is not given
CLIENT_THREADS = 64
REQUEST_TIMEOUT = 10.0
START_TIMEOUT = 15.0
LIVE_LINES_PER_SECOND = 25


@dataclass
class Host:
    name: str
    ip: str
    app_port: int
    proxy_port: int
    sock_path: str
    log_path: str
    cfg_path: str
    err_path: str

    @property
    def app_tcp(self) -> str:
        return f"{self.ip}:{self.app_port}"

    @property
    def proxy_addr(self) -> str:
        return f"{self.ip}:{self.proxy_port}"


@dataclass
class Result:
    front: str
    kind: str
    status: int = 0
    latency: float = 0.0
    served_by: str = ""
    via: str = ""
    error: str = ""


@dataclass
class LogStats:
    failovers: Counter[str] = field(default_factory=Counter)  # by reason
    routes: Counter[tuple[str, str]] = field(default_factory=Counter)  # (from, to) labels
    exhausted: int = 0
    overflowed: Counter[str] = field(default_factory=Counter)  # front host -> requests
    logged_requests: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)


class _Interrupted(Exception):
    """SIGTERM to the demo: unwind through the same clean-up as Ctrl-C."""


# ---------------------------------------------------------------------------- set-up


def _free_ports(ip: str, n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((ip, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _config_text(host: Host, hosts: Sequence[Host]) -> str:
    lines = [
        f"# failproxy demo: {host.name}",
        "[server]",
        f'listen = ["{host.proxy_addr}"]',
        "workers = 1",
        "",
        "[upstream]",
        f'self = "{host.app_tcp}"',
        "",
        "[[upstream.server]]",
        f'address = "unix:{host.sock_path}"',
    ]
    for peer in hosts:
        lines += ["", "[[upstream.server]]", f'address = "{peer.app_tcp}"', "backup = true"]
    lines += ["", "[log]", 'format = "json"', "access = true", f'file = "{host.log_path}"', ""]
    return "\n".join(lines)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("PYTHONSTARTUP", None)
    return env


def _wait_tcp(ip: str, port: int, proc: subprocess.Popen[bytes], what: str, err_path: str,
              deadline: float) -> None:
    while True:
        code = proc.poll()
        if code is not None:
            raise RuntimeError(f"{what} exited with code {code} at start:\n{_tail(err_path)}")
        try:
            with socket.create_connection((ip, port), timeout=0.5):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not listen on {ip}:{port} in time:\n{_tail(err_path)}")
        time.sleep(0.05)


def _tail(path: str, n: int = 20) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:]).rstrip() or "(no output)"
    except OSError:
        return "(no output)"


def proxy_command(cfg_path: str) -> list[str]:
    """How each host's failproxy is started."""
    return [sys.executable, "-m", "failproxy", "serve", cfg_path]


class Cluster:
    """The processes of the demo; `close()` ends every one of them and removes the temp dir."""

    def __init__(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="failproxy-demo-")
        self.procs: list[subprocess.Popen[bytes]] = []
        self.hosts: list[Host] = []

    def start(self) -> None:
        env = _child_env()
        for i, ip in enumerate(HOST_IPS, 1):
            app_port, proxy_port = _free_ports(ip, 2)
            name = f"host{i}"
            self.hosts.append(Host(
                name=name, ip=ip, app_port=app_port, proxy_port=proxy_port,
                sock_path=os.path.join(self.tmp, f"{name}.sock"),
                log_path=os.path.join(self.tmp, f"{name}.log"),
                cfg_path=os.path.join(self.tmp, f"{name}.toml"),
                err_path=os.path.join(self.tmp, f"{name}.stderr"),
            ))
        deadline = time.monotonic() + START_TIMEOUT
        for h in self.hosts:
            cmd = [sys.executable, "-m", "failproxy.demoapp", "--name", h.name, "--unix",
                   h.sock_path, "--tcp", h.app_tcp, "--workers", str(APP_WORKERS)]
            self._spawn(cmd, env, h.err_path + ".app")
        for h, proc in zip(self.hosts, self.procs, strict=True):
            _wait_tcp(h.ip, h.app_port, proc, f"{h.name} demo app", h.err_path + ".app", deadline)
        for h in self.hosts:
            Path(h.cfg_path).write_text(_config_text(h, self.hosts))
            Path(h.log_path).touch()
            self._spawn(proxy_command(h.cfg_path), env, h.err_path)
        for h, proc in zip(self.hosts, self.procs[len(self.hosts):], strict=True):
            _wait_tcp(h.ip, h.proxy_port, proc, f"{h.name} failproxy", h.err_path, deadline)

    def _spawn(self, cmd: list[str], env: dict[str, str], err_path: str) -> None:
        with open(err_path, "wb") as err:
            proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=err,
                                    stderr=err, start_new_session=True)
        self.procs.append(proc)

    def close(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 3.0
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            # The whole group, leader or not: workers of a master that died must go too.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(2.0)
        shutil.rmtree(self.tmp, ignore_errors=True)


# ---------------------------------------------------------------------------- logs


class LogTailer(threading.Thread):
    """Follows the proxies' JSON log files; prints failovers live and counts what they say."""

    def __init__(self, hosts: Sequence[Host], out: TextIO, quiet: bool, t0: float) -> None:
        super().__init__(name="log-tailer", daemon=True)
        self.hosts = hosts
        self.out = out
        self.quiet = quiet
        self.t0 = t0
        self.stats = LogStats()
        self.labels: dict[str, str] = {}
        for h in hosts:
            self.labels[f"unix:{h.sock_path}"] = f"{h.name} unix"
            self.labels[h.app_tcp] = f"{h.name} tcp"
        self._stop_event = threading.Event()
        self._files: dict[str, Any] = {}
        self._partial: dict[str, bytes] = {}
        self._second = -1
        self._printed = 0
        self._suppressed = 0

    def label(self, address: object) -> str:
        return self.labels.get(str(address), str(address))

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.poll()
            self._stop_event.wait(0.05)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(2.0)
        self.poll()
        self._flush_suppressed()
        for f in self._files.values():
            f.close()

    def poll(self) -> None:
        for h in self.hosts:
            f = self._files.get(h.name)
            if f is None:
                try:
                    f = self._files[h.name] = open(h.log_path, "rb")  # noqa: SIM115
                except OSError:
                    continue
            data = self._partial.pop(h.name, b"") + f.read()
            if not data:
                continue
            *lines, rest = data.split(b"\n")
            if rest:
                self._partial[h.name] = rest
            for line in lines:
                self._event(h, line)

    def _event(self, host: Host, line: bytes) -> None:
        try:
            ev = json.loads(line)
        except ValueError:
            return
        if not isinstance(ev, dict):
            return
        name = ev.get("event")
        st = self.stats
        if name == "failover":
            reason = str(ev.get("reason"))
            st.failovers[reason] += 1
            src, dst = self.label(ev.get("from")), self.label(ev.get("to"))
            st.routes[(src, dst)] += 1
            errno = f" {ev['errno']}" if ev.get("errno") else ""
            self._live(f"{host.name} proxy  {ev.get('method', '')} {ev.get('path', '')}  "
                       f"{src} -> {dst}  [{reason}{errno}]")
        elif name == "upstream_exhausted":
            st.exhausted += 1
            self._live(f"{host.name} proxy  {ev.get('method', '')} {ev.get('path', '')}  "
                       f"every server failed {ev.get('reasons')} -> {ev.get('status')}")
        elif name == "request":
            st.logged_requests[host.name] += 1
            if ev.get("overflowed"):
                st.overflowed[host.name] += 1
        elif ev.get("level") in ("error", "critical"):
            st.errors.append(f"{host.name}: {line.decode(errors='replace')}")

    def _live(self, text: str) -> None:
        if self.quiet:
            return
        elapsed = time.monotonic() - self.t0
        second = int(elapsed)
        if second != self._second:
            self._flush_suppressed()
            self._second = second
            self._printed = 0
        if self._printed >= LIVE_LINES_PER_SECOND:
            self._suppressed += 1
            return
        self._printed += 1
        print(f"{elapsed:6.2f}s  {text}", file=self.out, flush=True)

    def _flush_suppressed(self) -> None:
        if self._suppressed:
            print(f"         ... and {self._suppressed} more failovers in that second",
                  file=self.out, flush=True)
            self._suppressed = 0


# ---------------------------------------------------------------------------- load


def _plan(n: int, seed: int = 7) -> list[tuple[int, str, str]]:
    """(front index, kind, path) per request: round-robin fronts, slow ones clustered on host1."""
    rnd = random.Random(seed)
    plan = []
    for i in range(n):
        front = i % len(HOST_IPS)
        x = rnd.random()
        if x < SLOW_SHARE[front]:
            kind = "slow"
        elif x < SLOW_SHARE[front] + ECHO_SHARE:
            kind = "echo"
        else:
            kind = "fast"
        path = {"slow": f"/slow?ms={SLOW_MS}", "fast": "/fast", "echo": "/echo"}[kind]
        plan.append((front, kind, path))
    return plan


def _one_request(host: Host, kind: str, path: str) -> Result:
    res = Result(front=host.name, kind=kind)
    conn = http.client.HTTPConnection(host.ip, host.proxy_port, timeout=REQUEST_TIMEOUT)
    start = time.monotonic()
    try:
        if kind == "echo":
            body = b"x" * 1024
            conn.request("POST", path, body=body, headers={"Content-Type": "text/plain"})
        else:
            conn.request("GET", path)
        resp = conn.getresponse()
        data = resp.read()
        res.status = resp.status
        res.served_by = resp.getheader("X-Served-By", "")
        res.via = resp.getheader("X-Served-Via", "")
        if resp.status != 200:
            res.error = f"HTTP {resp.status}"
        elif kind == "echo" and data != b"x" * 1024:
            res.error = "echo body mismatch"
    except (OSError, http.client.HTTPException) as exc:
        res.error = type(exc).__name__
    finally:
        res.latency = time.monotonic() - start
        conn.close()
    return res


def run_load(hosts: Sequence[Host], n: int, duration: float) -> list[Result]:
    plan = _plan(n)
    interval = duration / max(1, n)
    futures: list[Future[Result]] = []
    pool = ThreadPoolExecutor(max_workers=CLIENT_THREADS, thread_name_prefix="client")
    try:
        t0 = time.monotonic()
        for i, (front, kind, path) in enumerate(plan):
            delay = t0 + i * interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            futures.append(pool.submit(_one_request, hosts[front], kind, path))
        return [f.result() for f in futures]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------------------- summary


def _pct(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def _table(rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    out = []
    for j, row in enumerate(cells):
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(row, widths, strict=True))))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join("  " + line for line in out)


def summary(hosts: Sequence[Host], results: Sequence[Result], stats: LogStats, wall: float) -> str:
    names = [h.name for h in hosts]
    ok = [r for r in results if not r.error]
    lines = [f"\nsummary: {len(results)} requests in {wall:.1f} s, {len(ok)} ok, "
             f"{len(results) - len(ok)} errors\n"]

    rows: list[list[object]] = [["front (client->proxy)", "sent", "ok", "errors", "served locally",
                                 "overflowed", "p50 ms", "p99 ms"]]
    for name in names:
        mine = [r for r in results if r.front == name]
        mine_ok = [r for r in mine if not r.error]
        local = sum(1 for r in mine_ok if r.served_by.split("/")[0] == name)
        lat = [r.latency * 1000 for r in mine_ok]
        rows.append([name, len(mine), len(mine_ok), len(mine) - len(mine_ok), local,
                     len(mine_ok) - local, f"{_pct(lat, 0.5):.1f}", f"{_pct(lat, 0.99):.1f}"])
    lat_all = [r.latency * 1000 for r in ok]
    rows.append(["all", len(results), len(ok), len(results) - len(ok),
                 sum(1 for r in ok if r.served_by.split("/")[0] == r.front),
                 sum(1 for r in ok if r.served_by.split("/")[0] != r.front),
                 f"{_pct(lat_all, 0.5):.1f}", f"{_pct(lat_all, 0.99):.1f}"])
    lines.append(_table(rows))

    rows = [["app (X-Served-By)", "served", "via unix", "via tcp", "slow", "fast", "echo",
             "worker pids"]]
    for name in names:
        mine = [r for r in ok if r.served_by.split("/")[0] == name]
        pids = sorted({r.served_by.split("/", 1)[1] for r in mine if "/" in r.served_by})
        kinds = Counter(r.kind for r in mine)
        rows.append([name, len(mine), sum(1 for r in mine if r.via == "unix"),
                     sum(1 for r in mine if r.via == "tcp"), kinds["slow"], kinds["fast"],
                     kinds["echo"], ",".join(pids)])
    lines.append("")
    lines.append(_table(rows))

    lines.append("")
    total = sum(stats.failovers.values())
    if total:
        rows = [["failovers by reason", "count"]]
        rows += [[reason, count] for reason, count in stats.failovers.most_common()]
        rows.append(["total", total])
        lines.append(_table(rows))
        lines.append("")
        rows = [["failover route", "count"]]
        rows += [[f"{a} -> {b}", c] for (a, b), c in sorted(stats.routes.items())]
        lines.append(_table(rows))
    else:
        lines.append("  failovers: none (no UNIX socket filled up)")
    logged = sum(stats.logged_requests.values())
    if logged:
        lines.append(f"\n  proxy access logs: {logged} request events, "
                     f"{sum(stats.overflowed.values())} with overflowed = true")
    if stats.exhausted:
        lines.append(f"\n  requests that found no server (502/504): {stats.exhausted}")
    errors = Counter(r.error for r in results if r.error)
    if errors:
        lines.append("\n  client errors: " + ", ".join(f"{e} x{c}" for e, c in errors.items()))
    for err in stats.errors[:5]:
        lines.append(f"  proxy error: {err}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="failproxy demo",
        description="A 3-host cluster on loopback (127.0.1.1-3): demo app servers behind one "
                    "failproxy each, driven by skewed load; prints failovers live and a summary.")
    p.add_argument("--requests", type=int, default=DEFAULT_REQUESTS,
                   help=f"requests to send (default {DEFAULT_REQUESTS})")
    p.add_argument("--duration", type=float, default=None,
                   help=f"seconds to spread them over (default: requests / {DEFAULT_RATE:g})")
    p.add_argument("--quiet", action="store_true",
                   help="print only the summary, not the failovers as they happen")
    args = p.parse_args(list(argv) if argv is not None else None)
    if args.requests < 1:
        p.error("--requests must be at least 1")
    if args.duration is None:
        args.duration = args.requests / DEFAULT_RATE
    if args.duration < 0:
        p.error("--duration must not be negative")
    return args


def _on_term(_sig: int, _frame: FrameType | None) -> None:
    raise _Interrupted


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parse(argv)
    except SystemExit as exc:  # --help or bad usage: return the status, as cli.main does
        return exc.code if isinstance(exc.code, int) else 2
    out = sys.stdout
    cluster = Cluster()
    tailer: LogTailer | None = None
    old_term = signal.getsignal(signal.SIGTERM)
    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        signal.signal(signal.SIGTERM, _on_term)
    try:
        print("failproxy demo: starting 3 hosts on 127.0.1.1-3 "
              f"(demo app: {APP_WORKERS} workers, UNIX backlog 5, TCP backlog 1024) ...",
              file=out, flush=True)
        cluster.start()
        hosts = cluster.hosts
        if not args.quiet:
            for h in hosts:
                order = [f"{h.name} unix"]
                i = hosts.index(h)
                order += [f"{p.name} tcp" for p in hosts[i + 1:] + hosts[: i + 1]]
                print(f"  {h.name}: proxy {h.proxy_addr}  app tcp {h.app_tcp}  "
                      f"order: {', '.join(order)}", file=out, flush=True)
        shares = ", ".join(f"{h.name} {share:.0%}" for h, share in zip(hosts, SLOW_SHARE,
                                                                         strict=True))
        print(f"sending {args.requests} requests over {args.duration:.1f} s, round-robin over "
              f"the 3 proxies; share of /slow?ms={SLOW_MS}: {shares}", file=out, flush=True)
        if not args.quiet:
            print("failovers as the proxies log them:", file=out, flush=True)
        t0 = time.monotonic()
        tailer = LogTailer(hosts, out, args.quiet, t0)
        tailer.start()
        results = run_load(hosts, args.requests, args.duration)
        wall = time.monotonic() - t0
        time.sleep(0.3)  # let the proxies' last log lines land
        tailer.stop()
        print(summary(hosts, results, tailer.stats, wall), file=out, flush=True)
        return 0
    except (KeyboardInterrupt, _Interrupted):
        print("\ninterrupted; cleaning up", file=sys.stderr, flush=True)
        return 130
    except RuntimeError as exc:
        print(f"failproxy demo: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        if tailer is not None and tailer.is_alive():
            tailer.stop()
        cluster.close()
        if in_main:
            signal.signal(signal.SIGTERM, old_term)


if __name__ == "__main__":
    sys.exit(main())
