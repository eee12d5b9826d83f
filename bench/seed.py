"""Scenario "seed": the seed document's experiment, with real unicorn.

Three hosts on 127.0.1.1-3. Each runs unicorn (2 workers; a UNIX socket with backlog 5 and a
TCP port with backlog 1024; a Rack app with a fast action and a sleep-based slow one, see
bench/seed_app/) behind a front proxy of its own. An open-loop client spreads requests
round-robin over the three fronts at a fixed rate; the slow actions go to host1 only
("skewed"), or to every host ("capacity": the cluster's workers are fully booked, the case in
which no failover can help). Fronts compared, each on all three hosts at once:

    unix-only            failproxy with only the UNIX socket: no failover, 502 when it is full
    nginx-seed           nginx with the seed's config: `server unix:… fail_timeout=0;` then the
                         peers' TCP ports as `backup` (self last)
    nginx-tuned          the same with `max_fails=0` on the socket (tried on every request)
    failproxy            failproxy defaults: socket first, then the peers as a ring, self last
    failproxy-maxconns   the same with `max_conns = 2` (= unicorn's workers) on the socket
    failproxy-maxqueue   (an extra) the same with `max_queue = 1`: skip the socket as soon as
                         one connection waits in its accept queue (read with sock_diag)

A request counts as overflowed when another host served it (the app's X-Served-By header).
Finally the "no overload" check: wrk (fast action only, 4 connections per host, so that the
UNIX backlog never fills) through each front vs straight to unicorn's TCP ports.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import openloop, servers, wrk
from bench.procs import Proc, Processes, StartError, announce, http_get, wait_http
from bench.stats import median, percentile
from bench.system import free_port, log, which

APP_DIR = Path(__file__).resolve().parent / "seed_app"
HOSTS = (("h1", "127.0.1.1"), ("h2", "127.0.1.2"), ("h3", "127.0.1.3"))
UNICORN_WORKERS = 2

VARIANTS = {
    "unix-only": "UNIX socket only (failproxy, no failover)",
    "nginx-seed": "nginx, the seed's config (fail_timeout=0, peers as backup)",
    "nginx-tuned": "nginx hand-tuned (max_fails=0 on the socket)",
    "failproxy": "failproxy defaults (socket first, ring of peers, self last)",
    "failproxy-maxconns": "failproxy, max_conns = 2 on the socket",
    "failproxy-maxqueue": "failproxy, max_queue = 1 on the socket (extra)",
}


@dataclass(frozen=True)
class Params:
    rounds: int
    duration: float  # seconds of arrivals per open-loop run
    throughput_duration: float  # seconds per wrk run of the no-overload check
    rate: float = 150.0  # requests/s over the three fronts
    slow_ms: int = 100
    skew: tuple[float, float, float] = (0.6, 0.0, 0.0)  # slow share per host, "skewed"
    capacity_share: float = 0.4  # slow share on every host, "capacity"
    timeout: float = 15.0
    wrk_conns_per_host: int = 4
    variants: tuple[str, ...] = tuple(VARIANTS)


def offered_load(params: Params, shares: tuple[float, ...]) -> list[float]:
    """Slow work offered to each host, as a share of its workers' time."""
    per_host = params.rate / len(HOSTS)
    return [round(per_host * s * params.slow_ms / 1000 / UNICORN_WORKERS, 3) for s in shares]


# ---------------------------------------------------------------- processes

def start_unicorns(procs: Processes, port: int) -> tuple[dict[str, str], list[Proc]]:
    """One unicorn per host; returns (host name -> UNIX socket path, the unicorn processes)."""
    exe = which("unicorn")
    assert exe is not None
    socks = {}
    started: list[tuple[Proc, str]] = []
    for name, ip in HOSTS:
        sock = str(procs.workdir / f"{name}.sock")
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(procs.workdir),
               "BENCH_HOST": name, "BENCH_UNIX": sock, "BENCH_TCP": f"{ip}:{port}",
               "BENCH_DIR": str(procs.workdir), "BENCH_WORKERS": str(UNICORN_WORKERS),
               "BENCH_UNIX_BACKLOG": "5", "BENCH_TCP_BACKLOG": "1024"}
        proc = procs.start(f"unicorn-{name}", [exe, "-E", "production", "-c",
                                                str(APP_DIR / "unicorn.conf.rb"),
                                                str(APP_DIR / "config.ru")], env=env)
        started.append((proc, ip))
        socks[name] = sock
    for proc, ip in started:
        wait_http(proc, ip, port, "/fast", timeout=30)
        announce(proc, f"unicorn {UNICORN_WORKERS} workers on {ip}:{port} and a UNIX socket")
    return socks, [p for p, _ in started]


def _front_configs(variant: str, name: str, ip: str, front_port: int, uport: str,
                   sock: str, workdir: Path) -> tuple[str, Any]:
    """('nginx', conf text) or ('failproxy', config dict) for one host's front."""
    tag = f"{variant}-{name}"
    ring = [f"{hip}:{uport}" for _, hip in HOSTS]
    if variant.startswith("nginx"):
        # the seed lists the peers, then this host itself, as backups
        own = f"{ip}:{uport}"
        peers = [a for a in ring if a != own] + [own]
        first = f"unix:{sock} fail_timeout=0" + (" max_fails=0" if variant == "nginx-tuned"
                                                 else "")
        conf = servers.nginx_proxy_conf(workdir, tag, listen=f"{ip}:{front_port}",
                                        upstream_servers=[first] + [f"{b} backup"
                                                                    for b in peers],
                                        keepalive=0)
        return "nginx", conf
    primary: dict[str, Any] = {"address": f"unix:{sock}"}
    if variant == "failproxy-maxconns":
        primary["max_conns"] = UNICORN_WORKERS
    elif variant == "failproxy-maxqueue":
        primary["max_queue"] = 1
    backups = [] if variant == "unix-only" else [{"address": a, "backup": True} for a in ring]
    cfg = servers.failproxy_config(
        listen=[f"{ip}:{front_port}"], servers=[primary, *backups], workers=1,
        log_file=str(workdir / f"{tag}.log"),
        self_address="" if variant == "unix-only" else f"{ip}:{uport}")
    return "failproxy", cfg


def start_fronts(procs: Processes, variant: str, front_port: int, uport: int,
                 socks: dict[str, str]) -> list[Proc]:
    started = []
    for name, ip in HOSTS:
        kind, conf = _front_configs(variant, name, ip, front_port, str(uport), socks[name],
                                    procs.workdir)
        tag = f"{variant}-{name}"
        if kind == "nginx":
            proc = servers.start_nginx(procs, tag, conf)
            started.append(proc)
            wait_http(proc, ip, front_port, "/fast")
            announce(proc, f"nginx front on {ip}:{front_port}")
        else:
            started.append(servers.start_failproxy(procs, tag, conf, probe=(ip, front_port)))
    return started


def drain(uport: int, limit: float = 30.0) -> float:
    """Wait until every unicorn answers a fast request quickly (its queues are empty)."""
    t0 = time.monotonic()
    for _, ip in HOSTS:
        while time.monotonic() - t0 < limit:
            s = time.monotonic()
            try:
                http_get(ip, uport, "/fast", timeout=10)
            except OSError:
                pass
            if time.monotonic() - s < 0.02:
                break
            time.sleep(0.1)
    return time.monotonic() - t0


# ---------------------------------------------------------------- the experiment

def run(params: Params, procs: Processes) -> dict[str, Any]:
    ips = [ip for _, ip in HOSTS]
    uport = free_port(*ips)
    socks, unicorns = start_unicorns(procs, uport)
    ports: dict[str, int] = {}
    fronts: dict[str, list[Proc]] = {"direct": []}
    errors: dict[str, str] = {}
    for variant in params.variants:
        ports[variant] = free_port(*ips)
        try:
            fronts[variant] = start_fronts(procs, variant, ports[variant], uport, socks)
        except (StartError, OSError) as exc:
            log(f"  !! {variant} fronts did not start: {exc}")
            errors[variant] = str(exc)[:2000]
    live = [v for v in params.variants if v not in errors]

    loads = {"skewed": params.skew, "capacity": (params.capacity_share,) * len(HOSTS)}
    raw = _open_loop(params, loads, ports, live, uport)
    tput = _throughput(params, procs.workdir, uport, ports, live, fronts, unicorns)
    scenarios = {}
    for scenario, shares in loads.items():
        scenarios[scenario] = {
            "slow_share_per_host": list(shares),
            "offered_slow_load_per_host": offered_load(params, shares),
            "variants": {v: _variant_result(v, raw[scenario].get(v, []), errors.get(v))
                         for v in params.variants},
        }
    return {"params": {"rounds": params.rounds, "duration_s": params.duration,
                       "rate": params.rate, "slow_ms": params.slow_ms,
                       "timeout_s": params.timeout, "unicorn_workers": UNICORN_WORKERS,
                       "hosts": ips, "throughput_duration_s": params.throughput_duration,
                       "wrk_conns_per_host": params.wrk_conns_per_host},
            "scenarios": scenarios, "no_overload": tput}


def _open_loop(params: Params, loads: dict[str, tuple[float, ...]], ports: dict[str, int],
               live: list[str], uport: int) -> dict[str, dict[str, list[openloop.LoadResult]]]:
    """Every (load, front) pair once per round, interleaved; unicorn drained between runs."""
    raw: dict[str, dict[str, list[openloop.LoadResult]]] = {s: {} for s in loads}
    for r in range(params.rounds):
        for scenario, shares in loads.items():
            for variant in live:
                clients = [openloop.Front(name, ip, ports[variant], share)
                           for (name, ip), share in zip(HOSTS, shares, strict=True)]
                res = openloop.run(clients, rate=params.rate, duration=params.duration,
                                   slow_ms=params.slow_ms, timeout=params.timeout,
                                   seed=1000 * r + 1)
                raw[scenario].setdefault(variant, []).append(res)
                s = summarise([res])
                log(f"  round {r + 1}/{params.rounds} {scenario:<8} {variant:<19} "
                    f"ok {s['ok']}/{s['sent']}  p50 {s['p50_ms']:.1f} p99 {s['p99_ms']:.1f} "
                    f"max {s['max_ms']:.1f} ms  overflowed {s['overflow_share']:.0%}  "
                    f"errors {s['errors']}")
                waited = drain(uport)
                if waited > 1:
                    log(f"    drained unicorn queues in {waited:.1f} s")
    return raw


def _variant_result(variant: str, results: list[openloop.LoadResult], error: str | None
                    ) -> dict[str, Any]:
    out: dict[str, Any] = {"label": VARIANTS[variant], "error": error}
    if results:
        out.update(summarise(results))
    out["rounds"] = [summarise([x]) for x in results]
    out["latencies_ms"] = sorted(round(o.latency_ms, 3) for x in results for o in x.outcomes
                                 if o.status == 200)
    return out


def summarise(results: list[openloop.LoadResult]) -> dict[str, Any]:
    merged = openloop.LoadResult()
    for r in results:
        merged.outcomes += r.outcomes
        merged.sent += r.sent
        merged.skipped += r.skipped
    out = merged.summary()
    ok = [o for o in merged.outcomes if o.status == 200]
    lat = sorted(o.latency_ms for o in ok)
    fast = sorted(o.latency_ms for o in ok if not o.slow)
    slow = sorted(o.latency_ms for o in ok if o.slow)
    for q in (50, 90, 99):
        out[f"p{q}_ms"] = percentile(lat, q)
    out["max_ms"] = lat[-1] if lat else float("nan")
    out["fast_p50_ms"], out["fast_p99_ms"] = percentile(fast, 50), percentile(fast, 99)
    out["slow_p50_ms"], out["slow_p99_ms"] = percentile(slow, 50), percentile(slow, 99)
    out["overflow_share"] = out["overflowed"] / out["ok"] if out["ok"] else 0.0
    return out


def _throughput(params: Params, workdir: Path, uport: int, ports: dict[str, int],
                live: list[str], fronts: dict[str, list[Proc]], unicorns: list[Proc]
                ) -> dict[str, Any]:
    """No overload: closed-loop wrk, fast action, through each front vs unicorn's TCP port.
    CPU µs per request is measured for the three fronts together and for the unicorns."""
    targets = [("direct", uport)] + [(v, ports[v]) for v in live]
    runs: dict[str, list[dict[str, Any]]] = {}
    conns = params.wrk_conns_per_host * len(HOSTS)
    for r in range(params.rounds):
        for name, port in targets:
            script = wrk.write_script(workdir / f"wrk-{name}.lua",
                                      [(ip, port) for _, ip in HOSTS])
            front_cpu0 = sum(p.cpu_seconds() for p in fronts[name])
            app_cpu0 = sum(p.cpu_seconds() for p in unicorns)
            res = wrk.run(f"http://{HOSTS[0][1]}:{port}/fast", script=script,
                          duration=params.throughput_duration, connections=conns,
                          threads=len(HOSTS))
            front_cpu = sum(p.cpu_seconds() for p in fronts[name]) - front_cpu0
            app_cpu = sum(p.cpu_seconds() for p in unicorns) - app_cpu0
            row = res.as_dict()
            row["front_cpu_us_per_req"] = front_cpu * 1e6 / res.requests if res.requests else 0
            row["unicorn_cpu_us_per_req"] = app_cpu * 1e6 / res.requests if res.requests else 0
            runs.setdefault(name, []).append(row)
            log(f"  round {r + 1}/{params.rounds} no-overload {name:<19} "
                f"{res.req_s:>8,.0f} req/s  p50 {res.p50_ms:.2f} ms  p99 {res.p99_ms:.2f} ms"
                f"  CPU µs/req fronts {row['front_cpu_us_per_req']:.0f} "
                f"unicorns {row['unicorn_cpu_us_per_req']:.0f}  errors {res.errors}")
            time.sleep(0.3)
    out = {}
    direct = median([x["req_s"] for x in runs["direct"]])
    for name, rs in runs.items():
        req_s = median([x["req_s"] for x in rs])
        out[name] = {"label": "unicorn TCP ports directly" if name == "direct"
                     else VARIANTS[name],
                     "req_s": req_s, "p50_ms": median([x["p50_ms"] for x in rs]),
                     "p99_ms": median([x["p99_ms"] for x in rs]),
                     "front_cpu_us_per_req": median([x["front_cpu_us_per_req"] for x in rs]),
                     "unicorn_cpu_us_per_req": median([x["unicorn_cpu_us_per_req"]
                                                       for x in rs]),
                     "errors": sum(x["errors"] for x in rs),
                     "ratio_direct": req_s / direct if direct else None, "rounds": rs}
    return {"wrk": f"wrk -t{len(HOSTS)} -c{conns} -d{params.throughput_duration:g}s "
                   "(one thread per host)", "targets": out}
