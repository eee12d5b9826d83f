"""Starting, watching and stopping the servers under test.

Every server runs in its own session (so its workers can be found and killed with it), its
output goes to a log file in the run's temp dir, and `Processes.close()` — called from a
`finally` — ends every one of them: TERM to the whole process group, then KILL.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.instruments.system import log

CLK_TCK = os.sysconf("SC_CLK_TCK")


class StartError(RuntimeError):
    """A server did not come up; the message carries the tail of its log."""


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n: int = 15) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def session_pids(self) -> list[int]:
        """The leader and every live process in its session (workers, forked children)."""
        return session_pids(self.pid)

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds(p) for p in self.session_pids())

    def cpu_split(self) -> tuple[float, float]:
        """(user, system) seconds of the session's live processes."""
        splits = [cpu_split(p) for p in self.session_pids()]
        return sum(u for u, _ in splits), sum(s for _, s in splits)


def _exit_on_term(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


@dataclass
class Processes:
    """The servers of one scenario, all stopped by `close()`. A bench stopped with TERM (kill,
    pkill, timeout) exits through its `finally` too, as it does on Ctrl-C: TERM's default
    action ended the bench at once and left its servers running, each in its own session."""

    workdir: Path
    procs: list[Proc] = field(default_factory=list)

    def __post_init__(self) -> None:
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL):
            signal.signal(signal.SIGTERM, _exit_on_term)

    def start(self, name: str, argv: list[str], *, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> Proc:
        log_path = self.workdir / f"{name}.out"
        out = open(log_path, "wb")  # noqa: SIM115 - handed to the child, closed below
        try:
            popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=str(cwd or self.workdir), env=env, start_new_session=True)
        finally:
            out.close()
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, grace: float = 3.0) -> None:
        stop_group(proc.popen, grace)
        if proc in self.procs:
            self.procs.remove(proc)

    def close(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                stop_group(proc.popen, 3.0)
        self.procs.clear()


def stop_group(popen: subprocess.Popen[bytes], grace: float) -> None:
    """TERM the process group the child leads, wait up to `grace`, then KILL it."""
    pgid = popen.pid  # start_new_session: the child leads its own group
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if popen.poll() is not None and not _group_alive(pgid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        popen.wait(timeout=2)


def _group_alive(pgid: int) -> bool:
    """Any live (non-zombie) process left in the session the child leads."""
    return bool(session_pids(pgid))


# ---------------------------------------------------------------- /proc readers

def _pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def _stat(pid: int) -> list[str]:
    """/proc/<pid>/stat split into fields; [0] pid, [1] comm, [2] state, ... (0-based)."""
    with open(f"/proc/{pid}/stat") as f:
        raw = f.read()
    head, _, tail = raw.rpartition(")")
    pid_s, _, comm = head.partition(" (")
    return [pid_s, comm, *tail.split()]


def session_pids(sid: int) -> list[int]:
    out = []
    for pid in _pids():
        try:
            fields = _stat(pid)
        except (OSError, IndexError):
            continue
        if int(fields[5]) == sid and fields[2] != "Z":
            out.append(pid)
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, in seconds (0 when it is gone)."""
    return sum(cpu_split(pid))


def cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of one process, in seconds ((0, 0) when it is gone)."""
    try:
        fields = _stat(pid)
    except (OSError, IndexError):
        return 0.0, 0.0
    return int(fields[13]) / CLK_TCK, int(fields[14]) / CLK_TCK


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_split_of(procs: list[Proc]) -> tuple[float, float]:
    """(user, system) seconds of `procs`' live processes (workers included), summed."""
    splits = [p.cpu_split() for p in procs]
    return sum(u for u, _ in splits), sum(s for _, s in splits)


def switches(pids: list[int]) -> tuple[int, int]:
    """(voluntary, involuntary) context switches of these processes so far, summed: a
    voluntary one is a sleep and a wake-up, an involuntary one a preemption."""
    vol = invol = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                vol += int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches:"):
                invol += int(line.split()[1])
    return vol, invol


def children(pid: int) -> list[int]:
    out = []
    for p in _pids():
        try:
            if int(_stat(p)[3]) == pid:
                out.append(p)
        except (OSError, IndexError):
            continue
    return out


# ---------------------------------------------------------------- readiness

def http_get(host: str, port: int, path: str = "/", timeout: float = 2.0,
             unix: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 GET with Connection: close; returns (status, headers, body)."""
    if unix:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: str | tuple[str, int] = unix
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        target = (host, port)
    with sock:
        sock.settimeout(timeout)
        sock.connect(target)
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host or 'localhost'}\r\n"
                     "Connection: close\r\n\r\n".encode())
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, body


def wait_http(proc: Proc, host: str, port: int, path: str = "/", timeout: float = 15.0,
              unix: str | None = None) -> None:
    """Wait until `proc` answers 200 on (host, port); raise StartError with its log if not."""
    deadline = time.monotonic() + timeout
    last = "no attempt"
    while time.monotonic() < deadline:
        if not proc.alive():
            raise StartError(f"{proc.name} exited with {proc.popen.returncode}:\n"
                             f"{proc.log_tail()}")
        try:
            status, _, _ = http_get(host, port, path, timeout=1.0, unix=unix)
            if status == 200:
                return
            last = f"status {status}"
        except (OSError, ValueError, IndexError) as exc:
            last = repr(exc)
        time.sleep(0.05)
    raise StartError(f"{proc.name} not answering 200 on {unix or f'{host}:{port}'} after "
                     f"{timeout}s ({last}):\n{proc.log_tail()}")


def wait_unix_listening(proc: Proc, path: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise StartError(f"{proc.name} exited:\n{proc.log_tail()}")
        if os.path.exists(path):
            return
        time.sleep(0.05)
    raise StartError(f"{proc.name}: {path} never appeared:\n{proc.log_tail()}")


def announce(proc: Proc, what: str) -> None:
    log(f"  started {proc.name} (pid {proc.pid}): {what}")
