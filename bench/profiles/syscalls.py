"""System calls per request through each proxy, by kind: `strace -c` on the proxy's processes
while wrk loads it.

The throughput scenario's layout (bench/scenarios/throughput.py): nginx `return 200 "ok"` on a
UNIX socket as the upstream, wrk -t1 -c50 on each proxy, the access log on. Each target is
warmed up, then `strace -c -f` is attached to every process of its session for one wrk run, and
its call counts are divided by the requests wrk completed. Under strace every call is slower, so
a proxy gathers a little more per read and per epoll_wait than at full speed: the counts of
reads and writes per request hold, the epoll_wait count is an upper bound. The figure the issue
asks to see beside nginx's and the floor's.

    python -m bench.profiles.syscalls [--seconds 5] [--targets failproxy1,nginx1,haproxy1,floor]
"""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.instruments import wrk
from bench.instruments.procs import Processes
from bench.instruments.system import free_port, which
from bench.scenarios.throughput import LABELS, fast_upstream, starter
from bench.targets import servers

# One row of strace -c's summary: % time, seconds, usecs/call, calls, [errors], syscall.
_ROW = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:(\d+)\s+)?(\w+)\s*$")


def parse_summary(text: str) -> dict[str, int]:
    """Calls by system call name from `strace -c` output (the total line left out)."""
    calls: dict[str, int] = {}
    for line in text.splitlines():
        m = _ROW.match(line)
        if m and m.group(3) != "total":
            calls[m.group(3)] = calls.get(m.group(3), 0) + int(m.group(1))
    return calls


def traced(target: servers.Target, script: Path, seconds: float, out: Path
           ) -> tuple[dict[str, int], int]:
    """Calls by name over one wrk run with strace attached, and the requests wrk completed."""
    assert target.proc is not None
    return attached(target.proc.session_pids(), out, lambda: wrk.run(
        target.url, script=script, duration=seconds, connections=50).requests)


def attached(pids: list[int], out: Path, load: Callable[[], int]) -> tuple[dict[str, int], int]:
    """Calls by name of the processes `pids` while `load` runs (it returns the requests it
    made), `strace -c -f` attached to them for it."""
    exe = which("strace")
    assert exe is not None, "strace is not installed (Debian package strace)"
    argv = [exe, "-c", "-f", "-o", str(out)]
    for pid in pids:
        argv += ["-p", str(pid)]
    strace = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)  # strace attaches to each process before the load begins
        requests = load()
    finally:
        strace.send_signal(signal.SIGINT)
        strace.wait(timeout=30)
    return parse_summary(out.read_text()), requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--targets", default="failproxy1,nginx1,haproxy1,floor")
    args = parser.parse_args()
    kinds = args.targets.split(",")
    rows: dict[str, tuple[dict[str, int], int]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-syscalls-") as tmp:
        procs = Processes(Path(tmp))
        try:
            unix_path, _, _, script = fast_upstream(procs)
            for kind in kinds:
                target = starter(kind, unix_path, True, None)(procs, kind, free_port())
                target.label = LABELS.get(kind, kind)
                wrk.run(target.url, script=script, duration=1.0, connections=50)  # warm-up
                rows[kind] = traced(target, script, args.seconds, procs.workdir / f"{kind}.st")
                calls, requests = rows[kind]
                print(f"{kind:<12} {requests:>8} requests  "
                      f"{sum(calls.values()) / max(requests, 1):6.2f} syscalls/request",
                      flush=True)
        finally:
            procs.close()
    names = sorted({n for calls, _ in rows.values() for n in calls},
                   key=lambda n: -max(c.get(n, 0) / max(r, 1) for c, r in rows.values()))
    shown = [n for n in names
             if max(c.get(n, 0) / max(r, 1) for c, r in rows.values()) >= 0.01]
    print(f"\nsystem calls per request, wrk -t1 -c50 -d{args.seconds:g}s under `strace -c -f` "
          "(access log on)\n")
    print("| target | requests | all | " + " | ".join(shown) + " |")
    print("|---|---|---|" + "---|" * len(shown))
    for kind, (calls, requests) in rows.items():
        per = [calls.get(n, 0) / max(requests, 1) for n in shown]
        print(f"| {LABELS.get(kind, kind)} | {requests} | "
              f"{sum(calls.values()) / max(requests, 1):.2f} | "
              + " | ".join(f"{p:.2f}" for p in per) + " |")


if __name__ == "__main__":
    main()
