"""Scenario "failover": what one failover costs a request.

The UNIX primary is a listener nobody accepts from, its accept queue filled until connect()
answers EAGAIN, so every request fails over (reason `overloaded`) to the backup: the fast
upstream on TCP. The same request through a proxy pointed directly at that backup gives the
baseline; the difference of the latency percentiles is the cost of the failover. wrk runs at
fixed low concurrency (-c1: pure latency, no queueing; -c10: a little load), in interleaved
rounds. nginx with the same two configs (`max_fails=0` so that it, too, tries the socket on
every request) is measured alongside for scale.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.instruments import wrk
from bench.instruments.procs import Processes, StartError, wait_http
from bench.instruments.stats import median, percentile
from bench.instruments.system import free_port, log
from bench.targets import servers

HOST = "127.0.0.1"
Pair = tuple[str, servers.Target, servers.Target]  # (proxy, failing-over, direct)
Runs = dict[tuple[str, int], list[dict[str, Any]]]  # (target name, -c) -> one dict per round


@dataclass(frozen=True)
class Params:
    rounds: int
    duration: float
    concurrencies: tuple[int, ...] = (1, 10)
    with_nginx: bool = True


def fill_unix_listener(path: str) -> tuple[socket.socket, list[socket.socket]]:
    """A listening AF_UNIX socket that never accepts, with its queue full (connect -> EAGAIN)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(0)
    held: list[socket.socket] = []
    for _ in range(1000):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(path)
        except BlockingIOError:
            s.close()
            return listener, held
        held.append(s)
    raise RuntimeError("the UNIX listener never filled up")


def run(params: Params, procs: Processes) -> dict[str, Any]:
    workdir = procs.workdir
    up_unix = str(workdir / "up.sock")
    up_port = free_port()
    servers.start_fast_upstream(procs, "upstream", up_unix, tcp=(HOST, up_port))
    full_path = str(workdir / "full.sock")
    listener, held = fill_unix_listener(full_path)
    log(f"  {full_path}: queue full after {len(held)} connects (EAGAIN on the next)")
    backup = f"{HOST}:{up_port}"
    script = wrk.write_script(workdir / "done.lua")
    try:
        pairs = _start_pairs(procs, params, full_path, backup)
        return _measure(params, procs, pairs, script, len(held))
    finally:
        for s in held:
            s.close()
        listener.close()


def _start_pairs(procs: Processes, params: Params, full_path: str, backup: str
                 ) -> list[Pair]:
    pairs: list[Pair] = []
    wd = procs.workdir
    ports = {n: free_port() for n in ("fp_fo", "fp_direct", "ng_fo", "ng_direct")}
    try:
        fo_cfg = servers.failproxy_config(
            listen=[f"{HOST}:{ports['fp_fo']}"], workers=1, log_file=str(wd / "fp_fo.log"),
            servers=[{"address": f"unix:{full_path}"}, {"address": backup, "backup": True}])
        direct_cfg = servers.failproxy_config(
            listen=[f"{HOST}:{ports['fp_direct']}"], workers=1,
            log_file=str(wd / "fp_direct.log"), servers=[{"address": backup}])
        fo = servers.start_failproxy(procs, "fp_fo", fo_cfg, probe=(HOST, ports["fp_fo"]))
        direct = servers.start_failproxy(procs, "fp_direct", direct_cfg,
                                         probe=(HOST, ports["fp_direct"]))
        pairs.append(("failproxy",
                      servers.Target("fp_fo", "failproxy, every request fails over", HOST,
                                     ports["fp_fo"], fo, kind="failproxy"),
                      servers.Target("fp_direct", "failproxy, straight to the backup", HOST,
                                     ports["fp_direct"], direct, kind="failproxy")))
    except (StartError, OSError) as exc:
        log(f"  !! failproxy did not start: {exc}")
        pairs.append(("failproxy", _failed("fp_fo", exc), _failed("fp_direct", exc)))
    if params.with_nginx:
        fo_conf = servers.nginx_proxy_conf(
            wd, "ng_fo", listen=f"{HOST}:{ports['ng_fo']}",
            upstream_servers=[f"unix:{full_path} max_fails=0", f"{backup} backup"])
        direct_conf = servers.nginx_proxy_conf(
            wd, "ng_direct", listen=f"{HOST}:{ports['ng_direct']}", upstream_servers=[backup])
        ng_fo = servers.start_nginx(procs, "ng_fo", fo_conf)
        ng_direct = servers.start_nginx(procs, "ng_direct", direct_conf)
        wait_http(ng_fo, HOST, ports["ng_fo"])
        wait_http(ng_direct, HOST, ports["ng_direct"])
        pairs.append(("nginx",
                      servers.Target("ng_fo", "nginx (max_fails=0), every request fails over",
                                     HOST, ports["ng_fo"], ng_fo, kind="nginx"),
                      servers.Target("ng_direct", "nginx, straight to the backup", HOST,
                                     ports["ng_direct"], ng_direct, kind="nginx")))
    return pairs


def _failed(name: str, exc: Exception) -> servers.Target:
    return servers.Target(name, name, HOST, 0, None, kind="failproxy", error=str(exc)[:2000])


def _failover_events(log_path: Path, offset: int = 0) -> tuple[list[float], int]:
    """`elapsed_ms` of each `failover` event logged after byte `offset`; and the new offset."""
    elapsed: list[float] = []
    try:
        with open(log_path, "rb") as f:
            f.seek(offset)
            for line in f:
                if b'"failover"' in line:
                    with contextlib.suppress(ValueError, KeyError):
                        elapsed.append(float(json.loads(line)["elapsed_ms"]))
            return elapsed, f.tell()
    except OSError:
        return elapsed, offset


def _measure(params: Params, procs: Processes, pairs: list[Pair], script: Path,
             held: int) -> dict[str, Any]:
    live = [(p, fo, d) for p, fo, d in pairs if fo.error is None and d.error is None]
    for _, fo, d in live:  # warm-up: open the pooled connections to the backup
        for t in (fo, d):
            wrk.run(t.url, script=script, duration=1, connections=max(params.concurrencies))
    fo_log = procs.workdir / "fp_fo.log"
    _, offset = _failover_events(fo_log)
    runs = _rounds(params, live, script)
    time.sleep(0.5)  # let the worker flush its log
    elapsed, _ = _failover_events(fo_log, offset)
    elapsed.sort()
    total = sum(x["requests"] for k, v in runs.items() if k[0] == "fp_fo" for x in v)
    return {"params": {"rounds": params.rounds, "duration_s": params.duration,
                       "concurrencies": list(params.concurrencies),
                       "held_connects": held},
            "rows": [_row(proxy, fo, d, c, runs)
                     for proxy, fo, d in pairs for c in params.concurrencies],
            "failproxy_failover_events": len(elapsed),
            "failproxy_requests_measured": total,
            # failproxy's own clock: request head complete -> failover decided (log field)
            "failproxy_decision_ms": {"p50": percentile(elapsed, 50),
                                      "p99": percentile(elapsed, 99)} if elapsed else None}


def _rounds(params: Params, live: list[Pair], script: Path) -> Runs:
    """Interleaved: for each round and concurrency, failover then direct, proxy by proxy."""
    runs: Runs = {}
    for r in range(params.rounds):
        for c in params.concurrencies:
            for _, fo, d in live:
                for t in (fo, d):
                    assert t.proc is not None
                    cpu0 = t.proc.cpu_seconds()
                    res = wrk.run(t.url, script=script, duration=params.duration,
                                  connections=c)
                    cpu = t.proc.cpu_seconds() - cpu0
                    sample = res.as_dict()
                    sample["cpu_us_per_req"] = (cpu * 1e6 / res.requests if res.requests
                                                else 0.0)
                    runs.setdefault((t.name, c), []).append(sample)
                    log(f"  round {r + 1}/{params.rounds} -c{c:<3} {t.name:<10} "
                        f"{res.req_s:>9,.0f} req/s  p50 {res.p50_ms * 1000:.0f} µs  "
                        f"p99 {res.p99_ms * 1000:.0f} µs  errors {res.errors}")
                    time.sleep(0.2)
    return runs


def _row(proxy: str, fo: servers.Target, d: servers.Target, c: int, runs: Runs
         ) -> dict[str, Any]:
    """Medians over the rounds, and failover minus direct."""
    row: dict[str, Any] = {"proxy": proxy, "connections": c, "error": fo.error or d.error}
    if row["error"] is not None:
        return row
    a, b = runs[(fo.name, c)], runs[(d.name, c)]
    for key in ("req_s", "p50_ms", "p90_ms", "p99_ms", "cpu_us_per_req"):
        row[f"failover_{key}"] = median([x[key] for x in a])
        row[f"direct_{key}"] = median([x[key] for x in b])
    for q in ("p50", "p90", "p99"):
        row[f"added_{q}_us"] = round((row[f"failover_{q}_ms"] - row[f"direct_{q}_ms"]) * 1000, 1)
    row["added_cpu_us"] = round(row["failover_cpu_us_per_req"] - row["direct_cpu_us_per_req"], 2)
    row["errors"] = sum(x["errors"] for x in a + b)
    row["rounds_failover"], row["rounds_direct"] = a, b
    return row
