"""The machine: Debian packages the harness needs, facts about the box, limits and free ports."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import random
import re
import resource
import shutil
import socket
import subprocess
import sys
from typing import Any

# command -> Debian package that provides it
PACKAGES = {
    "nginx": "nginx-light",
    "haproxy": "haproxy",
    "unicorn": "unicorn",
    "wrk": "wrk",
    "httperf": "httperf",
}


def log(msg: str) -> None:
    """Progress line on stderr, flushed at once (the harness runs for minutes)."""
    stamp = dt.datetime.now().strftime("%H:%M:%S")
    print(f"[bench {stamp}] {msg}", file=sys.stderr, flush=True)


def which(cmd: str) -> str | None:
    # nginx and haproxy live in /usr/sbin, which is not on every user's PATH
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return shutil.which(cmd, path=path)


def ensure_packages(commands: list[str] | None = None) -> None:
    """Install, with apt-get, the Debian packages whose commands are missing; fail loudly."""
    wanted = commands or list(PACKAGES)
    missing = [PACKAGES[c] for c in wanted if which(c) is None]
    if not missing:
        return
    log(f"installing missing Debian packages: {' '.join(missing)}")
    prefix: list[str] = []
    if os.geteuid() != 0:
        if which("sudo") is None:
            raise SystemExit(f"missing {missing}; run as root or install them: "
                             f"apt-get install {' '.join(missing)}")
        prefix = ["sudo", "-n"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run([*prefix, "apt-get", "update"], check=True, env=env)
    subprocess.run([*prefix, "apt-get", "install", "-y", "--no-install-recommends", *missing],
                   check=True, env=env)
    still = [c for c in wanted if which(c) is None]
    if still:
        raise SystemExit(f"still missing after apt-get install: {still}")


def raise_nofile(want: int = 65536) -> int:
    """Raise RLIMIT_NOFILE for this process (children inherit it); returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return soft
    for new_hard in (max(hard, want), hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, new_hard), new_hard))
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


_used_ports: set[int] = set()


def free_port(*hosts: str) -> int:
    """A TCP port free on every one of `hosts` (default 127.0.0.1), not handed out before."""
    hosts = hosts or ("127.0.0.1",)
    rnd = random.Random()
    for _ in range(1000):
        port = rnd.randrange(20000, 32000)  # below the ephemeral range (32768+)
        if port in _used_ports:
            continue
        if all(port_is_free(h, port) for h in hosts):
            _used_ports.add(port)
            return port
    raise RuntimeError("no free port found")


def _version(argv: list[str], pattern: str) -> str:
    exe = which(argv[0])
    if exe is None:
        return "absent"
    try:
        out = subprocess.run([exe, *argv[1:]], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"error: {exc}"
    m = re.search(pattern, out.stdout + out.stderr)
    return m.group(1) if m else (out.stdout + out.stderr).strip().splitlines()[0][:60]


def _py_version(module: str) -> str:
    try:
        mod = __import__(module)
    except ImportError:
        return "absent"
    return str(getattr(mod, "__version__", "?"))


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def machine_facts() -> dict[str, Any]:
    load1, load5, load15 = os.getloadavg()
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model(),
        "kernel": platform.release(),
        "os": _os_name(),
        "mem_total_mb": _mem_total_mb(),
        "loadavg_at_start": [round(load1, 2), round(load5, 2), round(load15, 2)],
        "python": platform.python_version(),
        "uvloop": _py_version("uvloop"),
        "httptools": _py_version("httptools"),
        "aiohttp": _py_version("aiohttp"),
        "nginx": _version(["nginx", "-v"], r"nginx/(\S+)"),
        "haproxy": _version(["haproxy", "-v"], r"version (\S+)"),
        "unicorn": _version(["unicorn", "-v"], r"unicorn v(\S+)"),
        "ruby": _version(["ruby", "-v"], r"ruby (\S+)"),
        "wrk": _version(["wrk", "-v"], r"wrk (\S+)"),
        "httperf": _version(["httperf", "--version"], r"httperf-(\S+?)\s"),
    }


def _os_name() -> str:
    with contextlib.suppress(OSError), open("/etc/os-release") as f:
        for line in f:
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    return platform.system()


def _mem_total_mb() -> int:
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 0
