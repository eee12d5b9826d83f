"""Wake-ups per request: how often wrk and the proxy went to sleep and were woken, per request.

Issue 21's perf analysis put failproxy's extra system time in waking the reader of each write
(wrk, the upstream) after it had gone back to sleep during the Python between two writes. A
process that blocks in epoll_wait and is woken counts one voluntary context switch, so the
count per request says how many wake-ups the load cost: wrk's from `getrusage(RUSAGE_CHILDREN)`
around its run (it is this process's child), the proxy's from /proc/PID/status of each of its
processes before and after. The throughput scenario's layout (nginx `return 200` on a UNIX
socket as the upstream, wrk -t1 -c50, the access log on), one target after another, rounds
interleaved; medians of the rounds.

    python -m bench.profiles.wakeups [--seconds 5] [--rounds 3]
        [--targets failproxy1,nginx1,floor] [--baseline /work/wt/base]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
from pathlib import Path

from bench.instruments import wrk
from bench.instruments.procs import Processes, switches
from bench.instruments.system import free_port
from bench.scenarios.throughput import LABELS, fast_upstream, starter
from bench.targets import servers


def measured(target: servers.Target, script: Path, seconds: float) -> tuple[float, float, float]:
    """(requests a second, wrk's wake-ups a request, the proxy's wake-ups a request)."""
    assert target.proc is not None
    pids = target.proc.session_pids()
    before_wrk = resource.getrusage(resource.RUSAGE_CHILDREN).ru_nvcsw
    before_proxy = switches(pids)[0]
    res = wrk.run(target.url, script=script, duration=seconds, connections=50)
    wrk_switches = resource.getrusage(resource.RUSAGE_CHILDREN).ru_nvcsw - before_wrk
    proxy_switches = switches(pids)[0] - before_proxy
    n = max(res.requests, 1)
    return res.requests / seconds, wrk_switches / n, proxy_switches / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--targets", default="failproxy1,nginx1,floor")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="a checkout built in place, measured as failproxy1-base")
    args = parser.parse_args()
    kinds = args.targets.split(",")
    if args.baseline is not None:
        kinds.append("failproxy1-base")
    rows: dict[str, list[tuple[float, float, float]]] = {kind: [] for kind in kinds}
    with tempfile.TemporaryDirectory(prefix="bench-wakeups-") as tmp:
        procs = Processes(Path(tmp))
        try:
            unix_path, _, _, script = fast_upstream(procs)
            targets = {}
            for kind in kinds:
                targets[kind] = starter(kind, unix_path, True, args.baseline)(
                    procs, kind, free_port())
                wrk.run(targets[kind].url, script=script, duration=1.0, connections=50)
            for r in range(args.rounds):
                for kind in kinds:
                    rows[kind].append(measured(targets[kind], script, args.seconds))
                    rps, w, p = rows[kind][-1]
                    print(f"round {r + 1}/{args.rounds} {kind:<16} {rps:>9,.0f} req/s  "
                          f"wrk {w:.3f}  proxy {p:.3f} wake-ups/request", flush=True)
        finally:
            procs.close()
    print(f"\nwake-ups per request (voluntary context switches), wrk -t1 -c50 -d{args.seconds:g}s, "
          f"access log on, median of {args.rounds} rounds\n")
    print("| target | req/s | wrk | proxy |")
    print("|---|---|---|---|")
    for kind, got in rows.items():
        print(f"| {LABELS.get(kind, kind)} | {statistics.median(g[0] for g in got):,.0f} | "
              f"{statistics.median(g[1] for g in got):.3f} | "
              f"{statistics.median(g[2] for g in got):.3f} |")


if __name__ == "__main__":
    main()
