"""The servers a scenario starts: their config files and their command lines.

- a fast upstream: its own nginx (1 worker) answering `return 200 "ok"` on a UNIX socket
  (and optionally on TCP), so the backend costs little CPU;
- the proxies under test: failproxy, nginx, HAProxy and the naive aiohttp proxy.

Every config lives in the scenario's temp dir; every process is started through `Processes`.
"""

from __future__ import annotations

import os
import resource
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.instruments.procs import Proc, Processes, announce, wait_http, wait_unix_listening
from bench.instruments.system import which

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Target:
    """Something wrk can load: a URL, and the processes whose CPU time it costs."""

    name: str
    label: str
    host: str
    port: int
    proc: Proc | None  # None for "direct" targets measured on another target's process
    kind: str = ""  # failproxy | nginx | haproxy | naive | upstream | unicorn
    error: str | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"


# ---------------------------------------------------------------- nginx

def _nginx_main(workdir: Path, name: str, workers: int, worker_connections: int) -> str:
    user = "user root root;\n" if os.geteuid() == 0 else ""
    return (
        f"{user}worker_processes {workers};\n"
        "daemon off;\nmaster_process on;\n"
        f"pid {workdir}/{name}.pid;\n"
        f"error_log {workdir}/{name}.error.log warn;\n"
        f"worker_rlimit_nofile {resource.getrlimit(resource.RLIMIT_NOFILE)[0]};\n"
        f"events {{ worker_connections {worker_connections}; multi_accept off; }}\n")


def _nginx_http_common(workdir: Path, name: str) -> str:
    tmp = workdir / f"{name}.tmp"
    tmp.mkdir(exist_ok=True)
    return (
        f"  client_body_temp_path {tmp}/body;\n  proxy_temp_path {tmp}/proxy;\n"
        f"  fastcgi_temp_path {tmp}/fastcgi;\n  uwsgi_temp_path {tmp}/uwsgi;\n"
        f"  scgi_temp_path {tmp}/scgi;\n")


def start_nginx(procs: Processes, name: str, conf: str) -> Proc:
    path = procs.workdir / f"{name}.conf"
    path.write_text(conf)
    exe = which("nginx")
    assert exe is not None
    return procs.start(name, [exe, "-p", str(procs.workdir), "-c", str(path),
                              "-e", str(procs.workdir / f"{name}.error.log")])


def start_fast_upstream(procs: Processes, name: str, unix_path: str,
                        tcp: tuple[str, int] | None = None) -> Proc:
    """nginx, 1 worker, `return 200 "ok"` on a UNIX socket (and on TCP when asked)."""
    listens = f"    listen unix:{unix_path} backlog=4096;\n"
    if tcp:
        listens += f"    listen {tcp[0]}:{tcp[1]} backlog=4096;\n"
    conf = (_nginx_main(procs.workdir, name, 1, 20000)
            + "http {\n  access_log off;\n" + _nginx_http_common(procs.workdir, name)
            + "  keepalive_requests 1000000;\n  keepalive_timeout 300s;\n"
            + "  server {\n" + listens
            + '    location / { default_type text/plain; return 200 "ok"; }\n  }\n}\n')
    proc = start_nginx(procs, name, conf)
    wait_unix_listening(proc, unix_path)
    wait_http(proc, "localhost", 0, unix=unix_path)
    announce(proc, f"fast upstream on unix:{unix_path}" + (f" and {tcp[0]}:{tcp[1]}"
                                                            if tcp else ""))
    return proc


def nginx_proxy_conf(workdir: Path, name: str, *, listen: str, upstream_servers: list[str],
                     workers: int = 1, access_log: bool = True, keepalive: int = 64,
                     worker_connections: int = 4096, extra_location: str = "",
                     log_buffer: bool = False) -> str:
    """`log_buffer`: `access_log ... buffer=64k flush=1s`, as production nginx runs it."""
    servers = "".join(f"    server {s};\n" for s in upstream_servers)
    ka = f"    keepalive {keepalive};\n" if keepalive else ""
    buffered = " combined buffer=64k flush=1s" if log_buffer else ""
    log = (f"  access_log {workdir}/{name}.access.log{buffered};\n" if access_log
           else "  access_log off;\n")
    proto = ('      proxy_http_version 1.1;\n      proxy_set_header Connection "";\n'
             if keepalive else "")
    return (_nginx_main(workdir, name, workers, worker_connections)
            + "http {\n" + log + _nginx_http_common(workdir, name)
            + f"  upstream up {{\n{servers}{ka}  }}\n"
            + f"  server {{\n    listen {listen} backlog=1024;\n"
            + f"    location / {{\n      proxy_pass http://up;\n{proto}{extra_location}"
            + "    }\n  }\n}\n")


def start_nginx_proxy(procs: Processes, name: str, host: str, port: int, upstream: str,
                      *, workers: int, access_log: bool, worker_connections: int = 4096,
                      probe: bool = True, log_buffer: bool = False) -> Target:
    conf = nginx_proxy_conf(procs.workdir, name, listen=f"{host}:{port}",
                            upstream_servers=[upstream], workers=workers,
                            access_log=access_log, worker_connections=worker_connections,
                            log_buffer=log_buffer)
    proc = start_nginx(procs, name, conf)
    if probe:
        wait_http(proc, host, port)
    announce(proc, f"nginx {workers} worker(s) on {host}:{port}")
    return Target(name, "", host, port, proc, kind="nginx")


# ---------------------------------------------------------------- HAProxy

def haproxy_conf(*, listen: str, server: str, access_log: bool, maxconn: int = 20000) -> str:
    log_global = "  log stdout format raw local0\n" if access_log else ""
    log_defaults = "  log global\n  option httplog\n" if access_log else ""
    return (
        "global\n  nbthread 1\n" f"  maxconn {maxconn}\n" + log_global
        + "defaults\n  mode http\n" + log_defaults
        + "  timeout connect 1s\n  timeout client 60s\n  timeout server 60s\n"
        + "  timeout http-keep-alive 75s\n  http-reuse safe\n"
        + f"frontend fe\n  bind {listen}\n  maxconn {maxconn}\n  default_backend be\n"
        + f"backend be\n  server s1 {server} maxconn 1000\n")


def start_haproxy(procs: Processes, name: str, host: str, port: int, unix_path: str,
                  *, access_log: bool, maxconn: int = 4096) -> Target:
    """HAProxy, 1 thread; with access_log its log lines go to stdout, i.e. a file."""
    # HAProxy wants 2 fds per connection and refuses to start past RLIMIT_NOFILE
    maxconn = min(maxconn, (resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 100) // 2)
    path = procs.workdir / f"{name}.cfg"
    path.write_text(haproxy_conf(listen=f"{host}:{port}", server=unix_path,
                                 access_log=access_log, maxconn=maxconn))
    exe = which("haproxy")
    assert exe is not None
    proc = procs.start(name, [exe, "-db", "-f", str(path)])
    wait_http(proc, host, port)
    announce(proc, f"haproxy 1 thread on {host}:{port}")
    return Target(name, "", host, port, proc, kind="haproxy")


# ---------------------------------------------------------------- failproxy

def toml_dumps(doc: dict[str, Any]) -> str:
    """Enough TOML for failproxy configs: tables of scalars/lists, arrays of tables."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(v)

    out: list[str] = []
    for table, body in doc.items():
        scalars = {k: v for k, v in body.items() if not _is_table_list(v)}
        out.append(f"[{table}]")
        out += [f"{k} = {value(v)}" for k, v in scalars.items()]
        out.append("")
        for k, v in body.items():
            if _is_table_list(v):
                for item in v:
                    out.append(f"[[{table}.{k}]]")
                    out += [f"{ik} = {value(iv)}" for ik, iv in item.items()]
                    out.append("")
    return "\n".join(out)


def _is_table_list(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and isinstance(v[0], dict)


def failproxy_config(*, listen: list[str], servers: list[dict[str, Any]], workers: int,
                     log_file: str, access_log: bool = True, keepalive: int = 64,
                     self_address: str = "", max_connections: int = 10000,
                     extra_upstream: dict[str, Any] | None = None,
                     log_buffer: bool = False) -> dict[str, Any]:
    """`log_buffer`: `[log] buffer = 65536, flush = 1.0`, nginx's `buffer=64k flush=1s`."""
    upstream: dict[str, Any] = {"keepalive": keepalive, **(extra_upstream or {})}
    if self_address:
        upstream["self"] = self_address
    upstream["server"] = servers
    return {
        "server": {"listen": listen, "workers": workers, "max_connections": max_connections},
        "upstream": upstream,
        "log": {"file": log_file, "access": access_log,
                **({"buffer": 65536, "flush": 1.0} if log_buffer else {})},
    }


def python_env(tree: Path | None = None) -> dict[str, str]:
    """The environment of a Python target: failproxy (and bench) imported from `tree`
    (default this checkout; a baseline checkout for before/after rows in one run)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree or REPO) + (os.pathsep + env["PYTHONPATH"]
                                             if env.get("PYTHONPATH") else "")
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def start_failproxy(procs: Processes, name: str, cfg: dict[str, Any], *,
                    probe: tuple[str, int] | None, tree: Path | None = None) -> Proc:
    """`tree`: run the failproxy of another checkout (the baseline of a before/after run)."""
    path = procs.workdir / f"{name}.toml"
    path.write_text(toml_dumps(cfg))
    proc = procs.start(name, [sys.executable, "-m", "failproxy", "serve", str(path)],
                       env=python_env(tree))
    if probe:
        wait_http(proc, probe[0], probe[1], timeout=20.0)
    announce(proc, f"failproxy {cfg['server']['workers']} worker(s) on "
                   f"{', '.join(cfg['server']['listen'])}")
    return proc


def start_failproxy_target(procs: Processes, name: str, host: str, port: int, unix_path: str,
                           *, workers: int, access_log: bool, tree: Path | None = None,
                           log_buffer: bool = False) -> Target:
    cfg = failproxy_config(listen=[f"{host}:{port}"], servers=[{"address": f"unix:{unix_path}"}],
                           workers=workers, log_file=str(procs.workdir / f"{name}.log"),
                           access_log=access_log, log_buffer=log_buffer)
    proc = start_failproxy(procs, name, cfg, probe=(host, port), tree=tree)
    return Target(name, "", host, port, proc, kind="failproxy")


# ---------------------------------------------------------------- naive aiohttp proxy

def start_naive(procs: Processes, name: str, host: str, port: int, unix_path: str,
                *, access_log: bool) -> Target:
    argv = [sys.executable, "-m", "bench.targets.naive_proxy", "--listen", f"{host}:{port}",
            "--upstream", f"unix:{unix_path}"]
    if access_log:
        argv += ["--access-log", str(procs.workdir / f"{name}.access.log")]
    proc = procs.start(name, argv, env=python_env())
    wait_http(proc, host, port)
    announce(proc, f"naive aiohttp proxy on {host}:{port}")
    return Target(name, "", host, port, proc, kind="naive")


# ---------------------------------------------------------------- the floor of the stack

def start_floor(procs: Processes, name: str, host: str, port: int, unix_path: str) -> Target:
    """bench/targets/floor_proxy.py: uvloop + httptools with no features (no access log to
    write)."""
    argv = [sys.executable, "-m", "bench.targets.floor_proxy", "--listen", f"{host}:{port}",
            "--upstream", f"unix:{unix_path}"]
    proc = procs.start(name, argv, env=python_env())
    wait_http(proc, host, port)
    announce(proc, f"floor proxy (uvloop + httptools, no features) on {host}:{port}")
    return Target(name, "", host, port, proc, kind="floor")
