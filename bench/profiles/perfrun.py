"""Where a real request's CPU goes: `perf record` on one failproxy worker under wrk.

The throughput scenario's setup (nginx `return 200` on a UNIX socket, failproxy 1 worker,
access log on, wrk -t1 -c50), with `perf record -g` attached to the worker for the load.
Prints the share of samples per shared object (kernel, libpython, uvloop, httptools, the
compiled failproxy modules...) and the top symbols: with the compiled build, failproxy's own
functions appear by name (CPyDef_<module>___<Class>___<method>).

    python -m bench.profiles.perfrun [--seconds 8] [--top 25]
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

from bench.instruments import wrk
from bench.instruments.procs import Processes, children
from bench.instruments.system import free_port
from bench.targets import servers

HOST = "127.0.0.1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--nolog", action="store_true", help="access log off")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-perf-") as tmp:
        procs = Processes(Path(tmp))
        try:
            unix_path = str(Path(tmp) / "up.sock")
            servers.start_fast_upstream(procs, "upstream", unix_path, tcp=(HOST, free_port()))
            port = free_port()
            t = servers.start_failproxy_target(procs, "failproxy1", HOST, port, unix_path,
                                               workers=1, access_log=not args.nolog)
            assert t.proc is not None
            worker = children(t.proc.popen.pid)[0]
            script = wrk.write_script(Path(tmp) / "done.lua")
            url = f"http://{HOST}:{port}/"
            wrk.run(url, script=script, duration=1.0, connections=50)
            data = Path(tmp) / "perf.data"
            rec = record(worker, args.seconds, data)
            time.sleep(0.2)
            res = wrk.run(url, script=script, duration=max(1.0, args.seconds - 1.0),
                          connections=50)
            rec.wait()
            print(f"wrk -t1 -c50: {res.req_s:,.0f} req/s under perf")
            report(data, args.top)
        finally:
            procs.close()


def record(pids: int | list[int], seconds: float, data: Path) -> subprocess.Popen[bytes]:
    """`perf record -g` on a process (or several) for `seconds`, started now (wait() for it)."""
    which = ",".join(str(pid) for pid in ([pids] if isinstance(pids, int) else pids))
    return subprocess.Popen(
        ["perf", "record", "-q", "-F", "1999", "-g", "-o", str(data), "-p", which,
         "--", "sleep", str(seconds)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def report(data: Path, top: int) -> None:
    """The shares per shared object, then per symbol."""
    for sort, n in (("dso", 12), ("dso,sym", top)):
        out = subprocess.run(
            ["perf", "report", "-i", str(data), "--no-children", "--stdio",
             "--sort", sort, "--percent-limit", "0.4", "-g", "none"],
            capture_output=True, text=True, check=True).stdout
        lines = [ln for ln in out.splitlines() if ln.strip() and not ln.startswith("#")]
        print(f"\n-- by {sort} --")
        print("\n".join(lines[:n]))


if __name__ == "__main__":
    main()
