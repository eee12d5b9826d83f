"""`failproxy demo`: the seed's 3-host cluster on loopback, the same skewed load in each phase.

Three hosts on 127.0.1.1-3. Each runs a pre-fork demo app server (`failproxy.demo.demoapp`:
2 workers, pull model like unicorn, a UNIX socket with backlog 5 and a TCP port with backlog
1024) and one front proxy per phase in front of it:

1. "UNIX socket only": a failproxy that knows only its box's UNIX socket, no backups. That is a
   box without failproxy's failover: once the backlog is full the connect fails (EAGAIN) and the
   client gets 502.
2. "nginx, the seed's config" (only when `nginx` is installed): one nginx per host with the
   seed's upstream block, `server unix:... fail_timeout=0;` then the three app TCP ports as
   `backup`, the box's own last, `proxy_next_upstream error timeout`.
3. "failproxy": the defaults (`overflow = "room"`, route learning), the three app TCP ports as
   backups and `self` set to the box's own, and an admin listener.

The load is route-shaped: the slow actions are `GET /reports/<id>` (the app sleeps SLOW_MS),
clustered on host1; the fast ones `GET /items/<id>` and a small `POST /echo`. A client sends the
same seeded schedule in every phase, round-robin over the three proxies as round-robin DNS
would. Failovers are printed as the proxies log them; the run ends with the phases side by side
(errors, fast- and slow-request latency from each request's scheduled send time, where host1's
requests were answered, from its proxy's log, and how much failproxy changed the fast-request
p99), then what host1's failproxy learned (its admin `GET /status`: each route's class and app
time, each upstream's concurrency and service time). Every process and socket is cleaned up,
also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import grp
import http.client
import itertools
import json
import os
import pwd
import random
import re
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

from failproxy import config
from failproxy.demo import demoapp

HOST_IPS = ("127.0.1.1", "127.0.1.2", "127.0.1.3")
APP_WORKERS = 2
SLOW_MS = 300  # what the app takes for GET /reports/<id>: above routes.slow_ms (200) by default
SLOW_SHARE = (0.8, 0.0, 0.0)  # share of each front host's traffic that is slow: all on host1
ECHO_SHARE = 0.1  # share of the rest that is a small POST /echo (the rest is GET /items/<id>)
SLOW_ROUTE = "GET /reports/:id"  # the route keys failproxy learns them under (SPEC 4.4)
FAST_ROUTES = "GET /items/:id, POST /echo"
SEED = 7
DEFAULT_REQUESTS = 600
DEFAULT_RATE = 40.0  # requests per second when --duration is not given
CLIENT_THREADS = 64
REQUEST_TIMEOUT = 10.0
START_TIMEOUT = 15.0
SETTLE = 0.3  # after a phase: the proxies' last log lines land
STATUS_WAIT = 1.2  # after a phase: a failproxy worker publishes what it learned once a second
LIVE_LINES_PER_SECOND = 25
NONE = "none (502/504)"  # a request no upstream answered: the proxy answered it itself
NGINX_FALLBACKS = ("/usr/sbin/nginx",)  # where Debian puts it, off a non-root user's PATH
NGINX_MISSING = ("nginx is not installed: the comparison with nginx (the seed's config) is "
                 "skipped; to get it: apt-get install nginx-light (Debian/Ubuntu)")


@dataclass(frozen=True)
class Phase:
    key: str
    title: str  # the column heading
    kind: str  # "failproxy" or "nginx": which program fronts each host
    failover: bool  # backups (and failproxy's overflow policy), or the UNIX socket alone
    describe: str
    heading: str = ""  # the phase's name where it starts; "" = its title

    @property
    def name(self) -> str:
        return self.heading or self.title


SOCKET_ONLY = Phase(
    "socket", "UNIX socket only", "failproxy", False,
    "each proxy has only its box's UNIX socket, no backups (a box without failproxy's "
    "failover): a full backlog answers 502")
NGINX = Phase(
    "nginx", "nginx", "nginx", True,
    "one nginx per host: server unix:... fail_timeout=0, then the 3 app TCP ports as backup "
    "(the box's own last), proxy_next_upstream error timeout; nginx takes its backups "
    "round-robin", heading="nginx, the seed's config")
FAILPROXY = Phase(
    "failproxy", "failproxy", "failproxy", True,
    'failproxy\'s defaults: overflow = "room", route learning, backups = the 3 app TCP ports, '
    "self = the box's own")
PHASES = (SOCKET_ONLY, NGINX, FAILPROXY)  # in the order they run; nginx's only when installed

NGINX_HELP = (
    "  nginx logs each failed connect in its error log (overloaded = EAGAIN: the UNIX backlog\n"
    "    was full) and each request's servers in its access log, read here when it is answered;\n"
    "    skipped_down = the UNIX socket not tried at all: after a failure nginx skips a server\n"
    "    for the rest of that second, even with fail_timeout=0"
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
    log_path: str  # failproxy's JSON log, or nginx's access log
    cfg_path: str
    err_path: str  # the process's stderr
    admin_port: int = 0  # failproxy's admin listener; 0 = none
    error_log: str = ""  # nginx's error log

    @property
    def kind(self) -> str:
        return self.phase.kind

    @property
    def name(self) -> str:
        return self.host.name

    @property
    def ip(self) -> str:
        return self.host.ip

    @property
    def proxy_addr(self) -> str:
        return f"{self.host.ip}:{self.proxy_port}"

    @property
    def admin_addr(self) -> str:
        return f"{self.host.ip}:{self.admin_port}" if self.admin_port else ""

    @property
    def tmp_dir(self) -> str:
        """nginx's temp files (request bodies, buffered answers)."""
        return self.cfg_path.rsplit(".", 1)[0] + ".tmp"

    @property
    def pid_path(self) -> str:
        return self.cfg_path.rsplit(".", 1)[0] + ".pid"


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
    # nginx: failed attempts read from the error log, waiting for their request's access log
    # line: (front, method, uri) -> reasons, oldest first
    pending: dict[tuple[str, str, str], list[str]] = field(default_factory=dict)


@dataclass
class PhaseRun:
    phase: Phase
    results: list[Result]
    stats: LogStats
    wall: float
    status: dict[str, Any] | None = None  # host1's failproxy's GET /status after the phase
    status_from: str = ""  # where it was read, or why not


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
    lines += ["", "[log]", 'format = "json"', "access = true", f'file = "{front.log_path}"']
    if front.admin_port:
        lines += ["", "[admin]", f'listen = "{front.admin_addr}"']
    lines.append("")
    return "\n".join(lines)


# One JSON object per request: what LogTailer reads (`$upstream_addr`: every server tried).
NGINX_LOG_FORMAT = (
    "log_format demo escape=json '{\"event\":\"request\",\"status\":$status,"
    "\"method\":\"$request_method\",\"uri\":\"$request_uri\",\"upstream\":\"$upstream_addr\","
    "\"upstream_status\":\"$upstream_status\",\"request_time\":$request_time}';"
)


def ring(hosts: Sequence[Host], host: Host) -> list[Host]:
    """The backups in the order a box tries them: the ring starting just after itself, so its
    own TCP port goes last (failproxy's order with `upstream.self`)."""
    i = next(k for k, h in enumerate(hosts) if h is host or h.name == host.name)
    return [*hosts[i + 1:], *hosts[:i + 1]]


def find_nginx() -> str | None:
    """nginx's path: on PATH, or where Debian puts it; None when it is not installed."""
    found = shutil.which("nginx")
    if found:
        return found
    for path in NGINX_FALLBACKS:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def select_phases(nginx: str | None) -> tuple[list[Phase], str]:
    """The phases to run, and a line to print when the nginx one is skipped ("" when not)."""
    if nginx is None:
        return [p for p in PHASES if p.kind != "nginx"], NGINX_MISSING
    return list(PHASES), ""


def _nginx_user() -> str:
    """As root, nginx's workers would run as nobody, who cannot reach the sockets in the
    demo's temp dir: keep them as the user that runs the demo."""
    if os.geteuid() != 0:
        return ""
    user = pwd.getpwuid(os.geteuid()).pw_name
    group = grp.getgrgid(os.getegid()).gr_name
    return f"user {user} {group};\n"


def nginx_config_text(front: Front, hosts: Sequence[Host]) -> str:
    """One host's nginx with the seed's upstream block. `daemon`, `master_process`,
    `worker_processes`, `error_log` and `pid` are given on the command line
    (`nginx_command`): here they would be duplicates."""
    host = front.host
    tmp = front.tmp_dir
    servers = [f"    server unix:{host.sock_path} fail_timeout=0;"]
    if front.phase.failover:
        servers += [f"    server {peer.app_tcp} backup;" for peer in ring(hosts, host)]
    return "\n".join([
        f"# failproxy demo: {host.name}, phase {front.phase.key} (the seed's config)",
        _nginx_user() + "events { worker_connections 1024; }",
        "http {",
        "  " + NGINX_LOG_FORMAT,
        f"  access_log {front.log_path} demo;",
        f"  client_body_temp_path {tmp}/body;",
        f"  proxy_temp_path {tmp}/proxy;",
        f"  fastcgi_temp_path {tmp}/fastcgi;",
        f"  uwsgi_temp_path {tmp}/uwsgi;",
        f"  scgi_temp_path {tmp}/scgi;",
        "  upstream app {",
        *servers,
        "  }",
        "  server {",
        f"    listen {front.proxy_addr};",
        "    location / {",
        "      proxy_pass http://app;",
        "      proxy_http_version 1.1;",
        "      proxy_next_upstream error timeout;",
        "    }",
        "  }",
        "}",
        "",
    ])


def nginx_command(nginx: str, front: Front, prefix: str) -> list[str]:
    """nginx in the foreground as the current user, every path under the demo's temp dir."""
    return [nginx, "-p", prefix.rstrip("/") + "/", "-c", front.cfg_path, "-g",
            "daemon off; master_process on; worker_processes 1; "
            f"error_log {front.error_log}; pid {front.pid_path};"]


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
    """The last lines of each of the `os.pathsep`-separated files."""
    texts = []
    for one in path.split(os.pathsep):
        try:
            with open(one, errors="replace") as f:
                text = "".join(f.readlines()[-n:]).rstrip()
        except OSError:
            continue
        if text:
            texts.append(text)
    return "\n".join(texts) or "(no output)"


def proxy_command(cfg_path: str) -> list[str]:
    """How each host's failproxy is started."""
    return [sys.executable, "-m", "failproxy", "serve", cfg_path]


class Cluster:
    """The processes of the demo: one app server per host and one front proxy per host and
    phase, all started up front; `close()` ends every one of them and removes the temp dir."""

    def __init__(self, phases: Sequence[Phase] = PHASES, nginx: str | None = None) -> None:
        self.phases = list(phases)
        self.nginx = nginx
        self.tmp = tempfile.mkdtemp(prefix="failproxy-demo-")
        self.procs: list[subprocess.Popen[bytes]] = []
        self.hosts: list[Host] = []
        self.fronts: dict[str, list[Front]] = {}

    def start(self) -> None:
        env = _child_env()
        failproxies = sum(1 for p in self.phases if p.kind == "failproxy")
        for i, ip in enumerate(HOST_IPS, 1):
            ports = _free_ports(ip, 1 + len(self.phases) + failproxies)
            admin_ports = ports[1 + len(self.phases):]
            name = f"host{i}"
            host = Host(name=name, ip=ip, app_port=ports[0],
                        sock_path=os.path.join(self.tmp, f"{name}.sock"),
                        app_err_path=os.path.join(self.tmp, f"{name}.app.stderr"))
            self.hosts.append(host)
            for phase, port in zip(self.phases, ports[1:1 + len(self.phases)], strict=True):
                base = os.path.join(self.tmp, f"{name}.{phase.key}")
                if phase.kind == "nginx":
                    front = Front(host=host, phase=phase, proxy_port=port,
                                  log_path=base + ".access.log", cfg_path=base + ".conf",
                                  err_path=base + ".stderr", error_log=base + ".error.log")
                else:
                    front = Front(host=host, phase=phase, proxy_port=port,
                                  log_path=base + ".log", cfg_path=base + ".toml",
                                  err_path=base + ".stderr", admin_port=admin_ports.pop(0))
                self.fronts.setdefault(phase.key, []).append(front)
        deadline = time.monotonic() + START_TIMEOUT
        apps = []
        for h in self.hosts:
            cmd = [sys.executable, "-m", "failproxy.demo.demoapp", "--name", h.name, "--unix",
                   h.sock_path, "--tcp", h.app_tcp, "--workers", str(APP_WORKERS),
                   "--slow-ms", str(SLOW_MS)]
            apps.append(self._spawn(cmd, env, h.app_err_path))
        for h, proc in zip(self.hosts, apps, strict=True):
            _wait_tcp(h.ip, h.app_port, proc, f"{h.name} demo app", h.app_err_path, deadline)
        started = []
        for fronts in self.fronts.values():
            for f in fronts:
                Path(f.log_path).touch()
                if f.kind == "nginx":
                    assert self.nginx is not None, "an nginx phase without nginx"
                    Path(f.cfg_path).write_text(nginx_config_text(f, self.hosts))
                    Path(f.error_log).touch()
                    os.makedirs(f.tmp_dir, exist_ok=True)
                    cmd = nginx_command(self.nginx, f, self.tmp)
                    errs = f.err_path + os.pathsep + f.error_log
                else:
                    Path(f.cfg_path).write_text(_config_text(f, self.hosts))
                    cmd = proxy_command(f.cfg_path)
                    errs = f.err_path
                started.append((f, self._spawn(cmd, env, f.err_path), errs))
        for f, proc, errs in started:
            _wait_tcp(f.ip, f.proxy_port, proc, f"{f.name} {f.kind} ({f.phase.title})",
                      errs, deadline)

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


# An nginx error log line about one failed attempt, e.g. `2024/05/01 12:00:00 [error] 7#7: *9
# connect() to unix:/tmp/d/host1.sock failed (11: Resource temporarily unavailable) while
# connecting to upstream, client: 127.0.0.1, server: , request: "GET /items/3 HTTP/1.1",
# upstream: "http://unix:/tmp/d/host1.sock:/items/3", host: "127.0.1.1:40000"`
_NGINX_LEVEL = re.compile(r"\[(\w+)\] \d+#\d+: (?:\*\d+ )?(.*?)(?:, client: |$)")
_NGINX_REQUEST = re.compile(r'request: "(\S+) (\S+)')
_NGINX_UPSTREAM = re.compile(r'upstream: "http://(unix:.*?|[^/"]+)(?::/|/|")')
_NGINX_CONNECT = re.compile(r"connect\(\) (?:to (\S+) )?failed \((\d+): ")
_REASON_BY_ERRNO = {errno.EAGAIN: "overloaded", errno.ECONNREFUSED: "refused",
                    errno.ENOENT: "missing"}


def nginx_attempt(line: str) -> tuple[str, str, str, str, str] | None:
    """(reason, errno name, address, method, uri) of a failed attempt in an nginx error log
    line, with failproxy's reason names (SPEC 4.1); None for any other line."""
    m = _NGINX_LEVEL.search(line)
    if m is None:
        return None
    message = m.group(2)
    request = _NGINX_REQUEST.search(line)
    method, uri = request.groups() if request else ("", "")
    upstream = _NGINX_UPSTREAM.search(line)
    address = upstream.group(1) if upstream else ""
    name = ""
    connect = _NGINX_CONNECT.search(message)
    if connect is not None:
        address = connect.group(1) or address
        code = int(connect.group(2))
        name = errno.errorcode.get(code, str(code))
        reason = _REASON_BY_ERRNO.get(code, "unreachable")
    elif "upstream timed out" in message:
        reason = "connect_timeout" if "while connecting" in message else "timeout"
    elif "while reading response header" in message and (
            "prematurely closed" in message or "reset by peer" in message):
        reason = "reset"
    else:
        return None
    return reason, name, address, method, uri


class LogTailer(threading.Thread):
    """Follows one phase's proxy logs (failproxy's JSON log, or nginx's access log as JSON and
    its error log); prints failovers live and counts what they say."""

    def __init__(self, fronts: Sequence[Front], out: TextIO, quiet: bool, t0: float) -> None:
        super().__init__(name="log-tailer", daemon=True)
        self.fronts = fronts
        self.out = out
        self.quiet = quiet
        self.t0 = t0
        self.stats = LogStats()
        self.labels = _labels([f.host for f in fronts])
        self._stop_event = threading.Event()
        self._files: dict[str, Any] = {}  # path -> open file
        self._partial: dict[str, bytes] = {}  # path -> an unfinished last line
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

    def _lines(self, path: str) -> list[bytes]:
        """The whole lines added to `path` since the last call."""
        f = self._files.get(path)
        if f is None:
            try:
                f = self._files[path] = open(path, "rb")  # noqa: SIM115
            except OSError:
                return []
        data = self._partial.pop(path, b"") + f.read()
        if not data:
            return []
        *lines, rest = data.split(b"\n")
        if rest:
            self._partial[path] = rest
        return lines

    def poll(self) -> None:
        for front in self.fronts:
            if front.kind == "nginx":
                # The access log first: a request's failed attempts are in the error log before
                # its access log line is written, so reading the error log after it finds them.
                access = self._lines(front.log_path)
                for line in self._lines(front.error_log):
                    self._nginx_error(front.name, line)
                for line in access:
                    self._event(front, line)
            else:
                for line in self._lines(front.log_path):
                    self._event(front, line)

    def _nginx_error(self, host: str, line: bytes) -> None:
        text = line.decode(errors="replace")
        attempt = nginx_attempt(text)
        if attempt is not None:
            reason, name, _address, method, uri = attempt
            label = f"{reason} {name}" if name else reason
            self.stats.pending.setdefault((host, method, uri), []).append(label)
        elif re.search(r"\[(error|crit|alert|emerg)\]", text):
            self.stats.errors.append(f"{host}: {text}")

    def _nginx_request(self, front: Front, ev: dict[str, Any]) -> None:
        """One nginx access log line: who answered, and the failovers it took to get there."""
        st = self.stats
        host = front.name
        st.logged_requests[host] += 1
        tried = [a.strip() for a in str(ev.get("upstream") or "").split(",") if a.strip()]
        status = ev.get("status")
        answered = bool(tried) and status not in (502, 504)
        st.answered[(host, self.label(tried[-1]) if answered else NONE)] += 1
        method, uri = str(ev.get("method", "")), str(ev.get("uri", ""))
        primary = f"unix:{front.host.sock_path}"
        if answered and tried[0] != primary:
            # Not tried: nginx took it for down (a failure earlier in the same second).
            st.failovers["skipped_down"] += 1
            st.routes[(self.label(primary), self.label(tried[0]))] += 1
            self._live(f"{host} nginx  {method} {uri}  {self.label(primary)} -> "
                       f"{self.label(tried[0])}  [skipped_down]")
        # Its own failed attempts, oldest first; another request of the same method and URI
        # (POST /echo) may have some in the list too.
        key = (host, method, uri)
        waiting = st.pending.get(key, [])
        failed = len(tried) - (1 if answered else 0)
        reasons, rest = waiting[:failed], waiting[failed:]
        if rest:
            st.pending[key] = rest
        else:
            st.pending.pop(key, None)
        for i, (src, dst) in enumerate(itertools.pairwise(tried)):
            label = reasons[i] if i < len(reasons) else "failed"
            reason = label.split(" ")[0]
            st.failovers[reason] += 1
            st.routes[(self.label(src), self.label(dst))] += 1
            detail = label[len(reason):]
            self._live(f"{host} nginx  {method} {uri}  {self.label(src)} -> "
                       f"{self.label(dst)}  [{reason}{detail}]")
        if not answered:
            st.exhausted += 1
            self._live(f"{host} nginx  {method} {uri}  every server failed "
                       f"{[r.split(' ')[0] for r in reasons]} -> {status}")

    def _event(self, front: Front, line: bytes) -> None:
        try:
            ev = json.loads(line)
        except ValueError:
            return
        if not isinstance(ev, dict):
            return
        if front.kind == "nginx":
            self._nginx_request(front, ev)
            return
        host = front.name
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
    """(front index, kind, path) per request: round-robin fronts, slow ones clustered on host1.
    The slow actions are `/reports/<id>`, the fast ones `/items/<id>` and `/echo`: route keys
    `GET /reports/:id`, `GET /items/:id` and `POST /echo` to a proxy that learns routes."""
    rnd = random.Random(seed)
    ids = random.Random(seed + 1)  # its own stream: the kinds are what the seed always gave
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
        record = ids.randrange(1, 100_000)
        path = {"slow": f"/reports/{record}", "fast": f"/items/{record}", "echo": "/echo"}[kind]
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
            f"{len(run.results) - ok} errors; fast p99 "
            f"{_ms(_latencies(run.results, True), 0.99)} ms, slow p99 "
            f"{_ms(_latencies(run.results, False), 0.99)} ms")


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
    """The side-by-side table of the phases, and the lines that read it: failproxy's fast p99
    against each other phase's."""
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
    logs = ("its proxy's `request` events" if all(run.phase.kind != "nginx" for run in runs)
            else "its proxy's `request` events or nginx's access log ($upstream_addr)")
    lines = [f"\ncomparison: the same {len(runs[0].results)} requests (seed {SEED}) in each phase, "
             f"slow = {SLOW_ROUTE} ({SLOW_MS} ms in the app), share {shares}",
             f"  fast = {FAST_ROUTES}; latency in ms from the scheduled send time, over "
             "answered requests;",
             f"  {first}'s requests by who answered them, from {logs}\n",
             _table(rows), ""]

    def p99(run: PhaseRun) -> float | None:
        values = _latencies(run.results, True)
        return round(_pct(values, 0.99), 1) if values else None

    ours = [run for run in runs if run.phase.key == FAILPROXY.key]
    if ours and len(runs) > 1:
        after = ours[0]
        for before in runs:
            if before is not after:
                lines.append(_ratio_line(p99(before), p99(after),
                                         (before.phase.title, after.phase.title)))
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


# ---------------------------------------------------------------------------- route learning


def fetch_status(front: Front, timeout: float = 3.0) -> dict[str, Any]:
    """`GET /status` from a failproxy's admin listener, parsed; raises OSError, ValueError or
    http.client.HTTPException."""
    conn = http.client.HTTPConnection(front.ip, front.admin_port, timeout=timeout)
    try:
        conn.request("GET", "/status")
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise ValueError(f"HTTP {resp.status}")
        data = json.loads(body)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return data
    finally:
        conn.close()


def read_learned(front: Front, answered: int) -> tuple[dict[str, Any] | None, str]:
    """host1's /status once its workers have published what they learned of the phase (once a
    second: until its routes count `answered` answers, or two more tries); (status or None,
    where it was read or why not)."""
    where = f"http://{front.admin_addr}/status"
    time.sleep(max(0.0, STATUS_WAIT - SETTLE))
    status: dict[str, Any] | None = None
    problem = ""
    for attempt in range(3):
        if attempt:
            time.sleep(1.0)
        try:
            status = fetch_status(front)
        except (OSError, ValueError, http.client.HTTPException) as exc:
            problem = f"{where}: {exc or type(exc).__name__}"
            continue
        counted = sum(int(r.get("count") or 0) for r in status.get("routes") or []
                      if isinstance(r, dict))
        if counted >= answered:
            break
    if status is None:
        return None, problem
    return status, where


def _num(value: object) -> str:
    return f"{value:.1f}" if isinstance(value, (int, float)) else "-"


def _indent(text: str, by: str = "  ") -> str:
    return "\n".join(by + line for line in text.splitlines())


def learned_section(status: dict[str, Any] | None, labels: dict[str, str], host: str,
                    where: str) -> str:
    """What a failproxy learned, from its /status: each route's class, learned app time and
    count, and each upstream's learned concurrency and service time."""
    if status is None:
        return f"\nwhat {host}'s failproxy learned: not read ({where})"
    slow_ms = config.RoutesConfig().slow_ms
    lines = [f"\nwhat {host}'s failproxy learned (GET /status on its admin listener, {where}):",
             f"  routes, from the app's own time per answer (slow: above routes.slow_ms = "
             f"{slow_ms:g} ms):"]
    routes = [r for r in status.get("routes") or [] if isinstance(r, dict)]
    if routes:
        rows: list[list[object]] = [["route", "class", "learned ms", "answers"]]
        rows += [[r.get("route", "?"), r.get("class", "?"), _num(r.get("ms")),
                  r.get("count", "-")] for r in routes]
        lines.append(_indent(_table(rows)))
        by_class = {c: [str(r.get("route")) for r in routes if r.get("class") == c]
                    for c in ("slow", "fast")}
        lines.append(f"  learned slow: {', '.join(by_class['slow']) or 'none'}; fast: "
                     f"{', '.join(by_class['fast']) or 'none'} (slow-route requests are the "
                     "ones that overflow and wait first)")
    else:
        lines.append("    none learned")
    upstreams = [u for u in status.get("upstreams") or [] if isinstance(u, dict)]
    if upstreams:
        lines.append("  upstreams, from their answers (concurrency: requests it serves at once "
                     "without slowing; service ms: its learned answer time):")
        rows = [["upstream", "concurrency", "service ms", "requests"]]
        for u in upstreams:
            address = str(u.get("address"))
            concurrency = u.get("concurrency")
            rows.append([labels.get(address, address),
                         concurrency if concurrency is not None else "-",
                         _num(u.get("service_ms")), u.get("requests", "-")])
        lines.append(_indent(_table(rows)))
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="failproxy demo",
        description="A 3-host cluster on loopback (127.0.1.1-3): demo app servers, driven by "
                    "the same skewed load through the UNIX socket alone, nginx with the "
                    "seed's config (when installed) and failproxy; prints failovers live, the "
                    "phases side by side, and the routes failproxy learned.")
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


def _run_phase(i: int, of: int, fronts: Sequence[Front], args: argparse.Namespace,
               out: TextIO) -> PhaseRun:
    phase = fronts[0].phase
    print(f"\nphase {i} of {of}: {phase.name}: {phase.describe}", file=out, flush=True)
    if not args.quiet:
        if phase.kind == "nginx":
            print(NGINX_HELP, file=out, flush=True)
        elif phase.failover:
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
    if phase.key == FAILPROXY.key and fronts[0].admin_port:
        first = fronts[0].name
        answered = sum(c for (front, dest), c in tailer.stats.answered.items()
                       if front == first and dest != NONE)
        run.status, run.status_from = read_learned(fronts[0], answered)
    return run


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parse(argv)
    except SystemExit as exc:  # --help or bad usage: return the status, as cli.main does
        return exc.code if isinstance(exc.code, int) else 2
    out = sys.stdout
    nginx = find_nginx()
    phases, skipped = select_phases(nginx)
    cluster = Cluster(phases, nginx)
    old_term = signal.getsignal(signal.SIGTERM)
    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        signal.signal(signal.SIGTERM, _on_term)
    try:
        if skipped:
            print(skipped, file=out, flush=True)
        print(f"failproxy demo: starting 3 hosts on 127.0.1.1-3 (demo app: {APP_WORKERS} "
              f"workers, UNIX backlog {demoapp.UNIX_BACKLOG}, TCP backlog "
              f"{demoapp.TCP_BACKLOG}), each with one front proxy per phase "
              f"({', '.join(p.name for p in phases)}) ...", file=out, flush=True)
        cluster.start()
        hosts = cluster.hosts
        if not args.quiet:
            for h in hosts:
                proxies = "  ".join(
                    f"{f.phase.key} {f.proxy_addr}"
                    + (f" (admin {f.admin_addr})" if f.admin_port and f.phase.failover else "")
                    for p in phases for f in cluster.fronts[p.key] if f.host is h)
                print(f"  {h.name}: app tcp {h.app_tcp}  {proxies}", file=out, flush=True)
        shares = ", ".join(f"{h.name} {share:.0%}" for h, share in zip(hosts, SLOW_SHARE,
                                                                         strict=True))
        print(f"each phase sends the same {args.requests} requests over {args.duration:.1f} s, "
              f"round-robin over the 3 proxies; slow = {SLOW_ROUTE} ({SLOW_MS} ms), its share: "
              f"{shares}; fast = {FAST_ROUTES}", file=out, flush=True)
        runs = [_run_phase(i, len(phases), cluster.fronts[phase.key], args, out)
                for i, phase in enumerate(phases, 1)]
        print(comparison(hosts, runs), file=out, flush=True)
        for run in runs:
            if run.phase.key == FAILPROXY.key:
                print(learned_section(run.status, _labels(hosts), hosts[0].name,
                                      run.status_from), file=out, flush=True)
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
