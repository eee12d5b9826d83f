"""Scenario "throughput": req/s, latency and CPU per request through each proxy.

One fast upstream (nginx `return 200 "ok"` on a UNIX socket, 1 worker) behind every proxy;
wrk (`-t1 -c50 --latency`) loads each target in interleaved rounds (A B C … A B C …) so that the
noise of a shared machine spreads over all of them; medians over rounds are reported. CPU µs
per request = utime+stime of the proxy's processes (master and workers, from /proc) over the
run, divided by the requests wrk completed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.instruments import wrk
from bench.instruments.procs import Proc, Processes, StartError
from bench.instruments.stats import median, ratio
from bench.instruments.system import free_port, log
from bench.scenarios import seed
from bench.targets import servers

HOST = "127.0.0.1"


@dataclass(frozen=True)
class Params:
    rounds: int
    duration: float
    connections: int = 50
    warmup: float = 0.5
    log_sets: tuple[bool, ...] = (True, False)  # access log on, then off
    kinds: tuple[str, ...] = ("failproxy1", "failproxy1-buffered", "failproxy2", "nginx1",
                              "nginx2", "haproxy1", "floor", "naive")
    # Another checkout of failproxy (e.g. the previous main) measured in the same run as
    # "failproxy1-base": before/after figures from one sitting.
    baseline: str | None = None  # a tree holding failproxy/, or a git revision (scenarios.seed)


LABELS = {
    "direct": "fast upstream direct (nginx return 200, TCP)",
    "failproxy1": "failproxy, 1 worker",
    "failproxy1-buffered": "failproxy, 1 worker, access log buffer = 65536, flush = 1.0",
    "failproxy2": "failproxy, 2 workers",
    "nginx1": "nginx, 1 worker, keepalive 64, access log buffer=64k flush=1s",
    "nginx2": "nginx, 2 workers, keepalive 64, access log buffer=64k flush=1s",
    "haproxy1": "HAProxy, 1 thread, http-reuse safe",
    "naive": "naive aiohttp proxy (uvloop)",
    "floor": "floor: uvloop + httptools pass-through, no features",
    "failproxy1-base": "failproxy, 1 worker, baseline checkout",
}
C_PEERS = ("nginx1", "haproxy1")  # "the best C peer" of the targets


def starter(kind: str, unix_path: str, log_on: bool, baseline: Path | None
             ) -> Callable[[Processes, str, int], servers.Target]:
    def start(procs: Processes, name: str, port: int) -> servers.Target:
        if kind == "failproxy1-base":
            return servers.start_failproxy_target(procs, name, HOST, port, unix_path,
                                                  workers=1, access_log=log_on, tree=baseline)
        if kind == "failproxy1-buffered":  # the same log settings as the nginx rows
            return servers.start_failproxy_target(procs, name, HOST, port, unix_path,
                                                  workers=1, access_log=log_on, log_buffer=True)
        if kind.startswith("failproxy"):
            return servers.start_failproxy_target(procs, name, HOST, port, unix_path,
                                                  workers=int(kind[-1]), access_log=log_on)
        if kind.startswith("nginx"):
            return servers.start_nginx_proxy(procs, name, HOST, port, f"unix:{unix_path}",
                                             workers=int(kind[-1]), access_log=log_on,
                                             log_buffer=True)
        if kind == "floor":
            return servers.start_floor(procs, name, HOST, port, unix_path)
        if kind == "haproxy1":
            return servers.start_haproxy(procs, name, HOST, port, unix_path,
                                         access_log=log_on)
        if kind == "naive":
            return servers.start_naive(procs, name, HOST, port, unix_path, access_log=log_on)
        raise ValueError(kind)
    return start


def fast_upstream(procs: Processes) -> tuple[str, int, Proc, Path]:
    """The scenario's upstream (nginx `return 200` on a UNIX socket, and on a TCP port for
    *direct*) and the wrk script: (socket path, port, process, script). The profiles
    (syscalls.py, wakeups.py) measure in the same layout."""
    unix_path = str(procs.workdir / "up.sock")
    up_port = free_port()
    upstream = servers.start_fast_upstream(procs, "upstream", unix_path, tcp=(HOST, up_port))
    return unix_path, up_port, upstream, wrk.write_script(procs.workdir / "done.lua")


def run(params: Params, procs: Processes) -> dict[str, Any]:
    workdir = procs.workdir
    unix_path, up_port, upstream, script = fast_upstream(procs)

    targets: list[dict[str, Any]] = []
    direct = servers.Target("direct", LABELS["direct"], HOST, up_port, upstream, kind="upstream")
    targets.append(_entry(direct, "", "direct"))
    kinds = params.kinds + (("failproxy1-base",) if params.baseline else ())
    baseline = seed.baseline_tree(params.baseline, workdir)[0] if params.baseline else None
    for log_on in params.log_sets:
        suffix = "" if log_on else "-nolog"
        for kind in kinds:
            if kind in ("floor", "failproxy1-buffered") and not log_on:
                continue  # no access log / no log to buffer: one row, with the log-on set
            name = kind + suffix
            try:
                t = starter(kind, unix_path, log_on, baseline)(procs, name, free_port())
            except (StartError, OSError) as exc:
                log(f"  !! {name} did not start: {exc}")
                t = servers.Target(name, "", HOST, 0, None, kind=kind, error=str(exc)[:2000])
            targets.append(_entry(t, "on" if log_on else "off", kind))

    live = [e for e in targets if e["target"].error is None]
    for e in live:  # warm-up: JIT-less, but pools, caches and page faults
        _load(e["target"], script, params.warmup, params.connections)
    for r in range(params.rounds):
        for e in live:
            t = e["target"]
            res = _measure(t, script, params.duration, params.connections)
            e["rounds"].append(res)
            log(f"  round {r + 1}/{params.rounds} {t.name:<18} {res['req_s']:>10,.0f} req/s  "
                f"p50 {res['p50_ms']:.3f} ms  p99 {res['p99_ms']:.3f} ms  "
                f"cpu {res['cpu_us_per_req']:.1f} µs/req  errors {res['errors']}")
            time.sleep(0.2)

    out = [_summarise(e) for e in targets]
    _ratios(out)
    return {"params": {"rounds": params.rounds, "duration_s": params.duration,
                       "connections": params.connections, "threads": 1,
                       "wrk": f"wrk -t1 -c{params.connections} -d{params.duration:g}s "
                              "--latency"},
            "targets": out}


def _entry(t: servers.Target, log_set: str, kind: str) -> dict[str, Any]:
    t.label = LABELS.get(kind, kind)
    return {"target": t, "log": log_set, "kind": kind, "rounds": []}


def _load(t: servers.Target, script: Path, duration: float, conns: int) -> wrk.WrkResult:
    return wrk.run(t.url, script=script, duration=duration, connections=conns)


def _measure(t: servers.Target, script: Path, duration: float, conns: int) -> dict[str, Any]:
    assert t.proc is not None
    cpu0 = t.proc.cpu_seconds()
    res = _load(t, script, duration, conns)
    cpu1 = t.proc.cpu_seconds()
    d = res.as_dict()
    d["cpu_s"] = round(cpu1 - cpu0, 3)
    d["cpu_us_per_req"] = (cpu1 - cpu0) * 1e6 / res.requests if res.requests else 0.0
    return d


def _summarise(e: dict[str, Any]) -> dict[str, Any]:
    t: servers.Target = e["target"]
    rounds = e["rounds"]
    med = {k: median([r[k] for r in rounds]) for k in
           ("req_s", "p50_ms", "p90_ms", "p99_ms", "p999_ms", "cpu_us_per_req")} if rounds \
        else {}
    return {"name": t.name, "label": t.label, "kind": e["kind"], "log": e["log"],
            "error": t.error, "rounds": rounds, "median": med,
            "errors_total": sum(r["errors"] for r in rounds)}


def _ratios(out: list[dict[str, Any]]) -> None:
    """ratio_nginx1: req/s over nginx 1 worker with the same access-log setting;
    ratio_best_c: over the best of nginx 1 worker and HAProxy 1 thread (same log setting)."""
    by = {(o["kind"], o["log"]): o for o in out}
    for o in out:
        if not o["median"] or o["kind"] == "direct":
            continue
        ref = by.get(("nginx1", o["log"]))
        o["ratio_nginx1"] = ratio(o["median"]["req_s"], ref["median"].get("req_s")
                                  if ref and ref["median"] else None)
        peers = [by[(k, o["log"])] for k in C_PEERS
                 if (k, o["log"]) in by and by[(k, o["log"])]["median"]]
        if peers:
            best = max(peers, key=lambda p: p["median"]["req_s"])
            o["best_c"] = best["name"]
            o["ratio_best_c"] = ratio(o["median"]["req_s"], best["median"]["req_s"])
