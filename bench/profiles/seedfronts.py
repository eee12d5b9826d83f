"""The seed cluster's no-overload check with front variants side by side, and where their CPU goes.

The seed check (`python -m bench seed --mixes nooverload`) gives one figure per front; here
several variants of a front run on the same three unicorns, started together, in interleaved
rounds (`round_order`), so that a variant's effect is seen against this box's round-to-round
swing: wrk -t3 with `--conns` connections per host (the check's 4), fast requests, one thread per
host. For each variant the three fronts' user and system CPU, the unicorns' user and system CPU
(µs a request, /proc), and the fronts' voluntary and involuntary context switches a request
(/proc/PID/status): on two shared cores these move with the load, not only with the code (a
front that is slower leaves the unicorns idle more often, and each of their requests then costs
more: a sleep and a wake-up each).

A variant is a front of the seed check (`failproxy`, `nginx-seed`, ...) with optional parts:
`:nolog` (failproxy, access log off), `:devnull` (access log on, written to /dev/null: the line
made and written, no file system), `:logbuf` (the log's lines gathered up to 64 KiB or a second,
as nginx's `access_log ... buffer=64k flush=1s`), `:bare` (failproxy, none of the four headers
it adds upstream by default), `@TREE` (failproxy from another checkout, built in place), and
`@TREE@PYTHON` (that checkout run by another interpreter, whose own venv has failproxy's
dependencies).

    python -m bench.profiles.seedfronts failproxy failproxy:nolog nginx-seed
        [--rounds 6] [--seconds 6] [--conns 4]
    python -m bench.profiles.seedfronts failproxy failproxy@/work/wt/deb@/work/venv-deb/bin/python
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.instruments import wrk
from bench.instruments.procs import Proc, Processes, cpu_split_of, switches
from bench.instruments.stats import median, round_order
from bench.instruments.system import free_port
from bench.profiles.newconn import BARE
from bench.scenarios import seed

# Each merged into the config's section of that name.
OPTIONS: dict[str, dict[str, dict[str, Any]]] = {
    "nolog": {"log": {"file": "/dev/null", "access": False}},
    "devnull": {"log": {"file": "/dev/null"}},
    "logbuf": {"log": {"buffer": 65536, "flush": 1.0}},
    "bare": {"headers": BARE}}
COLUMNS = ("req/s", "front user", "front system", "unicorn user", "unicorn system",
           "front voluntary", "front involuntary")


@dataclass
class Variant:
    name: str  # as given
    front: str  # a front of the seed check
    config: dict[str, dict[str, Any]]  # merged into these sections of its failproxy config
    tree: Path | None
    python: str | None


def parse(spec: str) -> Variant:
    head, *where = spec.split("@")
    front, _, option = head.partition(":")
    if front not in seed.FRONTS:
        raise SystemExit(f"{spec}: no front {front!r}; fronts: {', '.join(seed.FRONTS)}")
    if option and option not in OPTIONS:
        raise SystemExit(f"{spec}: no option {option!r}; options: {', '.join(OPTIONS)}")
    if (option or where) and seed.FRONTS[front].kind != "failproxy":
        raise SystemExit(f"{spec}: options, trees and interpreters are failproxy's only")
    tree = Path(where[0]) if where else None
    python = where[1] if len(where) > 1 else None
    return Variant(spec, front, OPTIONS.get(option, {}), tree, python)


def front_switches(procs: list[Proc]) -> tuple[int, int]:
    return switches([pid for proc in procs for pid in proc.session_pids()])


def start(procs: Processes, variants: list[Variant], uport: int,
          socks: dict[str, str]) -> dict[str, tuple[int, list[Proc]]]:
    """Each variant's three fronts: (their port, their processes)."""
    ips = [ip for _, ip in seed.HOSTS]
    config_of = seed._front_config
    out = {}
    for i, v in enumerate(variants):
        def front_config(*args: Any, v: Variant = v) -> tuple[str, Any, Path]:
            kind, conf, log = config_of(*args)
            if kind == "failproxy":
                for section, keys in v.config.items():
                    conf[section] = {**conf.get(section, {}), **keys}
            return kind, conf, log

        env = None if seed.FRONTS[v.front].kind == "nginx" else seed.front_env(v.tree)
        port = free_port(*ips)
        saved = sys.executable
        seed._front_config = front_config  # type: ignore[assignment]
        try:
            if v.python:
                sys.executable = v.python  # start_fronts runs `sys.executable -m failproxy`
            running = seed.start_fronts(procs, v.front, port, uport, socks, f"v{i}", env, 1)
        finally:
            sys.executable = saved
            seed._front_config = config_of  # type: ignore[assignment]
        out[v.name] = (port, running.procs)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="+")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--conns", type=int, default=4, help="wrk connections per host")
    args = parser.parse_args()
    variants = [parse(s) for s in args.variants]
    ips = [ip for _, ip in seed.HOSTS]
    conns = args.conns * len(ips)
    with tempfile.TemporaryDirectory(prefix="bench-seedfronts-") as tmp:
        procs = Processes(Path(tmp))
        try:
            uport = free_port(*ips)
            socks, unicorns = seed.start_unicorns(procs, uport)
            fronts = start(procs, variants, uport, socks)
            rows: dict[str, list[tuple[float, ...]]] = {v.name: [] for v in variants}
            for r in range(args.rounds):
                for name in round_order(list(fronts), r):
                    port, ps = fronts[name]
                    script = wrk.write_script(Path(tmp) / "w.lua", [(ip, port) for ip in ips])
                    url = f"http://{ips[0]}:{port}/fast"
                    wrk.run(url, script=script, duration=1.0, connections=conns,
                            threads=len(ips))
                    f0, a0, s0 = cpu_split_of(ps), cpu_split_of(unicorns), front_switches(ps)
                    res = wrk.run(url, script=script, duration=args.seconds, connections=conns,
                                  threads=len(ips))
                    f1, a1, s1 = cpu_split_of(ps), cpu_split_of(unicorns), front_switches(ps)
                    n = max(1, res.requests)
                    assert res.errors == 0, f"{name}: {res.errors} errors"
                    row = (res.req_s, (f1[0] - f0[0]) * 1e6 / n, (f1[1] - f0[1]) * 1e6 / n,
                           (a1[0] - a0[0]) * 1e6 / n, (a1[1] - a0[1]) * 1e6 / n,
                           (s1[0] - s0[0]) / n, (s1[1] - s0[1]) / n)
                    rows[name].append(row)
                    print(f"round {r + 1} {name:<24} {row[0]:>8,.0f} req/s  front user "
                          f"{row[1]:5.1f} system {row[2]:5.1f} µs/req  unicorn user "
                          f"{row[3]:5.1f} system {row[4]:5.1f}  switches {row[5]:.2f} / "
                          f"{row[6]:.2f}", flush=True)
        finally:
            procs.close()
    print(f"\nwrk -t{len(ips)} -c{conns} -d{args.seconds:g}s, {args.rounds} rounds, medians; "
          "CPU in µs a request, switches (voluntary, involuntary) a request\n")
    print("| variant | " + " | ".join(COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    first = median([x[0] for x in rows[variants[0].name]])
    for v in variants:
        m = [median([x[i] for x in rows[v.name]]) for i in range(len(COLUMNS))]
        ratio = f" ({m[0] / first:.2f}x)" if first else ""
        print(f"| {v.name} | {m[0]:,.0f}{ratio} | " + " | ".join(f"{x:.1f}" for x in m[1:5])
              + f" | {m[5]:.2f} | {m[6]:.2f} |")


if __name__ == "__main__":
    main()
