"""Scenario "slowclients" (issue 18): failproxy and nginx in front of real unicorn, with slow
clients, side by side in one run.

unicorn's authors require "a reverse proxy capable of fully buffering both the request and
response" in front of it, because a unicorn worker serves one request from its first byte to its
last: whoever holds the connection to it holds the worker. This scenario measures what the
buffering is for, through failproxy (its defaults: request and response buffering on) and nginx
with the seed's config (`server unix:... fail_timeout=0`, nginx's default buffering), both with
1 worker, in front of one real unicorn (2 workers, UNIX socket backlog 5, the Rack app in
bench/targets/slowclients_app/: `/fast`, `/upload`, `/big` = 8 MiB).

1. **Slow clients.** Fast GETs at a steady open-loop rate (bench/instruments/openloop.py: a Poisson
   stream, a new connection per request, latency from the scheduled send time) while N slow
   uploaders and N slow readers (bench/scenarios/slowload.py, a process of its own) run, for each N
   of the size. Per proxy and N: fast-request p50/p99/max and errors, the fast p99 over nginx's in
   the same run and over the same proxy's N = 0 run (issue 18's targets: both <= 1.2x), the slow
   clients' own counts, and the proxy's CPU, worker RSS and temp-file bytes at the end of the
   window. Runs are interleaved (for each N, both proxies, the order alternating), each on a
   freshly started proxy, unicorn drained between runs. Rounds > 1 repeat that, and the
   figures are medians over rounds.
2. **Memory.** (a) `mem_readers` clients ask for an 8 MiB answer each and read nothing: the
   proxy worker's RSS growth (VmRSS, /proc) and the bytes in its temp files (the sizes of its
   open fds in its temp dir; for failproxy also the admin endpoint's
   `failproxy_temp_file_bytes`), target for failproxy <= 64 MiB; nginx the same way for scale.
   Upstream: a stub (nginx serving the 8 MiB as a file with sendfile, backlog 4096), because a
   thousand requests for /big at once would overflow unicorn's backlog of 5 whatever the
   proxy, and 8 GB out of two Ruby workers would only measure unicorn. (b) one upload of
   `upload_mib` MiB, streamed from a generator (never held by the client), through failproxy
   (`max_body_bytes = 0`) to unicorn, which answers its size and sha256: intact or not, and
   the worker's peak RSS growth (VmHWM after `echo 5 > /proc/PID/clear_refs`), target
   <= 32 MiB.

Every run is bounded: the schedule's length, each fast request `timeout` seconds, the slow
clients' process `--max-seconds`, every wait a deadline. Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import select
import shutil
import signal
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.instruments import openloop
from bench.instruments.procs import (
    Proc,
    Processes,
    StartError,
    announce,
    children,
    http_get,
    rss_kb,
    wait_http,
    wait_unix_listening,
)
from bench.instruments.stats import median, percentile
from bench.instruments.system import free_port, log, which
from bench.targets import servers

HOST = "127.0.0.1"
APP_DIR = Path(__file__).resolve().parents[1] / "targets" / "slowclients_app"
UNICORN_WORKERS = 2
UNIX_BACKLOG = 5
BIG = b"0123456789abcdef" * 65536 * 8  # the app's /big, 8 MiB
PROXIES = ("nginx", "failproxy")
REFERENCE = "nginx"
TARGET_RATIO = 1.2  # issue 18: fast p99 <= 1.2x nginx's, and <= 1.2x its own N = 0
TARGET_READERS_MIB = 64  # issue 18: RSS growth with 1000 slow readers of 8 MiB
TARGET_UPLOAD_MIB = 32  # issue 18: peak RSS growth during a 1 GiB upload
LABELS = {
    "nginx": "nginx, the seed's config (`server unix:… fail_timeout=0`, default buffering)",
    "failproxy": "failproxy defaults (request and response buffering on)",
}


@dataclass(frozen=True)
class Params:
    ns: tuple[int, ...]  # slow uploaders (and as many slow readers) per run; 0 = baseline
    duration: float  # seconds of fast arrivals per run
    rate: float = 100.0  # fast requests per second (Poisson)
    rounds: int = 1
    workers: int = 1  # per proxy, nginx and failproxy alike
    timeout: float = 10.0  # per fast request; past it, an error ("timeout")
    settle: float = 3.0  # after the slow clients' ramp, before the measured window
    ramp_per_s: float = 50.0  # slow clients started per second (both kinds together)
    mem_readers: int = 1000  # memory (a)
    mem_hold: float = 3.0  # memory (a): seconds the readers hold on once the proxy has it all
    mem_waves: int = 2  # memory (a): waves of readers on the same worker (leak or reuse)
    upload_mib: int = 256  # memory (b)
    proxies: tuple[str, ...] = PROXIES


def _ramp(p: Params, n: int) -> float:
    return max(1.0, 2 * n / p.ramp_per_s) if n else 0.0


def estimate_seconds(p: Params) -> float:
    runs = sum(len(p.proxies) * (p.duration + p.timeout / 2 + _ramp(p, n)
                                 + (p.settle if n else 0) + 4) for n in p.ns)
    return 5 + p.rounds * runs + len(p.proxies) * p.mem_waves * (p.mem_readers / 100 + 10) \
        + 10 + p.upload_mib / 40


# ---------------------------------------------------------------- /proc: workers and temp files

def worker_pids(proc: Proc) -> list[int]:
    """A prefork proxy's workers (its master's children); the master itself if it has none."""
    return children(proc.pid) or [proc.pid]


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, ... of a process, in kB."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k.startswith("Vm"):
                out[k] = int(v.split()[0])
    return out


def reset_peak_rss(pid: int) -> bool:
    """VmHWM back to the current RSS (Linux >= 4.0: `echo 5 > /proc/PID/clear_refs`)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def temp_files(pids: list[int], root: Path) -> tuple[int, int]:
    """(how many, bytes) of the open fds of `pids` that are files under `root`: failproxy's
    O_TMPFILE files show as '<dir>/#N (deleted)', nginx's unlinked ones as '<dir>/N (deleted)';
    stat through /proc/PID/fd/N still gives their size."""
    count = size = 0
    prefix = str(root) + "/"
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        with contextlib.suppress(OSError):
            for fd in os.listdir(fd_dir):
                with contextlib.suppress(OSError):
                    if os.readlink(f"{fd_dir}/{fd}").startswith(prefix):
                        count += 1
                        size += os.stat(f"{fd_dir}/{fd}").st_size
    return count, size


def metrics_gauge(admin: tuple[str, int], name: str) -> float | None:
    """One sample of failproxy's admin /metrics, None if it cannot be read."""
    try:
        status, _, body = http_get(admin[0], admin[1], "/metrics", timeout=5.0)
    except (OSError, ValueError, IndexError):
        return None
    if status != 200:
        return None
    for line in body.decode(errors="replace").splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


# ---------------------------------------------------------------- processes

def start_unicorn(procs: Processes) -> tuple[str, Proc]:
    exe = which("unicorn")
    assert exe is not None
    sock = str(procs.workdir / "unicorn.sock")
    tmp = procs.workdir / "unicorn.tmp"  # TeeInput spools request bodies here
    tmp.mkdir(exist_ok=True)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(procs.workdir),
           "TMPDIR": str(tmp), "BENCH_UNIX": sock, "BENCH_DIR": str(procs.workdir),
           "BENCH_WORKERS": str(UNICORN_WORKERS), "BENCH_UNIX_BACKLOG": str(UNIX_BACKLOG)}
    proc = procs.start("unicorn", [exe, "-E", "production", "-c",
                                   str(APP_DIR / "unicorn.conf.rb"), str(APP_DIR / "config.ru")],
                       env=env)
    wait_unix_listening(proc, sock, timeout=30)
    wait_http(proc, "localhost", 0, "/fast", timeout=30, unix=sock)
    announce(proc, f"unicorn {UNICORN_WORKERS} workers on unix:{sock} (backlog {UNIX_BACKLOG})")
    return sock, proc


def start_stub(procs: Processes) -> str:
    """nginx, 1 worker, serving the 8 MiB answer as a file (sendfile) on a UNIX socket with a
    large backlog: an upstream that writes 8 MiB fast to as many proxies' requests as come."""
    root = procs.workdir / "stub"
    root.mkdir(exist_ok=True)
    (root / "big").write_bytes(BIG)
    (root / "index.html").write_text("ok\n")
    sock = str(procs.workdir / "stub.sock")
    conf = (servers._nginx_main(procs.workdir, "stub", 1, 20000)
            + "http {\n  access_log off;\n" + servers._nginx_http_common(procs.workdir, "stub")
            + "  sendfile on;\n  keepalive_requests 1000000;\n  keepalive_timeout 300s;\n"
            + f"  server {{\n    listen unix:{sock} backlog=4096;\n    root {root};\n"
            + "    location / { default_type application/octet-stream; }\n  }\n}\n")
    proc = servers.start_nginx(procs, "stub", conf)
    wait_unix_listening(proc, sock)
    wait_http(proc, "localhost", 0, "/", unix=sock)
    announce(proc, f"stub upstream (nginx, /big = 8 MiB file, sendfile) on unix:{sock}")
    return sock


@dataclass
class Proxy:
    kind: str
    proc: Proc
    port: int
    temp_root: Path  # where its temp files go
    log_path: Path
    admin: tuple[str, int] | None = None


def start_proxy(procs: Processes, kind: str, name: str, upstream_sock: str, workers: int, *,
                extra_server: dict[str, Any] | None = None, admin: bool = False,
                worker_connections: int = 4096) -> Proxy:
    """failproxy with its defaults, or nginx with the seed's config, on 127.0.0.1:<free port>.
    failproxy's temp_dir is set to a directory of its own (the default is $TMPDIR, else /tmp)
    only so that its temp files can be counted apart; nothing about buffering is changed."""
    port = free_port()
    if kind == "nginx":
        conf = servers.nginx_proxy_conf(procs.workdir, name, listen=f"{HOST}:{port}",
                                        upstream_servers=[f"unix:{upstream_sock} fail_timeout=0"],
                                        keepalive=0, workers=workers,
                                        worker_connections=worker_connections)
        proc = servers.start_nginx(procs, name, conf)
        wait_http(proc, HOST, port, "/fast" if "stub" not in upstream_sock else "/")
        announce(proc, f"nginx {workers} worker(s) on {HOST}:{port} (seed config)")
        return Proxy(kind, proc, port, procs.workdir / f"{name}.tmp",
                     procs.workdir / f"{name}.access.log")
    spill = procs.workdir / f"{name}.spill"
    spill.mkdir(exist_ok=True)
    logfile = procs.workdir / f"{name}.log"
    cfg: dict[str, Any] = {
        "server": {"listen": [f"{HOST}:{port}"], "workers": workers, "temp_dir": str(spill),
                   **(extra_server or {})},
        "upstream": {"server": [{"address": f"unix:{upstream_sock}"}]},
        "log": {"file": str(logfile)},
    }
    admin_addr = None
    if admin:
        admin_addr = (HOST, free_port())
        cfg["admin"] = {"listen": f"{admin_addr[0]}:{admin_addr[1]}"}
    proc = servers.start_failproxy(procs, name, cfg, probe=(HOST, port))
    return Proxy(kind, proc, port, spill, logfile, admin_addr)


def drain(sock: str, limit: float = 30.0) -> float:
    """Wait until unicorn answers a fast request quickly (its queue is empty)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        s = time.monotonic()
        with contextlib.suppress(OSError, ValueError, IndexError):
            http_get("localhost", 0, "/fast", timeout=10, unix=sock)
            if time.monotonic() - s < 0.02:
                break
        time.sleep(0.1)
    return time.monotonic() - t0


# ---------------------------------------------------------------- the proxies' own logs

# failproxy's own start and stop (the harness stops a proxy's whole process group, so a
# worker_exited at the end is the harness's doing; a worker restarted during a run shows in
# `workers_replaced` instead)
LIFECYCLE = frozenset({"starting", "started", "self_detected", "worker_started", "worker_stopping",
                       "worker_exited", "stopping", "stopped", "listening"})
NGINX_LINE = re.compile(r'"(\S+) (\S+)[^"]*" (\d{3}) ')


def read_proxy_log(proxy: Proxy) -> dict[str, Any]:
    """Status counts per path from the proxy's own access log, and for failproxy the count of
    every other event it logged (errors, warnings)."""
    statuses: dict[str, Counter[str]] = {}
    events: Counter[str] = Counter()
    try:
        text = proxy.log_path.read_text(errors="replace")
    except OSError:
        return {"statuses": {}, "events": {}}
    for line in text.splitlines():
        if proxy.kind == "nginx":
            m = NGINX_LINE.search(line)
            if m:
                path = m.group(2).split("?")[0]
                statuses.setdefault(path, Counter())[m.group(3)] += 1
            continue
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        name = str(ev.get("event"))
        if name == "request":
            path = str(ev.get("path", "")).split("?")[0]
            statuses.setdefault(path, Counter())[str(ev.get("status"))] += 1
        elif name not in LIFECYCLE:
            events[f"{name}:{ev.get('level', '')}"] += 1
    if proxy.kind == "nginx":
        err = proxy.log_path.with_name(proxy.log_path.name.replace(".access.log",
                                                                    ".error.log"))
        with contextlib.suppress(OSError):
            for line in err.read_text(errors="replace").splitlines():
                m = re.search(r"\[(\w+)\]", line)
                if m:
                    # the message without its variable parts, e.g. "connect() ... failed (11: …)"
                    msg = re.sub(r"^.*?\*\d+ ", "", line).split(", client:")[0]
                    msg = re.sub(r"[0-9]+", "N", re.sub(r"/\S+", "…", msg))
                    events[f"{m.group(1)}: {msg[:100]}"] += 1
    return {"statuses": {k: dict(v) for k, v in sorted(statuses.items())},
            "events": dict(events)}


# ---------------------------------------------------------------- 1. slow clients

def _start_slow(procs: Processes, name: str, port: int, n: int, p: Params) -> tuple[Proc, Path]:
    ready = procs.workdir / f"{name}.ready"
    out = procs.workdir / f"{name}.json"
    ramp = _ramp(p, n)
    argv = [sys.executable, "-m", "bench.scenarios.slowload", "--host", HOST, "--port", str(port),
            "--uploaders", str(n), "--readers", str(n), "--ramp", f"{ramp:g}",
            "--settle", f"{p.settle:g}", "--ready", str(ready), "--out", str(out),
            "--max-seconds", f"{ramp + p.settle + p.duration + p.timeout + 60:g}"]
    proc = procs.start(name, argv, env=servers.python_env())
    deadline = time.monotonic() + ramp + p.settle + 30
    while not ready.exists():
        if not proc.alive():
            raise StartError(f"{name} exited:\n{proc.log_tail()}")
        if time.monotonic() > deadline:
            raise StartError(f"{name}: not ready after {ramp + p.settle + 30:g} s")
        time.sleep(0.1)
    return proc, out


def _stop_slow(procs: Processes, proc: Proc, out: Path) -> dict[str, Any]:
    with contextlib.suppress(ProcessLookupError):
        proc.popen.send_signal(signal.SIGTERM)
    with contextlib.suppress(Exception):
        proc.popen.wait(timeout=20)
    procs.stop(proc)
    try:
        return dict(json.loads(out.read_text()))
    except (OSError, ValueError) as exc:
        return {"error": f"no result from the slow clients ({exc}): {proc.log_tail(5)}"}


def one_run(procs: Processes, kind: str, n: int, rnd: int, p: Params, sock: str,
            plan: list[openloop.Arrival]) -> tuple[dict[str, Any], list[float]]:
    """One proxy, one N, one round: a fresh proxy, N uploaders and N readers ramped up, the
    round's fast schedule measured, then everything stopped and unicorn drained."""
    name = f"{kind}-n{n}-r{rnd + 1}"
    row: dict[str, Any] = {"proxy": kind, "n": n, "round": rnd + 1}
    try:
        proxy = start_proxy(procs, kind, name, sock, p.workers,
                            worker_connections=max(4096, 4 * n + 1000))
    except (StartError, OSError) as exc:
        log(f"  !! {name}: did not start: {exc}")
        row["error"] = str(exc)[:2000]
        return row, []
    slow: Proc | None = None
    lat: list[float] = []
    try:
        pids = worker_pids(proxy.proc)
        for _ in range(10):
            http_get(HOST, proxy.port, "/fast", timeout=5)
        rss0 = sum(rss_kb(x) for x in pids)
        if n:
            slow, out = _start_slow(procs, f"slow-{name}", proxy.port, n, p)
        cpu0 = proxy.proc.cpu_seconds()
        t0 = time.monotonic()
        res = openloop.run([openloop.Front(kind, HOST, proxy.port)], plan, slow_ms=0,
                           timeout=p.timeout)
        window = time.monotonic() - t0
        cpu = proxy.proc.cpu_seconds() - cpu0
        rss1 = sum(rss_kb(x) for x in pids)
        replaced = sorted(set(worker_pids(proxy.proc)) ^ set(pids))
        tcount, tbytes = temp_files(pids, proxy.temp_root)
        slow_res = _stop_slow(procs, slow, out) if slow is not None else None
        slow = None
    finally:
        if slow is not None:
            procs.stop(slow)
        procs.stop(proxy.proc)
    summary = res.summary()
    ok = [o for o in res.outcomes if o.status == 200]
    lat = sorted(round(o.latency_ms, 3) for o in ok)
    row.update({
        "planned": summary["planned"], "sent": summary["sent"], "ok": summary["ok"],
        "errors": summary["errors"], "error_count": summary["error_count"],
        "p50_ms": percentile(lat, 50), "p90_ms": percentile(lat, 90),
        "p99_ms": percentile(lat, 99), "max_ms": lat[-1] if lat else float("nan"),
        "client_lag_p99_ms": summary["client_lag_p99_ms"],
        "client_lag_max_ms": summary["client_lag_max_ms"], "digest": summary["digest"],
        "complete": (res.sent == res.planned and not res.skipped and not res.lost
                     and len(res.outcomes) == res.planned),
        "proxy_cpu_s": round(cpu, 2), "proxy_cpu_share": round(cpu / window, 3),
        "worker_rss_kb_before": rss0, "worker_rss_kb_end": rss1,
        "temp_files_end": tcount, "temp_bytes_end": tbytes,
        "workers_replaced": replaced, "slow": slow_res, "proxy_log": read_proxy_log(proxy),
    })
    waited = drain(sock)
    s = slow_res or {}
    w = s.get("window", {})
    log(f"  r{rnd + 1} N={n:<4} {kind:<9} fast ok {row['ok']}/{row['planned']} err "
        f"{row['error_count']}  p50 {row['p50_ms']:.1f}  p99 {row['p99_ms']:.1f}  max "
        f"{row['max_ms']:.1f} ms  | slow: uploads ok {w.get('uploads_ok', '-')} err "
        f"{w.get('error_count', '-')} (ramp err {s.get('ramp', {}).get('error_count', '-')}), "
        f"read {w.get('read_bytes', 0) / 2**20:.0f} MiB  | proxy CPU {cpu / window:.0%}, RSS "
        f"{rss0 // 1024}->{rss1 // 1024} MiB, temp {tbytes / 2**20:.0f} MiB in {tcount} files"
        + (f"  (unicorn drained in {waited:.1f} s)" if waited > 1 else ""))
    return row, lat


def _median_of(rows: list[dict[str, Any]], key: str) -> float:
    vals = [r[key] for r in rows if r.get(key) is not None and r[key] == r[key]]
    return median(vals)


def combine(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Over the rounds of one (proxy, N): medians of the latency figures, sums of the counts."""
    good = [r for r in rows if "error" not in r]
    if not good:
        return {"error": next((r["error"] for r in rows if "error" in r), "no run")}
    errors: Counter[str] = Counter()
    slow_errors: Counter[str] = Counter()
    ramp_errors: Counter[str] = Counter()
    uploads = read = answers = 0
    for r in good:
        errors.update(r["errors"])
        s = r.get("slow") or {}
        slow_errors.update(s.get("window", {}).get("errors", {}))
        ramp_errors.update(s.get("ramp", {}).get("errors", {}))
        uploads += s.get("window", {}).get("uploads_ok", 0)
        answers += s.get("window", {}).get("big_answers_ok", 0)
        read += s.get("window", {}).get("read_bytes", 0)
        if s.get("error"):
            slow_errors["slow_client_process"] += 1
    out: dict[str, Any] = {k: _median_of(good, k) for k in (
        "p50_ms", "p90_ms", "p99_ms", "max_ms", "proxy_cpu_share", "worker_rss_kb_end",
        "temp_bytes_end", "client_lag_max_ms")}
    out.update({
        "planned": sum(r["planned"] for r in good), "sent": sum(r["sent"] for r in good),
        "ok": sum(r["ok"] for r in good), "errors": dict(errors),
        "error_count": sum(errors.values()),
        "complete": all(r["complete"] for r in good) and len(good) == len(rows),
        "slow_errors": dict(slow_errors), "slow_error_count": sum(slow_errors.values()),
        "slow_ramp_errors": dict(ramp_errors), "uploads_ok": uploads,
        "big_answers_ok": answers, "read_bytes": read,
        "upload_answer_p99_ms": _median_of([(r.get("slow") or {}).get("window", {})
                                            for r in good], "upload_answer_p99_ms"),
        "rounds_run": len(good),
    })
    return out


def ratios(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Paired per round: each proxy's fast p99 over nginx's at the same N, and over its own
    N = 0 run; median, min and max over rounds."""
    by = {(r["proxy"], r["n"], r["round"]): r for r in rows if "error" not in r}
    out: dict[str, Any] = {}
    for (kind, n, rnd), r in sorted(by.items()):
        for what, base in (("vs_nginx", by.get((REFERENCE, n, rnd))),
                           ("vs_n0", by.get((kind, 0, rnd)))):
            if base is None or base is r or not base["p99_ms"] or r["p99_ms"] != r["p99_ms"]:
                continue
            out.setdefault(f"{kind}/{n}", {}).setdefault(what, []).append(
                r["p99_ms"] / base["p99_ms"])
    return {k: {w: {"median": median(v), "min": min(v), "max": max(v),
                    "per_round": [round(x, 4) for x in v]} for w, v in d.items()}
            for k, d in out.items()}


# ---------------------------------------------------------------- 2a. idle readers of 8 MiB

def _open_readers(port: int, n: int) -> list[socket.socket]:
    """n connections, each with a 4 KiB receive buffer, each having sent GET /big; paced at
    about 200 a second so that the proxy fetches a few answers at a time."""
    socks: list[socket.socket] = []
    try:
        for i in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.settimeout(5)
            s.connect((HOST, port))
            s.sendall(b"GET /big HTTP/1.1\r\nHost: app\r\n\r\n")
            if i % 20 == 19:
                time.sleep(0.1)
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


def _heads(socks: list[socket.socket], limit: float = 20.0
           ) -> tuple[Counter[str], dict[int, bytes]]:
    """The status each held connection got, read from the first bytes of its answer: '200',
    another status, 'closed', 'reset' or 'no_head' (nothing within `limit` seconds); and the
    bytes read from each (by fileno), so that some can be read on to their end."""
    out: Counter[str] = Counter()
    bufs = {s.fileno(): b"" for s in socks}
    by_fd = {s.fileno(): s for s in socks}
    for s in socks:
        s.setblocking(False)
    deadline = time.monotonic() + limit
    pending = set(bufs)
    while pending and time.monotonic() < deadline:
        # poll, not select: fds past 1024
        poller = select.poll()
        for fd in pending:
            poller.register(fd, select.POLLIN)
        for fd, _ in poller.poll(500):
            try:
                data = by_fd[fd].recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                out["reset"] += 1
                pending.discard(fd)
                continue
            if not data:
                out["closed"] += 1
                pending.discard(fd)
                continue
            bufs[fd] += data
            if b"\r\n" in bufs[fd]:
                parts = bufs[fd].split(b" ", 2)
                out[parts[1].decode(errors="replace") if len(parts) > 2 else "bad"] += 1
                pending.discard(fd)
    out["no_head"] += len(pending)
    return +out, bufs


def _rest_is_big(s: socket.socket, first: bytes, timeout: float = 60.0) -> bool:
    """Read one held answer to its end (`first`: what _heads read of it): is it 200 + BIG?"""
    s.setblocking(True)
    s.settimeout(timeout)
    buf = first
    while b"\r\n\r\n" not in buf:
        data = s.recv(65536)
        if not data:
            return False
        buf += data
    head, _, body = buf.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        return False
    chunks = [body]
    got = len(body)
    while got < len(BIG):
        data = s.recv(1 << 20)
        if not data:
            break
        chunks.append(data)
        got += len(data)
    return b"".join(chunks) == BIG


def _wave(proxy: Proxy, pid: int, n: int, p: Params) -> dict[str, Any]:
    """One wave of `n` idle readers: opened, held until the proxy has every answer, measured,
    checked, closed; the worker's RSS before, held and after."""
    before = proc_status(pid)
    peak_reset = reset_peak_rss(pid)
    t0 = time.monotonic()
    socks = _open_readers(proxy.port, n)
    try:
        opened_s = time.monotonic() - t0
        # the proxy has it all once its temp files stop growing
        # (1 s unchanged with a file per reader, or 10 s unchanged whatever the count)
        deadline = time.monotonic() + 120 + n / 10
        last = (-1, -1)
        stable = 0
        while time.monotonic() < deadline and not (
                stable >= 40 or (stable >= 4 and last[0] >= 0.98 * n)):
            time.sleep(0.25)
            now = temp_files([pid], proxy.temp_root)
            stable = stable + 1 if now == last else 0
            last = now
        filled_s = time.monotonic() - t0
        time.sleep(p.mem_hold)  # the readers read nothing for a while
        held = proc_status(pid)
        tcount, tbytes = temp_files([pid], proxy.temp_root)
        gauge = (metrics_gauge(proxy.admin, "failproxy_temp_file_bytes") if proxy.admin
                 else None)
        heads, firsts = _heads(socks)
        # three of them read their answer whole: it is intact
        sample_ok = 0
        for s in socks[:: max(1, n // 3)][:3]:
            with contextlib.suppress(OSError):
                if _rest_is_big(s, firsts[s.fileno()]):
                    sample_ok += 1
    finally:
        for s in socks:
            s.close()
    deadline = time.monotonic() + 10
    after = temp_files([pid], proxy.temp_root)
    while after[0] and time.monotonic() < deadline:
        time.sleep(0.2)
        after = temp_files([pid], proxy.temp_root)
    time.sleep(0.5)
    released = proc_status(pid)
    grown = (held["VmRSS"] - before["VmRSS"]) / 1024
    peak = (held["VmHWM"] - before["VmRSS"]) / 1024 if peak_reset else None
    return {
        "rss_before_kb": before["VmRSS"], "rss_held_kb": held["VmRSS"],
        "rss_growth_mib": round(grown, 1), "peak_growth_mib": None if peak is None
        else round(peak, 1), "rss_after_close_kb": released["VmRSS"],
        "temp_files": tcount, "temp_bytes": tbytes, "temp_gauge_bytes": gauge,
        "temp_files_after_close": after[0], "temp_bytes_after_close": after[1],
        "heads": dict(heads), "errors": sum(v for k, v in heads.items() if k != "200"),
        "sample_read_whole_ok": sample_ok, "open_s": round(opened_s, 1),
        "filled_s": round(filled_s, 1)}


def mem_readers(procs: Processes, kind: str, stub: str, p: Params) -> dict[str, Any]:
    """Memory (a) for one proxy: `mem_readers` idle readers of an 8 MiB answer, in
    `mem_waves` waves on the same worker: the first gives the figures; a later one, compared
    with it, tells memory kept for reuse (the same RSS again) from a leak (more again)."""
    name = f"mem-{kind}"
    n = p.mem_readers
    row: dict[str, Any] = {"proxy": kind, "readers": n, "upstream": "stub"}
    proxy = start_proxy(procs, kind, name, stub, 1, admin=(kind == "failproxy"),
                        worker_connections=2 * n + 1000)
    waves = []
    try:
        pid = worker_pids(proxy.proc)[0]
        for _ in range(3):  # warm-up: whole answers, and some spilling
            status, _, body = http_get(HOST, proxy.port, "/big", timeout=30)
            assert status == 200 and body == BIG, f"warm-up /big: {status}, {len(body)} B"
        time.sleep(0.5)
        for i in range(max(1, p.mem_waves)):
            w = _wave(proxy, pid, n, p)
            waves.append(w)
            log(f"  memory/readers {kind:<9} wave {i + 1}: {n} idle readers of 8 MiB: RSS "
                f"{w['rss_before_kb'] // 1024} -> {w['rss_held_kb'] // 1024} MiB "
                f"(+{w['rss_growth_mib']:.1f}, peak +{w['peak_growth_mib']}); temp "
                f"{w['temp_bytes'] / 2**20:,.0f} MiB in {w['temp_files']} files (gauge "
                + ("-" if w["temp_gauge_bytes"] is None
                   else f"{w['temp_gauge_bytes'] / 2**20:,.0f} MiB")
                + f"); heads {w['heads']}; {w['sample_read_whole_ok']}/3 read whole intact; "
                f"after close {w['temp_files_after_close']} temp files, RSS "
                f"{w['rss_after_close_kb'] // 1024} MiB")
        alive = proxy.proc.alive() and worker_pids(proxy.proc) == [pid]
    finally:
        procs.stop(proxy.proc)
    row.update(waves[0])
    row.update({"waves": waves, "alive": alive, "proxy_log": read_proxy_log(proxy)})
    return row


# ---------------------------------------------------------------- 2b. one large upload

def upload_pieces(total_mib: int, seed: bytes) -> Any:
    """The body, 1 MiB at a time, made as it is sent (never held whole): a fixed random MiB
    with the piece's number in its first 8 bytes, so no two pieces are alike."""
    block = hashlib.shake_256(seed).digest(1 << 20)
    for i in range(total_mib):
        yield i.to_bytes(8, "big") + block[8:]


def mem_upload(procs: Processes, sock: str, p: Params) -> dict[str, Any]:
    """Memory (b): one `upload_mib` MiB upload through failproxy (1 worker,
    `max_body_bytes = 0`) to unicorn, which answers its size and sha256."""
    total = p.upload_mib << 20
    need = 3 * total + (256 << 20)  # failproxy's temp file, unicorn's TeeInput, slack
    free = shutil.disk_usage(procs.workdir).free
    row: dict[str, Any] = {"proxy": "failproxy", "mib": p.upload_mib,
                           "disk_free_gib": round(free / 2**30, 1)}
    if free < need:
        row["error"] = f"only {free / 2**30:.1f} GiB free in {procs.workdir}, need " \
                       f"{need / 2**30:.1f}"
        return row
    proxy = start_proxy(procs, "failproxy", "mem-upload", sock, 1,
                        extra_server={"max_body_bytes": 0})
    try:
        pid = worker_pids(proxy.proc)[0]
        warm = b"x" * 70000  # past request_buffer_bytes: the temp-file path is warm too
        with socket.create_connection((HOST, proxy.port), timeout=30) as c:
            c.sendall(b"POST /upload HTTP/1.1\r\nHost: app\r\nConnection: close\r\n"
                      + f"Content-Length: {len(warm)}\r\n\r\n".encode() + warm)
            assert _read_answer(c, 30)[0] == 200
        time.sleep(0.5)
        peak_reset = reset_peak_rss(pid)
        before = proc_status(pid)
        digest = hashlib.sha256()
        t0 = time.monotonic()
        with socket.create_connection((HOST, proxy.port), timeout=120) as c:
            c.sendall(b"POST /upload HTTP/1.1\r\nHost: app\r\nConnection: close\r\n"
                      b"Content-Type: application/octet-stream\r\n"
                      + f"Content-Length: {total}\r\n\r\n".encode())
            for piece in upload_pieces(p.upload_mib, b"slowclients"):
                c.sendall(piece)
                digest.update(piece)
            sent_s = time.monotonic() - t0
            status, body = _read_answer(c, 300)
        elapsed = time.monotonic() - t0
        after = proc_status(pid)
        got = body.decode(errors="replace").split()
    finally:
        procs.stop(proxy.proc)
    events = [e for e in _json_lines(proxy.log_path)
              if e.get("event") == "request" and e.get("path") == "/upload"]
    ev = events[-1] if events else {}
    intact = (status == 200 and len(got) == 2 and got[0] == str(total)
              and got[1] == digest.hexdigest())
    peak = (after["VmHWM"] - before["VmRSS"]) / 1024 if peak_reset else None
    row.update({
        "status": status, "answer": body.decode(errors="replace")[:200],
        "sha256": digest.hexdigest(), "intact": intact,
        "rss_before_kb": before["VmRSS"], "rss_after_kb": after["VmRSS"],
        "peak_kb": after["VmHWM"], "peak_growth_mib": None if peak is None else round(peak, 1),
        "peak_reset": peak_reset, "send_s": round(sent_s, 1), "total_s": round(elapsed, 1),
        "mib_s": round(p.upload_mib / elapsed, 1), "spilled_bytes": ev.get("spilled_bytes"),
        "upstream_ms": ev.get("upstream_ms"), "logged_status": ev.get("status"),
    })
    log(f"  memory/upload {p.upload_mib} MiB through failproxy: status {status}, "
        f"{'intact' if intact else 'NOT INTACT: ' + row['answer']}, peak RSS +"
        f"{peak if peak is not None else float('nan'):.1f} MiB (VmHWM {after['VmHWM'] // 1024}"
        f" MiB), {elapsed:.1f} s ({row['mib_s']} MiB/s), spilled {ev.get('spilled_bytes')}")
    return row


def _read_answer(c: socket.socket, timeout: float) -> tuple[int, bytes]:
    """One answer with Content-Length: (status, body)."""
    c.settimeout(timeout)
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = c.recv(65536)
        if not data:
            raise ConnectionError(f"closed before the answer's head ({buf[:200]!r})")
        buf += data
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = 0
    for line in lines[1:]:
        k, _, v = line.partition(":")
        if k.strip().lower() == "content-length":
            length = int(v)
    while len(body) < length:
        data = c.recv(65536)
        if not data:
            break
        body += data
    return int(lines[0].split()[1]), body


def _json_lines(path: Path) -> list[dict[str, Any]]:
    out = []
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


# ---------------------------------------------------------------- the scenario

def run(p: Params, procs: Processes) -> dict[str, Any]:
    free = shutil.disk_usage(procs.workdir).free
    log(f"  N = {', '.join(map(str, p.ns))}; {p.rate:g} fast req/s for {p.duration:g} s per "
        f"run; {p.rounds} round(s); proxies {', '.join(p.proxies)} with {p.workers} worker(s); "
        f"memory: {p.mem_readers} readers, {p.upload_mib} MiB upload; {free / 2**30:.0f} GiB "
        f"free in {procs.workdir}; estimated {estimate_seconds(p) / 60:.0f} min")
    sock, unicorn = start_unicorn(procs)
    rows: list[dict[str, Any]] = []
    lat: dict[str, list[float]] = {}
    plans = {rnd: openloop.plan([0.0], rate=p.rate, duration=p.duration, key="slowclients",
                                seed=rnd) for rnd in range(p.rounds)}
    k = 0
    for rnd in range(p.rounds):
        for n in p.ns:
            order = list(p.proxies[k % len(p.proxies):] + p.proxies[:k % len(p.proxies)])
            k += 1
            for kind in order:
                row, lats = one_run(procs, kind, n, rnd, p, sock, plans[rnd])
                rows.append(row)
                lat.setdefault(f"{kind}/{n}", []).extend(lats)
    table = {f"{kind}/{n}": {"proxy": kind, "n": n, "label": LABELS[kind],
                             **combine([r for r in rows if r["proxy"] == kind and r["n"] == n]),
                             "latencies_ms": sorted(lat.get(f"{kind}/{n}", []))}
             for n in p.ns for kind in p.proxies}
    memory: dict[str, Any] = {"readers": [], "upload": None}
    try:
        if p.mem_readers:
            stub = start_stub(procs)
            for kind in p.proxies:
                try:
                    memory["readers"].append(mem_readers(procs, kind, stub, p))
                except (StartError, OSError, AssertionError, RuntimeError) as exc:
                    log(f"  !! memory/readers {kind}: {exc!r}")
                    memory["readers"].append({"proxy": kind, "readers": p.mem_readers,
                                              "error": repr(exc)[:2000]})
        if p.upload_mib:
            try:
                memory["upload"] = mem_upload(procs, sock, p)
            except (StartError, OSError, AssertionError, RuntimeError, ValueError) as exc:
                log(f"  !! memory/upload: {exc!r}")
                memory["upload"] = {"proxy": "failproxy", "mib": p.upload_mib,
                                    "error": repr(exc)[:2000]}
    finally:
        procs.stop(unicorn)
    return {"params": {"ns": list(p.ns), "duration_s": p.duration, "rate": p.rate,
                       "rounds": p.rounds, "workers": p.workers, "timeout_s": p.timeout,
                       "settle_s": p.settle, "ramp_per_s": p.ramp_per_s,
                       "ramps_s": {str(n): _ramp(p, n) for n in p.ns},
                       "unicorn_workers": UNICORN_WORKERS, "unix_backlog": UNIX_BACKLOG,
                       "proxies": list(p.proxies), "reference": REFERENCE,
                       "mem_readers": p.mem_readers, "mem_hold_s": p.mem_hold,
                       "mem_waves": p.mem_waves,
                       "upload_mib": p.upload_mib, "disk_free_gib": round(free / 2**30, 1),
                       "estimated_s": round(estimate_seconds(p)),
                       "target_ratio": TARGET_RATIO, "target_readers_mib": TARGET_READERS_MIB,
                       "target_upload_mib": TARGET_UPLOAD_MIB},
            "runs": rows, "table": table, "ratios": ratios(rows), "memory": memory}
