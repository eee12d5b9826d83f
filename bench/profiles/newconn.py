"""The new-connection path alone: one box, a new upstream connection per request.

unicorn (2 workers, bench/targets/seed_app) on a UNIX socket and a TCP port; wrk -t1 -c4, fast
requests, through failproxy (1 worker, access log on, the UNIX socket only), through nginx (1
worker, the seed's `server unix:... fail_timeout=0`, no upstream keepalive, access log on) and
straight to unicorn's TCP port; `--baseline TREE` adds the failproxy of another checkout. unicorn
closes every connection, so each request costs the front a socket(), connect(), close() and a new fd
in the event loop: the path every unicorn user runs (issue 8, target 2), measured without the
seed cluster's three boxes and three fronts sharing two cores. Rounds are interleaved; medians.
`--bare` adds failproxy-bare: this tree with the four headers failproxy adds upstream by default
turned off (X-Forwarded-For, X-Forwarded-Proto, Via, X-Request-Id; nginx-seed sends none), to
see what they cost unicorn (its CPU a request, beside the front's). `--seed-config` adds
failproxy-seedcfg: this tree with the seed bench's upstream section (failproxy's defaults, `self`,
and three TCP backups, never needed here), so that the overflow policy's bookkeeping is paid as
in the seed check.

    python -m bench.profiles.newconn [--rounds 3] [--seconds 5] [--baseline /path/to/tree]
                                     [--bare] [--seed-config] [--perf failproxy]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from bench.instruments import wrk
from bench.instruments.procs import Proc, Processes, children, wait_http
from bench.instruments.stats import median, round_order
from bench.instruments.system import free_port, which
from bench.profiles import perfrun
from bench.scenarios.seed import APP_DIR
from bench.targets import servers

HOST = "127.0.1.1"
# failproxy-bare's [headers]: none of the four headers failproxy adds upstream by default.
BARE = {"x_forwarded_for": "off", "x_forwarded_proto": False, "via": False, "request_id": ""}


def seed_upstream(sock: str, uport: int) -> dict[str, Any]:
    """The seed bench's failproxy upstream section on one box (bench/scenarios/seed.py's
    `_front_config`): the defaults, this box's TCP port as `self`, the UNIX socket first, then
    the ring's TCP ports as backups (the two peers' on 127.0.0.2-3, where nothing listens: a
    run with no overload never needs them)."""
    own = f"{HOST}:{uport}"
    return {"self": own, "server": [
        {"address": f"unix:{sock}"},
        *({"address": a, "backup": True}
          for a in (own, f"127.0.0.2:{uport}", f"127.0.0.3:{uport}"))]}


def start_unicorn(procs: Processes) -> tuple[str, int, Proc]:
    """unicorn with the seed's app and layout, 2 workers: (UNIX socket path, TCP port, proc)."""
    exe = which("unicorn")
    assert exe is not None, "unicorn is not installed (Debian package unicorn)"
    tmp = str(procs.workdir)
    sock = f"{tmp}/app.sock"
    uport = free_port(HOST)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": tmp, "BENCH_HOST": "h1",
           "BENCH_UNIX": sock, "BENCH_TCP": f"{HOST}:{uport}", "BENCH_DIR": tmp,
           "BENCH_WORKERS": "2", "BENCH_UNIX_BACKLOG": "5", "BENCH_TCP_BACKLOG": "1024"}
    unicorn = procs.start("unicorn", [exe, "-E", "production", "-c",
                                      str(APP_DIR / "unicorn.conf.rb"),
                                      str(APP_DIR / "config.ru")], env=env)
    wait_http(unicorn, HOST, uport, "/fast", timeout=30)
    return sock, uport, unicorn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--baseline", type=Path, help="another checkout's failproxy, too")
    parser.add_argument("--bare", action="store_true",
                        help="also failproxy-bare: no forwarded headers (the module doc)")
    parser.add_argument("--seed-config", action="store_true",
                        help="also failproxy-seedcfg: the seed bench's upstream section")
    parser.add_argument("--perf", metavar="TARGET",
                        help="perf record the worker of TARGET (failproxy, failproxy-base, "
                        "failproxy-bare, failproxy-seedcfg, nginx) in its first round, and "
                        "print where its samples went")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-newconn-") as tmp:
        procs = Processes(Path(tmp))
        try:
            sock, uport, unicorn = start_unicorn(procs)
            targets: dict[str, tuple[int, Proc | None]] = {"direct": (uport, None)}
            trees = {"failproxy": None, **({"failproxy-base": args.baseline}
                                           if args.baseline else {}),
                     **({"failproxy-bare": None} if args.bare else {}),
                     **({"failproxy-seedcfg": None} if args.seed_config else {})}
            for name, tree in trees.items():
                port = free_port(HOST)
                cfg = servers.failproxy_config(
                    listen=[f"{HOST}:{port}"], servers=[{"address": f"unix:{sock}"}], workers=1,
                    log_file=f"{tmp}/{name}.log", keepalive=0)
                if name == "failproxy-bare":
                    cfg["headers"] = BARE
                if name == "failproxy-seedcfg":
                    cfg["upstream"] = seed_upstream(sock, uport)
                targets[name] = (port, servers.start_failproxy(procs, name, cfg,
                                                               probe=(HOST, port), tree=tree))
            port = free_port(HOST)
            conf = servers.nginx_proxy_conf(procs.workdir, "nginx", listen=f"{HOST}:{port}",
                                            upstream_servers=[f"unix:{sock} fail_timeout=0"],
                                            keepalive=0)
            nginx = servers.start_nginx(procs, "nginx", conf)
            wait_http(nginx, HOST, port, "/fast")
            targets["nginx"] = (port, nginx)
            script = wrk.write_script(Path(tmp) / "done.lua")
            perf_data = Path(tmp) / "perf.data"
            # req/s, front CPU, its user and system parts, unicorn CPU (µs a request)
            rows: dict[str, list[tuple[float, float, float, float, float]]] = {
                n: [] for n in targets}
            names = list(targets)
            for r in range(args.rounds):
                for name in round_order(names, r):
                    port, proc = targets[name]
                    url = f"http://{HOST}:{port}/fast"
                    wrk.run(url, script=script, duration=1.0, connections=4)
                    u0, s0 = proc.cpu_split() if proc else (0.0, 0.0)
                    a0 = unicorn.cpu_seconds()
                    rec = None
                    if name == args.perf and r == 0 and proc is not None:
                        rec = perfrun.record(children(proc.pid)[0], args.seconds - 1, perf_data)
                    res = wrk.run(url, script=script, duration=args.seconds, connections=4)
                    if rec is not None:
                        rec.wait()
                    u1, s1 = proc.cpu_split() if proc else (0.0, 0.0)
                    user, system = u1 - u0, s1 - s0
                    front = user + system
                    app = unicorn.cpu_seconds() - a0
                    n = max(1, res.requests)
                    assert res.errors == 0, f"{name}: {res.errors} errors"
                    rows[name].append((res.req_s, front * 1e6 / n, user * 1e6 / n,
                                       system * 1e6 / n, app * 1e6 / n))
                    print(f"round {r + 1} {name:<15} {res.req_s:>8,.0f} req/s  front "
                          f"{front * 1e6 / n:5.1f} µs/req (user {user * 1e6 / n:.1f}, system "
                          f"{system * 1e6 / n:.1f})  unicorn {app * 1e6 / n:5.1f} µs/req",
                          flush=True)
            direct = median([x[0] for x in rows["direct"]])
            print(f"\nwrk -t1 -c4 -d{args.seconds:g}s, {args.rounds} rounds, medians\n")
            print("| target | req/s | x direct | front CPU µs/req | user | system "
                  "| unicorn CPU µs/req |")
            print("|---|---|---|---|---|---|---|")
            for name, rs in rows.items():
                req_s = median([x[0] for x in rs])
                cells = " | ".join("-" if name == "direct" else f"{median([x[i] for x in rs]):.1f}"
                                   for i in (1, 2, 3))
                print(f"| {name} | {req_s:,.0f} | {req_s / direct:.2f}x | {cells} | "
                      f"{median([x[4] for x in rs]):.1f} |")
            if args.perf:
                print(f"\nperf record -g on the {args.perf} worker, round 1 (under perf):")
                perfrun.report(perf_data, 25)
        finally:
            procs.close()


if __name__ == "__main__":
    main()
