"""`failproxy demo`: the seed's 3-host cluster on loopback, the same skewed load twice.

Three hosts on 127.0.1.1-3. Each runs a pre-fork demo app server (`failproxy.demoapp`: 2 workers,
pull model like unicorn, a UNIX socket with backlog 5 and a TCP port with backlog 1024) and two
failproxies in front of it, one per phase:

1. "UNIX socket only": the proxy knows only its box's UNIX socket, no backups. That is a box
   without failproxy's failover: once the backlog is full the connect fails (EAGAIN) and the
   client gets 502.
2. "failproxy": the defaults (`overflow = "room"`), the three app TCP ports as backups and
   `self` set to the box's own.

A client sends the same seeded schedule of requests in both phases, round-robin over the three
proxies as round-robin DNS would, with the slow actions clustered on host1. Phase 2's failover
decisions are printed as the proxies log them; the run ends with the two phases side by side:
errors, fast- and slow-request latency (from each request's scheduled send time), where host1's
requests were answered (from its proxy's `request` events), and how much failproxy changed the
fast-request p99. Every process and socket is cleaned up, also on Ctrl-C.
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

from failproxy import demoapp

HOST_IPS = ("127.0.1.1", "127.0.1.2", "127.0.1.3")
APP_WORKERS = 2
SLOW_MS = 300
SLOW_SHARE = (0.8, 0.0, 0.0)  # share of each front host's traffic that is /slow: all on host1
ECHO_SHARE = 0.1  # share of the rest that is a small POST /echo (the rest is GET /fast)
SEED = 7
DEFAULT_REQUESTS = 600
DEFAULT_RATE = 40.0  # requests per second when --duration is not given
CLIENT_THREADS = 64
REQUEST_TIMEOUT = 10.0
START_TIMEOUT = 15.0
SETTLE = 0.3  # after a phase: the proxies' last log lines land
LIVE_LINES_PER_SECOND = 25
NONE = "none (502/504)"  # a `request` event with no upstream: failproxy answered it itself


@dataclass(frozen=True)
class Phase:
    key: str
    title: str  # the column heading
    failover: bool  # backups and the overflow policy, or the UNIX socket alone
    describe: str


PHASES = (
    Phase("socket", "UNIX socket only", False,
          "each proxy has only its box's UNIX socket, no backups (a box without failproxy's "
          "failover): a full backlog answers 502"),
    Phase("failproxy", "failproxy", True,
          'failproxy\'s defaults: overflow = "room", backups = the 3 app TCP ports, self = the '
          "box's own"),
)

REASONS_HELP = (
    "  reasons: workers_busy = every worker of the box is busy as far as failproxy can tell;\n"
    "    queued = the box's accept queue is not empty; overloaded = its UNIX backlog was full;\n"
    "    held = waited in failproxy until a peer had a free worker; hold_timeout = waited\n"
    "    upstream.hold_timeout (2 s) with no free worker anywhere, then queued at home (own TCP)"
)


@dataclass
class Host:
    name: str
    ip: str
    app_port: int
    sock_path: str
    app_err_path: str

    @property
    def app_tcp(self) -> str:
        return f"{self.ip}:{self.app_port}"


@dataclass
class Front:
    """One host's failproxy for one phase."""

    host: Host
    phase: Phase
    proxy_port: int
    log_path: str
    cfg_path: str
    err_path: str

    @property
    def name(self) -> str:
        return self.host.name

    @property
    def ip(self) -> str:
        return self.host.ip

    @property
    def proxy_addr(self) -> str:
        return f"{self.host.ip}:{self.proxy_port}"


@dataclass
class Result:
    front: str
    kind: str
    status: int = 0
    latency: float = 0.0  # from the scheduled send time to the whole response read
    served_by: str = ""
    via: str = ""
    error: str = ""

    @property
    def fast(self) -> bool:
        return self.kind != "slow"

    @property
    def served_host(self) -> str:
        return self.served_by.split("/")[0]


@dataclass
class LogStats:
    failovers: Counter[str] = field(default_factory=Counter)  # by reason
    routes: Counter[tuple[str, str]] = field(default_factory=Counter)  # (from, to) labels
    exhausted: int = 0
    answered: Counter[tuple[str, str]] = field(default_factory=Counter)  # (front, upstream label)
    held_ms: dict[str, list[float]] = field(default_factory=dict)  # front -> held_ms values
    logged_requests: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)


@dataclass
class PhaseRun:
    phase: Phase
    results: list[Result]
    stats: LogStats
    wall: float


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


def _config_text(front: Front, hosts: Sequence[Host]) -> str:
    host = front.host
    lines = [
        f"# failproxy demo: {host.name}, phase {front.phase.key}",
        "[server]",
        f'listen = ["{front.proxy_addr}"]',
        "workers = 1",
        "",
        "[upstream]",
    ]
    if front.phase.failover:
        lines.append(f'self = "{host.app_tcp}"')  # every other key: the defaults
    lines += ["", "[[upstream.server]]", f'address = "unix:{host.sock_path}"']
    if front.phase.failover:
        for peer in hosts:
            lines += ["", "[[upstream.server]]", f'address = "{peer.app_tcp}"', "backup = true"]
    lines += ["", "[log]", 'format = "json"', "access = true", f'file = "{front.log_path}"', ""]
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
    """The processes of the demo: one app server per host and one failproxy per host and phase,
    all started up front; `close()` ends every one of them and removes the temp dir."""

    def __init__(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="failproxy-demo-")
        self.procs: list[subprocess.Popen[bytes]] = []
        self.hosts: list[Host] = []
        self.fronts: dict[str, list[Front]] = {}

    def start(self) -> None:
        env = _child_env()
        for i, ip in enumerate(HOST_IPS, 1):
            ports = _free_ports(ip, 1 + len(PHASES))
            name = f"host{i}"
            host = Host(name=name, ip=ip, app_port=ports[0],
                        sock_path=os.path.join(self.tmp, f"{name}.sock"),
                        app_err_path=os.path.join(self.tmp, f"{name}.app.stderr"))
            self.hosts.append(host)
            for phase, port in zip(PHASES, ports[1:], strict=True):
                base = os.path.join(self.tmp, f"{name}.{phase.key}")
                self.fronts.setdefault(phase.key, []).append(Front(
                    host=host, phase=phase, proxy_port=port, log_path=base + ".log",
                    cfg_path=base + ".toml", err_path=base + ".stderr"))
        deadline = time.monotonic() + START_TIMEOUT
        apps = []
        for h in self.hosts:
            cmd = [sys.executable, "-m", "failproxy.demoapp", "--name", h.name, "--unix",
                   h.sock_path, "--tcp", h.app_tcp, "--workers", str(APP_WORKERS)]
            apps.append(self._spawn(cmd, env, h.app_err_path))
        for h, proc in zip(self.hosts, apps, strict=True):
            _wait_tcp(h.ip, h.app_port, proc, f"{h.name} demo app", h.app_err_path, deadline)
        started = []
        for fronts in self.fronts.values():
            for f in fronts:
                Path(f.cfg_path).write_text(_config_text(f, self.hosts))
                Path(f.log_path).touch()
                started.append((f, self._spawn(proxy_command(f.cfg_path), env, f.err_path)))
        for f, proc in started:
            _wait_tcp(f.ip, f.proxy_port, proc, f"{f.name} failproxy ({f.phase.title})",
                      f.err_path, deadline)

    def _spawn(self, cmd: list[str], env: dict[str, str], err_path: str) -> subprocess.Popen[bytes]:
        with open(err_path, "wb") as err:
            proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=err,
                                    stderr=err, start_new_session=True)
        self.procs.append(proc)
        return proc

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


def _labels(hosts: Sequence[Host]) -> dict[str, str]:
    labels = {}
    for h in hosts:
        labels[f"unix:{h.sock_path}"] = f"{h.name} unix"
        labels[h.app_tcp] = f"{h.name} tcp"
    return labels


class LogTailer(threading.Thread):
    """Follows one phase's proxy logs (JSON); prints failovers live and counts what they say."""

    def __init__(self, fronts: Sequence[Front], out: TextIO, quiet: bool, t0: float) -> None:
        super().__init__(name="log-tailer", daemon=True)
        self.fronts = fronts
        self.out = out
        self.quiet = quiet
        self.t0 = t0
        self.stats = LogStats()
        self.labels = _labels([f.host for f in fronts])
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
        if self.is_alive():
            self.join(2.0)
        self.poll()
        self._flush_suppressed()
        for f in self._files.values():
            f.close()
        self._files.clear()

    def poll(self) -> None:
        for front in self.fronts:
            f = self._files.get(front.name)
            if f is None:
                try:
                    f = self._files[front.name] = open(front.log_path, "rb")  # noqa: SIM115
                except OSError:
                    continue
            data = self._partial.pop(front.name, b"") + f.read()
            if not data:
                continue
            *lines, rest = data.split(b"\n")
            if rest:
                self._partial[front.name] = rest
            for line in lines:
                self._event(front.name, line)

    def _event(self, host: str, line: bytes) -> None:
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
            detail = f" {ev['errno']}" if ev.get("errno") else ""
            elapsed = ev.get("elapsed_ms")
            if reason in ("held", "hold_timeout") and isinstance(elapsed, (int, float)):
                detail += f" after {elapsed:.0f} ms"
            self._live(f"{host} proxy  {ev.get('method', '')} {ev.get('path', '')}  "
                       f"{src} -> {dst}  [{reason}{detail}]")
        elif name == "upstream_exhausted":
            st.exhausted += 1
            self._live(f"{host} proxy  {ev.get('method', '')} {ev.get('path', '')}  "
                       f"every server failed {ev.get('reasons')} -> {ev.get('status')}")
        elif name == "request":
            st.logged_requests[host] += 1
            upstream = ev.get("upstream")
            st.answered[(host, self.label(upstream) if upstream else NONE)] += 1
            held = ev.get("held_ms")
            if isinstance(held, (int, float)):
                st.held_ms.setdefault(host, []).append(float(held))
        elif ev.get("level") in ("error", "critical"):
            st.errors.append(f"{host}: {line.decode(errors='replace')}")

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
            print(f"         ... and {self._suppressed} more in that second",
                  file=self.out, flush=True)
            self._suppressed = 0


# ---------------------------------------------------------------------------- load


def _plan(n: int, seed: int = SEED) -> list[tuple[int, str, str]]:
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


def _one_request(front: Front, kind: str, path: str, scheduled: float) -> Result:
    res = Result(front=front.name, kind=kind)
    conn = http.client.HTTPConnection(front.ip, front.proxy_port, timeout=REQUEST_TIMEOUT)
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
        # From the scheduled send time: a request the client sent late still counts its wait.
        res.latency = time.monotonic() - scheduled
        conn.close()
    return res


def run_load(fronts: Sequence[Front], n: int, duration: float) -> list[Result]:
    """The seeded schedule: request i is sent at i * duration / n, open loop."""
    plan = _plan(n)
    interval = duration / max(1, n)
    futures: list[Future[Result]] = []
    pool = ThreadPoolExecutor(max_workers=CLIENT_THREADS, thread_name_prefix="client")
    try:
        t0 = time.monotonic()
        for i, (front, kind, path) in enumerate(plan):
            at = t0 + i * interval
            delay = at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            futures.append(pool.submit(_one_request, fronts[front], kind, path, at))
        return [f.result() for f in futures]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------------------- summary


def _pct(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def _ms(values: Sequence[float], q: float) -> str:
    return f"{_pct(values, q):.1f}" if values else "-"


def _table(rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    out = []
    for j, row in enumerate(cells):
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join("  " + line for line in out)


def _latencies(results: Sequence[Result], fast: bool, front: str | None = None) -> list[float]:
    return [r.latency * 1000 for r in results
            if not r.error and r.fast == fast and (front is None or r.front == front)]


def phase_line(run: PhaseRun) -> str:
    ok = sum(1 for r in run.results if not r.error)
    return (f"  {run.phase.title}: {len(run.results)} requests in {run.wall:.1f} s, {ok} ok, "
            f"{len(run.results) - ok} errors")


def _ratio_line(before: float | None, after: float | None, titles: tuple[str, str]) -> str:
    """How failproxy changed the fast p99, from the values as the table shows them."""
    if before is None or after is None:
        return "fast-request p99: not measured in both phases (no fast request answered)"
    if after > 0 and before > after:
        return (f"failproxy cut the fast-request p99 {before / after:.1f}x: from {before:.1f} ms "
                f"({titles[0]}) to {after:.1f} ms ({titles[1]})")
    if before > 0 and after > before:
        return (f"failproxy did not cut the fast-request p99: it rose {after / before:.1f}x, "
                f"from {before:.1f} ms ({titles[0]}) to {after:.1f} ms ({titles[1]})")
    return f"failproxy left the fast-request p99 as it was: {before:.1f} ms in both phases"


def comparison(hosts: Sequence[Host], runs: Sequence[PhaseRun]) -> str:
    """The side-by-side table of the phases, and the lines that read it."""
    first = hosts[0].name
    titles = [run.phase.title for run in runs]
    rows: list[list[object]] = [["", *titles]]

    def row(label: str, cells: Sequence[object]) -> None:
        rows.append([label, *cells])

    row("requests ok/sent", [f"{sum(1 for r in run.results if not r.error)}/{len(run.results)}"
                             for run in runs])
    row("errors", [sum(1 for r in run.results if r.error) for run in runs])
    for kind, fast in (("fast", True), ("slow", False)):
        for name, q in (("p50", 0.5), ("p99", 0.99)):
            row(f"{kind} {name} ms", [_ms(_latencies(run.results, fast), q) for run in runs])
    for h in hosts:  # where the fast tail is: behind host1's slow requests, at home or a peer's
        row(f"{h.name} fast p99 ms", [_ms(_latencies(run.results, True, h.name), 0.99)
                                      for run in runs])
    row("answered off their box", [sum(1 for r in run.results if not r.error
                                       and r.served_host != r.front) for run in runs])

    # Where host1's requests went, per destination, from host1's proxy's `request` events.
    order = [f"{first} unix"] + [f"{h.name} tcp" for h in hosts[1:]] + [f"{first} tcp"]
    seen = {dest for run in runs for (front, dest) in run.stats.answered if front == first}
    order += [*sorted(seen - set(order) - {NONE}), NONE]
    rows.append([f"{first}'s requests answered by:", *[""] * len(runs)])
    for dest in order:
        row(f"  {dest}", [run.stats.answered[(first, dest)] for run in runs])
    row(f"{first} requests held", [len(run.stats.held_ms.get(first, [])) for run in runs])
    row(f"{first} longest hold ms",
        [f"{max(run.stats.held_ms[first]):.0f}" if run.stats.held_ms.get(first) else "-"
         for run in runs])
    reasons = sorted({reason for run in runs for reason in run.stats.failovers},
                     key=lambda r: (-sum(run.stats.failovers[r] for run in runs), r))
    row("failovers", [sum(run.stats.failovers.values()) for run in runs])
    for reason in reasons:
        row(f"  {reason}", [run.stats.failovers[reason] for run in runs])

    shares = ", ".join(f"{h.name} {s:.0%}" for h, s in zip(hosts, SLOW_SHARE, strict=True))
    lines = [f"\ncomparison: the same {len(runs[0].results)} requests (seed {SEED}) in each phase, "
             f"/slow?ms={SLOW_MS} share {shares}",
             "  fast = /fast and /echo; latency in ms from the scheduled send time, over answered "
             "requests;",
             f"  {first}'s requests by who answered them, from its proxy's `request` events\n",
             _table(rows), ""]

    def p99(run: PhaseRun) -> float | None:
        values = _latencies(run.results, True)
        return round(_pct(values, 0.99), 1) if values else None

    if len(runs) == 2:
        lines.append(_ratio_line(p99(runs[0]), p99(runs[1]), (titles[0], titles[1])))
        few = min(len(_latencies(run.results, True)) for run in runs)
        if 0 < few < 100:
            lines.append(f"  (only {few} fast requests answered in a phase: a p99 of so few is "
                         "about their slowest one)")
    for run in runs:
        errors = Counter(r.error for r in run.results if r.error)
        if errors:
            lines.append(f"  {run.phase.title} errors: "
                         + ", ".join(f"{e} x{c}" for e, c in errors.most_common())
                         + " (not in its latency columns)")
        logged = sum(run.stats.logged_requests.values())
        if logged != len(run.results):
            lines.append(f"  {run.phase.title}: the proxies logged {logged} request events for "
                         f"{len(run.results)} requests sent")
        for err in run.stats.errors[:5]:
            if '"upstream_exhausted"' not in err:
                lines.append(f"  {run.phase.title} proxy error: {err}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="failproxy demo",
        description="A 3-host cluster on loopback (127.0.1.1-3): demo app servers, driven by "
                    "the same skewed load twice, through the UNIX socket alone and through "
                    "failproxy; prints failovers live and the two side by side.")
    p.add_argument("--requests", type=int, default=DEFAULT_REQUESTS,
                   help=f"requests to send in each phase (default {DEFAULT_REQUESTS})")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds to spread them over, in each phase "
                        f"(default: requests / {DEFAULT_RATE:g})")
    p.add_argument("--quiet", action="store_true",
                   help="print only the phases' results and the comparison, not the failovers "
                        "as they happen")
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


def _run_phase(i: int, fronts: Sequence[Front], args: argparse.Namespace,
               out: TextIO) -> PhaseRun:
    phase = fronts[0].phase
    print(f"\nphase {i} of {len(PHASES)}: {phase.title}: {phase.describe}", file=out, flush=True)
    if not args.quiet:
        if phase.failover:
            print(REASONS_HELP, file=out, flush=True)
        print("failovers and 502s as the proxies log them:", file=out, flush=True)
    t0 = time.monotonic()
    tailer = LogTailer(fronts, out, args.quiet, t0)
    tailer.start()
    try:
        results = run_load(fronts, args.requests, args.duration)
        wall = time.monotonic() - t0
        time.sleep(SETTLE)
    finally:
        tailer.stop()
    run = PhaseRun(phase, results, tailer.stats, wall)
    print(phase_line(run), file=out, flush=True)
    return run


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parse(argv)
    except SystemExit as exc:  # --help or bad usage: return the status, as cli.main does
        return exc.code if isinstance(exc.code, int) else 2
    out = sys.stdout
    cluster = Cluster()
    old_term = signal.getsignal(signal.SIGTERM)
    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        signal.signal(signal.SIGTERM, _on_term)
    try:
        print(f"failproxy demo: starting 3 hosts on 127.0.1.1-3 (demo app: {APP_WORKERS} "
              f"workers, UNIX backlog {demoapp.UNIX_BACKLOG}, TCP backlog "
              f"{demoapp.TCP_BACKLOG}), each with one failproxy per phase ...",
              file=out, flush=True)
        cluster.start()
        hosts = cluster.hosts
        if not args.quiet:
            for h in hosts:
                proxies = "  ".join(f"{f.phase.key} proxy {f.proxy_addr}"
                                    for p in PHASES for f in cluster.fronts[p.key]
                                    if f.host is h)
                print(f"  {h.name}: app tcp {h.app_tcp}  {proxies}", file=out, flush=True)
        shares = ", ".join(f"{h.name} {share:.0%}" for h, share in zip(hosts, SLOW_SHARE,
                                                                         strict=True))
        print(f"each phase sends the same {args.requests} requests over {args.duration:.1f} s, "
              f"round-robin over the 3 proxies; share of /slow?ms={SLOW_MS}: {shares}",
              file=out, flush=True)
        runs = [_run_phase(i, cluster.fronts[phase.key], args, out)
                for i, phase in enumerate(PHASES, 1)]
        print(comparison(hosts, runs), file=out, flush=True)
        return 0
    except (KeyboardInterrupt, _Interrupted):
        print("\ninterrupted; cleaning up", file=sys.stderr, flush=True)
        return 130
    except RuntimeError as exc:
        print(f"failproxy demo: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        cluster.close()
        if in_main:
            signal.signal(signal.SIGTERM, old_term)


if __name__ == "__main__":
    sys.exit(main())
