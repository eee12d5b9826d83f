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
it adds upstream by default), `:nolearn` (routes not learned, `[routes] learn = false`),
`:core` (the C core on: `FAILPROXY_CORE=1`, the compiled build's default since the seventeenth
sitting of issue 21; before it `failproxy` alone meant the relay), `:relay` (the core off,
`FAILPROXY_CORE=0`: the compiled relay alone), several of them joined by `+` (`:nolog+bare`);
`@TREE` (failproxy from another checkout, built in place), and `@TREE@PYTHON` (that checkout
run by another interpreter, whose own venv has failproxy's dependencies).

Some are not fronts of the seed check: `direct` (wrk straight to the unicorns' TCP ports, the
check's reference) and `floor` (bench/targets/floor_proxy.py `--per-request`: uvloop and
httptools with a new UNIX connection a request and nothing else, the least this stack costs in
the seed's layout); `floor:compiled` is the same module compiled by Cython as it is, `floor:raw`
the same with its clients' sockets in its own epoll set too, read and written with plain socket
calls instead of uvloop's transports. And `cfloor` (bench/targets/cfloor.pyx): the same
pass-through in C on its own epoll loop, no uvloop and no Python a request: the ceiling of a
relay core in C; `cfloor:call` and `cfloor:objects` call a Python function as each request
starts and ends (an empty one; one that makes and drops a small object), `cfloor:log` makes
failproxy's access line for each request and writes a loop turn's lines at once (`cfloor:render`
only makes it, `cfloor:write` only writes a line of its size, `cfloor:cline` makes one of the
same fields in C with snprintf and writes a turn's lines at once);
`cfloor:uvloop` leaves its clients to uvloop's transports (a Cython protocol, answers through
`transport.write`) with the upstreams in C as before; `cfloor:uvloop+decide` asks failproxy's
own decision objects (route table, `room` policy, slot, counters), made from the host's
failproxy config, what failproxy's exchange asks of them for each request; options join with
`+` (`cfloor:uvloop+log`).

`--strace` and `--perf TOP` add one more run of each variant after the rounds, under `strace -c
-f` (system calls a request, by name) or `perf record` (the TOP symbols, kernel and user).

    python -m bench.profiles.seedfronts failproxy failproxy:nolog nginx-seed
        [--rounds 6] [--seconds 6] [--conns 4] [--strace] [--perf 40]
    python -m bench.profiles.seedfronts failproxy failproxy@/work/wt/deb@/work/venv-deb/bin/python
    python -m bench.profiles.seedfronts direct floor nginx-seed failproxy failproxy:nolog+bare
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.instruments import wrk
from bench.instruments.procs import Proc, Processes, cpu_split_of, switches, wait_http
from bench.instruments.stats import median, round_order
from bench.instruments.system import free_port
from bench.profiles import perfrun
from bench.profiles.newconn import BARE
from bench.profiles.syscalls import attached
from bench.scenarios import seed
from bench.targets.servers import REPO, python_env, toml_dumps

# Each merged into the config's section of that name.
OPTIONS: dict[str, dict[str, dict[str, Any]]] = {
    "nolog": {"log": {"file": "/dev/null", "access": False}},
    "devnull": {"log": {"file": "/dev/null"}},
    "logbuf": {"log": {"buffer": 65536, "flush": 1.0}},
    "bare": {"headers": BARE},
    "nolearn": {"routes": {"learn": False}}}
# Options that are failproxy's environment, not its config: `:core` and `:relay`, the C core
# (failproxy/proxy/_core.pyx) on and off.
ENV_OPTIONS: dict[str, dict[str, str]] = {"core": {"FAILPROXY_CORE": "1"},
                                          "relay": {"FAILPROXY_CORE": "0"}}
COLUMNS = ("req/s", "front user", "front system", "unicorn user", "unicorn system",
           "front voluntary", "front involuntary")


@dataclass
class Variant:
    name: str  # as given
    front: str  # a front of the seed check
    config: dict[str, dict[str, Any]]  # merged into these sections of its failproxy config
    tree: Path | None
    python: str | None
    env: dict[str, str] = field(default_factory=dict)  # added to failproxy's environment


# Not fronts of the seed check: wrk straight to the unicorns, the stack's floor and the
# pass-through in C, with the options each takes.
OWN = {"direct": (), "floor": ("compiled", "raw"),
       "cfloor": ("call", "objects", "log", "render", "write", "cline",
                  "uvloop", "decide")}


def parse(spec: str) -> Variant:
    front, _, option = spec.partition(":")
    if front in OWN:
        chosen = option.split("+") if option else []
        if any(name not in OWN[front] for name in chosen):
            raise SystemExit(f"{spec}: {front} takes {', '.join(OWN[front]) or 'no option'}")
        return Variant(spec, front, {name: {} for name in chosen}, None, None)
    head, *where = spec.split("@")
    front, _, option = head.partition(":")
    options = option.split("+") if option else []
    if front not in seed.FRONTS:
        raise SystemExit(f"{spec}: no front {front!r}; fronts: {', '.join(seed.FRONTS)}")
    for name in options:
        if name not in OPTIONS and name not in ENV_OPTIONS:
            raise SystemExit(f"{spec}: no option {name!r}; options: "
                             f"{', '.join([*OPTIONS, *ENV_OPTIONS])}")
    if (options or where) and seed.FRONTS[front].kind != "failproxy":
        raise SystemExit(f"{spec}: options, trees and interpreters are failproxy's only")
    tree = Path(where[0]) if where else None
    python = where[1] if len(where) > 1 else None
    config: dict[str, dict[str, Any]] = {}
    env: dict[str, str] = {}
    for name in options:
        env.update(ENV_OPTIONS.get(name, {}))
        for section, keys in OPTIONS.get(name, {}).items():
            config[section] = {**config.get(section, {}), **keys}
    return Variant(spec, front, config, tree, python, env)


def front_switches(procs: list[Proc]) -> tuple[int, int]:
    return switches([pid for proc in procs for pid in proc.session_pids()])


def start(procs: Processes, variants: list[Variant], uport: int,
          socks: dict[str, str]) -> dict[str, tuple[int, list[Proc]]]:
    """Each variant's three fronts: (their port, their processes)."""
    ips = [ip for _, ip in seed.HOSTS]
    config_of = seed._front_config
    out: dict[str, tuple[int, list[Proc]]] = {}
    for i, v in enumerate(variants):
        if v.front == "direct":
            out[v.name] = (uport, [])
            continue
        if v.front in ("floor", "cfloor"):
            port = free_port(*ips)
            run = ["-m", "bench.targets.floor_proxy", "--per-request"]
            floor_env = python_env()
            if "raw" in v.config:
                run.append("--raw-clients")
            elif v.config or v.front == "cfloor":
                module = "cfloor.pyx" if v.front == "cfloor" else "floor_proxy.py"
                where = compiled(procs.workdir, module)
                stem = module.split(".")[0]
                run = ["-c", f"import {stem}; {stem}.main()"]
                if v.front == "floor":
                    run.append("--per-request")
                else:
                    hooks = [name for name in v.config if name not in ("uvloop", "decide")]
                    run += ["--hook", hooks[0] if hooks else "none"]
                    if "uvloop" in v.config:
                        run += ["--clients", "uvloop"]
                floor_env["PYTHONPATH"] = f"{where}{os.pathsep}{floor_env['PYTHONPATH']}"
            floors = []
            for name, ip in seed.HOSTS:
                decide = []
                if "decide" in v.config:  # failproxy's own config for this host, as its front
                    _, conf, _ = config_of("failproxy", name, ip, port, uport, socks[name],
                                           procs.workdir, f"v{i}-{name}", 1)
                    path = procs.workdir / f"v{i}-{name}-decide.toml"
                    path.write_text(toml_dumps(conf))
                    decide = ["--decide", str(path)]
                floors.append(procs.start(f"v{i}-{name}", [
                    sys.executable, *run, "--listen", f"{ip}:{port}",
                    "--upstream", f"unix:{socks[name]}", *decide], env=floor_env))
            for proc, ip in zip(floors, ips, strict=True):
                wait_http(proc, ip, port, "/fast", timeout=20.0)
            out[v.name] = (port, floors)
            continue

        def front_config(*args: Any, v: Variant = v) -> tuple[str, Any, Path]:
            kind, conf, log = config_of(*args)
            if kind == "failproxy":
                for section, keys in v.config.items():
                    conf[section] = {**conf.get(section, {}), **keys}
            return kind, conf, log

        env = None if seed.FRONTS[v.front].kind == "nginx" else seed.front_env(v.tree)
        if env is not None:
            env.update(v.env)
        port = free_port(*ips)
        saved = sys.executable
        seed._front_config = front_config  # type: ignore[assignment]
        try:
            if v.python:
                sys.executable = v.python  # start_fronts runs `sys.executable -m failproxy`
            running = seed.start_fronts(procs, v.front, port, uport, socks, f"v{i}", env, 1)
        finally:
            sys.executable = saved
            seed._front_config = config_of
        out[v.name] = (port, running.procs)
    return out


def compiled(workdir: Path, module: str) -> Path:
    """bench/targets/MODULE compiled by Cython in place, in a directory of its own."""
    where = workdir / module.replace(".", "-")
    where.mkdir(exist_ok=True)
    shutil.copy(REPO / "bench" / "targets" / module, where / module)
    cythonize = Path(sys.executable).parent / "cythonize"
    subprocess.run([str(cythonize), "-i", "-3", "-q", module], cwd=where, check=True,
                   stdout=subprocess.DEVNULL)
    return where


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="+")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--conns", type=int, default=4, help="wrk connections per host")
    parser.add_argument("--strace", action="store_true",
                        help="after the rounds, one more run of each front under `strace -c -f`"
                        ": its system calls a request, by name")
    parser.add_argument("--perf", type=int, metavar="TOP", default=0,
                        help="after the rounds, one more run of each front under `perf record`"
                        ": its TOP symbols (kernel and user)")
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
                    if res.errors:
                        tails = "\n".join(f"{p.name} ({'alive' if p.alive() else 'exited'}):\n"
                                          f"{p.log_tail()}" for p in ps)
                        raise SystemExit(f"{name}: {res.errors} errors\n{tails}")
                    row = (res.req_s, (f1[0] - f0[0]) * 1e6 / n, (f1[1] - f0[1]) * 1e6 / n,
                           (a1[0] - a0[0]) * 1e6 / n, (a1[1] - a0[1]) * 1e6 / n,
                           (s1[0] - s0[0]) / n, (s1[1] - s0[1]) / n)
                    rows[name].append(row)
                    print(f"round {r + 1} {name:<24} {row[0]:>8,.0f} req/s  front user "
                          f"{row[1]:5.1f} system {row[2]:5.1f} µs/req  unicorn user "
                          f"{row[3]:5.1f} system {row[4]:5.1f}  switches {row[5]:.2f} / "
                          f"{row[6]:.2f}", flush=True)
            if args.perf:
                for name, (port, ps) in fronts.items():
                    if ps:
                        profile(name, port, ps, ips, conns, args.seconds, Path(tmp), args.perf)
            if args.strace:
                traced = {name: trace(port, ps, ips, conns, args.seconds, Path(tmp))
                          for name, (port, ps) in fronts.items() if ps}
        finally:
            procs.close()
    if args.strace:
        print_traced(traced)
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


def trace(port: int, ps: list[Proc], ips: list[str], conns: int, seconds: float,
          tmp: Path) -> dict[str, float]:
    """System calls a request of one variant's fronts over one wrk run under strace."""
    script = wrk.write_script(tmp / "w.lua", [(ip, port) for ip in ips])
    calls, requests = attached(
        [pid for proc in ps for pid in proc.session_pids()], tmp / "strace.out",
        lambda: wrk.run(f"http://{ips[0]}:{port}/fast", script=script, duration=seconds,
                        connections=conns, threads=len(ips)).requests)
    return {name: n / max(1, requests) for name, n in calls.items()}


def profile(name: str, port: int, ps: list[Proc], ips: list[str], conns: int, seconds: float,
            tmp: Path, top: int) -> None:
    """`perf record` on one variant's fronts over one wrk run; where their samples went."""
    data = tmp / "perf.data"
    script = wrk.write_script(tmp / "w.lua", [(ip, port) for ip in ips])
    rec = perfrun.record([pid for proc in ps for pid in proc.session_pids()], seconds, data)
    time.sleep(0.3)
    res = wrk.run(f"http://{ips[0]}:{port}/fast", script=script, duration=seconds - 1.0,
                  connections=conns, threads=len(ips))
    rec.wait()
    print(f"\nperf record on {name}'s fronts ({res.req_s:,.0f} req/s under perf)")
    perfrun.report(data, top)


def print_traced(traced: dict[str, dict[str, float]]) -> None:
    names = sorted({k for calls in traced.values() for k, v in calls.items() if v >= 0.01})
    print("\nsystem calls a request (strace -c -f on the fronts, one more run each)\n")
    print("| variant | all | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 2) + "|")
    for variant, calls in traced.items():
        print(f"| {variant} | {sum(calls.values()):.2f} | "
              + " | ".join(f"{calls.get(k, 0.0):.2f}" for k in names) + " |")


if __name__ == "__main__":
    main()
