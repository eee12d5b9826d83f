"""Scenario "seed": the seed document's experiment with real unicorn, as issue 7 measures it.

Three hosts on 127.0.1.1-3. Each runs unicorn (2 workers; a UNIX socket with backlog 5 and a
TCP port with backlog 1024; a Rack app with a fast action and a sleep-based slow one, see
bench/targets/seed_app/) behind a front proxy of its own, the same kind of front on all three hosts.
An open-loop client (bench/instruments/openloop.py) sends each host's front a Poisson stream of
requests; a *mix* (the table MIXES below) says how many, how slow the slow action is and what share
of each front's requests ask for it.

Paired rounds: round k of a mix uses the schedule drawn from seed k (the same arrival times and
the same request classes for every front); within a round every mix runs once with every front,
interleaved (the order of the fronts rotates, and reverses every other round:
stats.round_order); each run gets freshly started fronts and unicorn queues drained before
it. Per mix the report gives, per front, fast-action and slow-action p50/p99, overall p99,
errors, the share of requests that left their box (X-Served-By), where each box's front sent
its requests (failproxy's `request` events' `upstream`, nginx's `$upstream_addr`), and the
paired ratios to nginx-seed (median and range over rounds) of fast p99 and overall p99.

Fronts (FRONTS; `--fronts` picks them, DEFAULT_FRONTS run by default):

    nginx-seed           nginx with the seed's config: `server unix:… fail_timeout=0;` then the
                         peers' TCP ports as `backup` (self last)
    failproxy            failproxy from this tree, defaults (nothing tuned): the code under test
    failproxy-old        the same config run from another source tree (`--baseline`: a path, or
                         a git revision that is extracted with `git archive`; default fc71f7e,
                         the old defaults)
    unix-only            failproxy with only the UNIX socket: no failover, 502 when it is full
    nginx-tuned          nginx-seed with `max_fails=0` on the socket (tried on every request)
    failproxy-maxconns   failproxy with `max_conns = 2` (= unicorn's workers) on the socket
    failproxy-maxqueue   failproxy with `max_queue = 1` on the socket
    failproxy-ring       failproxy from this tree with `overflow = "ring"` (the old policy)

Finally the "no overload" throughput check: wrk (fast action only, 4 connections per host, so
that the UNIX backlog never fills) through each front vs straight to unicorn's TCP ports, with
the CPU µs per request of the fronts and of the unicorns.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

from bench.instruments import openloop, wrk
from bench.instruments.procs import (
    Proc,
    Processes,
    StartError,
    announce,
    cpu_split_of,
    http_get,
    wait_http,
)
from bench.instruments.stats import median, percentile, round_order
from bench.instruments.system import free_port, log, which
from bench.targets import servers

APP_DIR = Path(__file__).resolve().parents[1] / "targets" / "seed_app"
REPO = Path(__file__).resolve().parents[2]
HOSTS = (("h1", "127.0.1.1"), ("h2", "127.0.1.2"), ("h3", "127.0.1.3"))
UNICORN_WORKERS = 2
UNIX_BACKLOG = 5
FAST_MS_ESTIMATE = 0.5  # worker time of the fast action (unicorn accept + Rack + write), rough
REFERENCE = "nginx-seed"  # the paired ratios are taken against this front
BASELINE_DEFAULT = "fc71f7e"  # main before issue 7: the old defaults
WARMUP_REQUESTS = 10  # per host, through a freshly started front, before its measured run


# ---------------------------------------------------------------- the mixes

@dataclass(frozen=True)
class Mix:
    name: str
    kind: str  # skew | capacity | nooverload | light | smoke: which goal of issue 7 it judges
    rate: float  # requests/s over the three fronts (rate/3 per front, Poisson)
    slow_ms: int
    shares: tuple[float, float, float]  # slow share of each front's requests
    why: str
    # unicorn workers per host; hosts unlike each other (issue 20: peers with more room than
    # the busy box) restart the unicorns for the mix
    workers: tuple[int, int, int] = (UNICORN_WORKERS,) * 3

    def offered(self) -> list[float]:
        """Work offered to each host, as a share of its workers' time (slow + fast)."""
        per_host = self.rate / len(HOSTS)
        return [per_host * (s * self.slow_ms + (1 - s) * FAST_MS_ESTIMATE) / 1000
                / w for s, w in zip(self.shares, self.workers, strict=True)]

    def offered_slow(self) -> list[float]:
        per_host = self.rate / len(HOSTS)
        return [per_host * s * self.slow_ms / 1000 / w
                for s, w in zip(self.shares, self.workers, strict=True)]

    def cluster_load(self) -> float:
        per_host = self.rate / len(HOSTS)
        work = sum(per_host * (s * self.slow_ms + (1 - s) * FAST_MS_ESTIMATE) / 1000
                   for s in self.shares)
        return work / sum(self.workers)

    def equal_peers(self) -> tuple[int, tuple[int, int]] | None:
        """(skewed host, its two peers) when one host is skewed and its peers are alike."""
        top = max(self.shares)
        skewed = [i for i, s in enumerate(self.shares) if s == top]
        if len(skewed) != 1 or top == 0:
            return None
        peers = tuple(i for i in range(len(HOSTS)) if i != skewed[0])
        a, b = peers
        return (skewed[0], (a, b)) if self.shares[a] == self.shares[b] else None


MIXES = {m.name: m for m in (
    Mix("skew100", "skew", 150, 100, (0.6, 0.0, 0.0),
        "the seed's experiment and issue 7's first measurement: short slow actions, a large "
        "slow share on host1 (150 % of its workers), hosts 2-3 idle (cluster ~50 %)"),
    Mix("skew1s-10", "skew", 90, 1000, (0.1, 0.0, 0.0),
        "long slow actions, a small share (the independent run of issue 7): 3 slow/s on host1 = "
        "150 % of its workers, cluster ~50 %; one slow request holds a worker for a second"),
    Mix("skew1s-30", "skew", 30, 1000, (0.3, 0.0, 0.0),
        "long slow actions, a larger share at the same 150 % on host1 (cluster ~50 %): fewer "
        "fast requests per slow one, so each misrouted fast request weighs more"),
    Mix("skew2of3", "skew", 150, 100, (0.45, 0.45, 0.0),
        "two of three boxes overloaded (112 % each), one idle: the overflow of both must find "
        "host3 (cluster ~75 %); host1's peers are not alike, so goal 2 does not apply"),
    Mix("capacity", "capacity", 150, 100, (0.44, 0.44, 0.44),
        "every box offered 110 % of its workers: the cluster is 10 % short, no failover can "
        "help; it must not make fast requests slower or send the cluster's traffic cross-host"),
    Mix("capacity1s", "capacity", 75, 1000, (0.1, 0.1, 0.1),
        "at capacity, route-shaped (issue 20): every front gets skew1s-10's busy-front mix at "
        "25 req/s, 125 % of its workers; fast requests must keep their latency while slow "
        "ones wait"),
    Mix("bigpeers", "skew", 90, 1000, (0.1, 0.0, 0.0),
        "peers unlike the busy box (issue 20): host1 has 1 worker and 3 slow/s of 1 s (300 % "
        "of it), hosts 2-3 have 8 workers each and light fast traffic; every request must be "
        "answered, the overflow split evenly, none stranded waiting for host1's worker",
        workers=(1, 8, 8)),
    Mix("nooverload", "nooverload", 300, 100, (0.0, 0.0, 0.0),
        "fast requests only (~3 % of the workers' time): nothing should leave its box"),
    Mix("light", "light", 150, 100, (0.2, 0.2, 0.2),
        "(extra) 50 % load on every box with 100 ms actions: no box is overloaded on average, "
        "but both workers are often busy at once; how much leaves the box then"),
    Mix("smoke", "smoke", 150, 100, (0.6, 0.0, 0.0),
        "(tests) skew100 in miniature, for the smoke test"),
)}
DEFAULT_MIXES = ("skew100", "skew1s-10", "skew1s-30", "skew2of3", "capacity", "capacity1s",
                 "nooverload")
QUICK_MIXES = ("skew100", "skew1s-10")


# ---------------------------------------------------------------- the fronts

@dataclass(frozen=True)
class FrontKind:
    label: str
    kind: str  # nginx | failproxy
    primary: dict[str, Any] = field(default_factory=dict)  # extra keys of the UNIX server
    backups: bool = True
    baseline: bool = False  # run from the --baseline source tree
    max_fails0: bool = False  # nginx: max_fails=0 on the socket
    upstream: dict[str, Any] = field(default_factory=dict)  # extra [upstream] keys


FRONTS = {
    "nginx-seed": FrontKind("nginx, the seed's config (fail_timeout=0, peers as backup)",
                            "nginx"),
    "failproxy-old": FrontKind("failproxy, old defaults (--baseline tree)", "failproxy",
                               baseline=True),
    "failproxy": FrontKind("failproxy defaults (this tree, nothing tuned)", "failproxy"),
    "unix-only": FrontKind("UNIX socket only (failproxy, no failover)", "failproxy",
                           backups=False),
    "nginx-tuned": FrontKind("nginx hand-tuned (max_fails=0 on the socket)", "nginx",
                             max_fails0=True),
    "failproxy-maxconns": FrontKind("failproxy, max_conns = 2 on the socket", "failproxy",
                                    primary={"max_conns": UNICORN_WORKERS}),
    "failproxy-ring": FrontKind("failproxy, overflow = \"ring\" (the old policy)", "failproxy",
                                upstream={"overflow": "ring"}),
    "failproxy-maxqueue": FrontKind("failproxy, max_queue = 1 on the socket", "failproxy",
                                    primary={"max_queue": 1}),
}
DEFAULT_FRONTS = ("nginx-seed", "failproxy-old", "failproxy")


@dataclass(frozen=True)
class Params:
    rounds: int
    duration: float  # seconds of arrivals per open-loop run
    throughput_duration: float  # seconds per wrk run of the no-overload check; 0 = skip it
    mixes: tuple[str, ...] = DEFAULT_MIXES
    fronts: tuple[str, ...] = DEFAULT_FRONTS
    baseline: str = BASELINE_DEFAULT  # a source tree, or a git revision of this repository
    timeout: float = 15.0  # per request
    wrk_conns_per_host: int = 4
    front_workers: int = 1  # worker processes per front (nginx and failproxy alike)

    def check(self) -> None:
        bad = [m for m in self.mixes if m not in MIXES]
        bad += [f for f in self.fronts if f not in FRONTS]
        if bad:
            raise ValueError(f"unknown mix/front {bad}; mixes: {', '.join(MIXES)}; "
                             f"fronts: {', '.join(FRONTS)}")
        if self.rounds < 1 or self.duration <= 0 or self.wrk_conns_per_host < 1:
            raise ValueError("rounds >= 1, duration > 0 and wrk connections >= 1 please")


def with_options(p: Params, *, mixes: str | None = None, fronts: str | None = None,
                 rounds: int | None = None, duration: float | None = None,
                 throughput_duration: float | None = None,
                 baseline: str | None = None, wrk_conns: int | None = None) -> Params:
    """The command line's overrides (runner.py): comma-separated names, numbers."""
    changes: dict[str, Any] = {}
    if mixes:
        changes["mixes"] = tuple(x.strip() for x in mixes.split(",") if x.strip())
    if fronts:
        changes["fronts"] = tuple(x.strip() for x in fronts.split(",") if x.strip())
    for key, value in (("rounds", rounds), ("duration", duration),
                       ("throughput_duration", throughput_duration), ("baseline", baseline),
                       ("wrk_conns_per_host", wrk_conns)):
        if value is not None:
            changes[key] = value
    out = dataclasses.replace(p, **changes)
    out.check()
    return out


# ---------------------------------------------------------------- planning

def estimate_seconds(p: Params) -> float:
    """Rough wall time: each run is its arrivals, the tail of its last requests (a queue that
    grew at capacity drains), front start/stop and a drain; then the wrk check."""
    total = 15.0  # unicorns, baseline
    for name in p.mixes:
        mix = MIXES[name]
        backlog = max(0.0, max(mix.offered()) - 1) * p.duration
        tail = min(p.timeout, backlog + 2 * mix.slow_ms / 1000)
        total += p.rounds * len(p.fronts) * (p.duration + tail + 2.5)
    if p.throughput_duration > 0:
        total += 10 + p.rounds * (len(p.fronts) + 1) * (max(1, round(p.throughput_duration))
                                                         + 2.5)
    return total


def describe(p: Params) -> list[str]:
    lines = []
    for name in p.mixes:
        mix = MIXES[name]
        loads = ", ".join(f"{x:.0%}" for x in mix.offered())
        lines.append(f"  mix {name:<11} {mix.rate:g} req/s, slow {mix.slow_ms} ms, shares "
                     f"{'/'.join(f'{s:.0%}' for s in mix.shares)}: offered per host {loads} "
                     f"of {'/'.join(map(str, mix.workers))} workers (cluster "
                     f"{mix.cluster_load():.0%})")
    est = estimate_seconds(p)
    lines.append(f"  {len(p.mixes)} mixes x {len(p.fronts)} fronts x {p.rounds} rounds x "
                 f"{p.duration:g} s: estimated {est / 60:.0f} min ({est / 3600:.1f} h)")
    return lines


def schedule(mix: Mix, rnd: int, duration: float) -> list[openloop.Arrival]:
    """Round `rnd`'s arrivals for `mix`: seed = rnd, the same for every front."""
    return openloop.plan(mix.shares, rate=mix.rate, duration=duration, key=mix.name,
                         seed=rnd)


# ---------------------------------------------------------------- processes

def start_unicorns(procs: Processes, port: int,
                   workers: tuple[int, int, int] = (UNICORN_WORKERS,) * 3,
                   ) -> tuple[dict[str, str], list[Proc]]:
    """One unicorn per host; returns (host name -> UNIX socket path, the unicorn processes)."""
    exe = which("unicorn")
    assert exe is not None
    socks = {}
    started: list[tuple[Proc, str, int]] = []
    for (name, ip), n in zip(HOSTS, workers, strict=True):
        sock = str(procs.workdir / f"{name}.sock")
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(procs.workdir),
               "BENCH_HOST": name, "BENCH_UNIX": sock, "BENCH_TCP": f"{ip}:{port}",
               "BENCH_DIR": str(procs.workdir), "BENCH_WORKERS": str(n),
               "BENCH_UNIX_BACKLOG": str(UNIX_BACKLOG), "BENCH_TCP_BACKLOG": "1024"}
        proc = procs.start(f"unicorn-{name}", [exe, "-E", "production", "-c",
                                                str(APP_DIR / "unicorn.conf.rb"),
                                                str(APP_DIR / "config.ru")], env=env)
        started.append((proc, ip, n))
        socks[name] = sock
    for proc, ip, n in started:
        wait_http(proc, ip, port, "/fast", timeout=30)
        announce(proc, f"unicorn {n} workers on {ip}:{port} and a UNIX socket")
    return socks, [p for p, _, _ in started]


def baseline_tree(spec: str, workdir: Path) -> tuple[Path, dict[str, str]]:
    """The source tree failproxy-old runs from: `spec` itself when it is a directory holding a
    failproxy package, else the git revision `spec` of this repository, extracted."""
    path = Path(spec)
    if path.is_dir():
        if not (path / "failproxy" / "__init__.py").exists():
            raise StartError(f"--baseline {spec}: no failproxy/__init__.py there")
        head = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"],
                              capture_output=True, text=True)
        commit = head.stdout.strip() if head.returncode == 0 else ""
        return path.resolve(), {"spec": spec, "path": str(path.resolve()), "commit": commit}
    rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", f"{spec}^{{commit}}"],
                         capture_output=True, text=True)
    if rev.returncode != 0:
        raise StartError(f"--baseline {spec}: neither a directory nor a git revision of "
                         f"{REPO}: {rev.stderr.strip()}")
    commit = rev.stdout.strip()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", commit,
                              "failproxy"], capture_output=True)
    if archive.returncode != 0:
        raise StartError(f"git archive {commit}: {archive.stderr.decode(errors='replace')}")
    dest = workdir / f"baseline-{commit[:12]}"
    with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
        tar.extractall(dest, filter="data")
    return dest, {"spec": spec, "path": f"git archive {commit}", "commit": commit}


def front_env(tree: Path | None) -> dict[str, str]:
    """failproxy's environment: this tree's code, or `tree`'s only (nothing of this one)."""
    if tree is None:
        return servers.python_env()
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def check_import(env: dict[str, str], tree: Path, workdir: Path) -> str:
    """Where `python -m failproxy` would load failproxy from with `env`; must be `tree`."""
    out = subprocess.run([sys.executable, "-c", "import failproxy; print(failproxy.__file__)"],
                         env=env, cwd=str(workdir), capture_output=True, text=True, timeout=30)
    where = out.stdout.strip()
    if out.returncode != 0 or not Path(where).resolve().is_relative_to(tree.resolve()):
        raise StartError(f"failproxy would load from {where or out.stderr.strip()!r}, "
                         f"not from {tree}")
    return where


NGINX_LOG_FORMAT = "  log_format bench '$http_x_request_id $status $upstream_addr';\n"


def _front_config(front: str, name: str, ip: str, front_port: int, uport: int, sock: str,
                  workdir: Path, tag: str, workers: int) -> tuple[str, Any, Path]:
    """('nginx', conf text, log) or ('failproxy', config dict, log) for one host's front."""
    fk = FRONTS[front]
    ring = [f"{hip}:{uport}" for _, hip in HOSTS]
    own = f"{ip}:{uport}"
    if fk.kind == "nginx":
        # the seed lists the peers, then this host itself, as backups
        peers = [a for a in ring if a != own] + [own]
        first = f"unix:{sock} fail_timeout=0" + (" max_fails=0" if fk.max_fails0 else "")
        conf = servers.nginx_proxy_conf(workdir, tag, listen=f"{ip}:{front_port}",
                                        upstream_servers=[first] + [f"{b} backup"
                                                                    for b in peers],
                                        keepalive=0, workers=workers)
        logfile = workdir / f"{tag}.access.log"
        plain = f"  access_log {logfile};\n"
        assert plain in conf, "nginx_proxy_conf's access_log line changed"
        conf = conf.replace(plain, NGINX_LOG_FORMAT + f"  access_log {logfile} bench;\n")
        return "nginx", conf, logfile
    primary: dict[str, Any] = {"address": f"unix:{sock}", **fk.primary}
    backups = [{"address": a, "backup": True} for a in ring] if fk.backups else []
    logfile = workdir / f"{tag}.log"
    # only what the bench must set: listeners, 1 worker (as nginx), the servers, self, the log
    upstream: dict[str, Any] = {"self": own} if fk.backups else {}
    upstream.update(fk.upstream)
    upstream["server"] = [primary, *backups]
    cfg = {"server": {"listen": [f"{ip}:{front_port}"], "workers": workers},
           "upstream": upstream, "log": {"file": str(logfile)}}
    return "failproxy", cfg, logfile


@dataclass
class Running:
    procs: list[Proc]
    logs: dict[str, Path]  # host name -> the front's log file


def start_fronts(procs: Processes, front: str, front_port: int, uport: int,
                 socks: dict[str, str], tag: str, env: dict[str, str] | None,
                 workers: int) -> Running:
    """The front `front` on every host, started together, each answering before we go on."""
    started: list[tuple[Proc, str]] = []
    logs = {}
    try:
        for name, ip in HOSTS:
            kind, conf, logfile = _front_config(front, name, ip, front_port, uport,
                                                socks[name], procs.workdir, f"{tag}-{name}",
                                                workers)
            logs[name] = logfile
            if kind == "nginx":
                proc = servers.start_nginx(procs, f"{tag}-{name}", conf)
            else:
                path = procs.workdir / f"{tag}-{name}.toml"
                path.write_text(servers.toml_dumps(conf))
                proc = procs.start(f"{tag}-{name}", [sys.executable, "-m", "failproxy",
                                                     "serve", str(path)], env=env)
            started.append((proc, ip))
        for proc, ip in started:
            # the probes have no X-Request-Id "bench-…": the logs' readers leave them out
            wait_http(proc, ip, front_port, "/fast", timeout=20.0)
        for _ in range(WARMUP_REQUESTS):  # the same few requests through every kind of front
            for _, ip in HOSTS:
                http_get(ip, front_port, "/fast", timeout=5.0)
    except BaseException:
        for proc, _ in started:
            procs.stop(proc)
        raise
    return Running([p for p, _ in started], logs)


def drain(uport: int, limit: float = 60.0) -> float:
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


# ---------------------------------------------------------------- the proxies' own logs

def _dest(address: str | None, sock: str) -> str:
    """'unix' (the box's own socket), a host name (its TCP port), or 'none'."""
    if not address or address == "-":
        return "none"
    if address.startswith("unix:"):
        return "unix" if address == f"unix:{sock}" else address
    ip = address.rsplit(":", 1)[0]
    for name, hip in HOSTS:
        if hip == ip:
            return name
    return address


def read_front_log(kind: str, path: Path, sock: str) -> tuple[dict[int, str], Counter[str]]:
    """(schedule index -> destination, failover reasons) from one front's log."""
    dests: dict[int, str] = {}
    reasons: Counter[str] = Counter()
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return dests, reasons
    for line in text.splitlines():
        if kind == "nginx":
            rid, _, rest = line.partition(" ")
            if not rid.startswith("bench-"):
                continue
            _status, _, addrs = rest.partition(" ")
            # tries within one upstream are ", "-separated, upstream groups " : "-separated
            last = addrs.replace(" : ", ", ").split(", ")[-1].strip()
            dests[int(rid[6:])] = _dest(last, sock)
            continue
        if '"bench-' not in line:
            continue
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        rid = ev.get("request_id") or ""
        if not rid.startswith("bench-"):
            continue
        if ev.get("event") == "request":
            dests[int(rid[6:])] = _dest(ev.get("upstream"), sock)
        elif ev.get("event") == "failover":
            reasons[str(ev.get("reason"))] += 1
    return dests, reasons


# ---------------------------------------------------------------- the experiment

def run(params: Params, procs: Processes) -> dict[str, Any]:
    params.check()
    for line in describe(params):
        log(line)
    ips = [ip for _, ip in HOSTS]
    errors: dict[str, str] = {}
    envs: dict[str, dict[str, str] | None] = {}
    baseline_info: dict[str, str] = {}
    origins: dict[str, str] = {}
    for front in params.fronts:
        fk = FRONTS[front]
        if fk.kind != "failproxy":
            envs[front] = None
            continue
        try:
            if fk.baseline:
                tree, baseline_info = baseline_tree(params.baseline, procs.workdir)
            else:
                tree = REPO
            envs[front] = front_env(None if not fk.baseline else tree)
            origins[front] = check_import(envs[front] or {}, tree, procs.workdir)
            log(f"  {front}: failproxy from {origins[front]}")
        except (StartError, OSError, subprocess.SubprocessError) as exc:
            log(f"  !! {front}: {exc}")
            errors[front] = str(exc)[:2000]
    live = [f for f in params.fronts if f not in errors]

    # pairing: a schedule depends on (mix, round) only; drawing it again gives the same one
    plans = {(m, k): schedule(MIXES[m], k, params.duration)
             for m in params.mixes for k in range(params.rounds)}
    digests = {key: openloop.digest(s) for key, s in plans.items()}
    for (m, k), d in digests.items():
        again = openloop.digest(schedule(MIXES[m], k, params.duration))
        assert again == d, f"schedule of {m} round {k} is not reproducible"

    uport = free_port(*ips)
    default_workers = (UNICORN_WORKERS,) * 3
    socks, unicorns = start_unicorns(procs, uport, default_workers)
    running = default_workers
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {m: {f: [] for f in live}
                                                        for m in params.mixes}
    lat: dict[str, dict[str, dict[str, list[float]]]] = {
        m: {f: {"fast": [], "slow": []} for f in live} for m in params.mixes}
    t_start = time.monotonic()
    for k in range(params.rounds):
        order = round_order(live, k)
        for m in params.mixes:
            mix = MIXES[m]
            if mix.workers != running:  # hosts unlike each other: unicorns for this mix
                for proc in unicorns:
                    procs.stop(proc)
                socks, unicorns = start_unicorns(procs, uport, mix.workers)
                running = mix.workers
            for front in order:
                row, res = _one_run(procs, mix, k, plans[(m, k)], front, uport, socks,
                                    envs[front], params)
                runs[m][front].append(row)
                if res is not None:
                    for o in res.outcomes:
                        if o.status == 200:
                            lat[m][front]["slow" if o.slow else "fast"].append(
                                round(o.latency_ms, 3))
        log(f"  round {k + 1}/{params.rounds} done, {time.monotonic() - t_start:.0f} s so far")

    if running != default_workers and params.throughput_duration > 0:
        for proc in unicorns:
            procs.stop(proc)
        socks, unicorns = start_unicorns(procs, uport, default_workers)
    tput = (_throughput(params, procs, uport, live, envs, socks, unicorns)
            if params.throughput_duration > 0 else None)
    mixes_out = {}
    for m in params.mixes:
        mix = MIXES[m]
        fronts_out = {}
        for front in params.fronts:
            rows = runs[m].get(front, [])
            out: dict[str, Any] = {"label": FRONTS[front].label, "error": errors.get(front)}
            out.update(combine(rows))
            out["rounds"] = rows
            for cls in ("fast", "slow"):
                out[f"latencies_{cls}_ms"] = sorted(lat[m].get(front, {}).get(cls, []))
            fronts_out[front] = out
        peers = mix.equal_peers()
        mixes_out[m] = {
            "kind": mix.kind, "why": mix.why, "rate": mix.rate, "slow_ms": mix.slow_ms,
            "slow_share_per_host": list(mix.shares),
            "offered_load_per_host": [round(x, 3) for x in mix.offered()],
            "offered_slow_load_per_host": [round(x, 3) for x in mix.offered_slow()],
            "cluster_load": round(mix.cluster_load(), 3),
            "equal_peers": ({"skewed": HOSTS[peers[0]][0],
                             "peers": [HOSTS[i][0] for i in peers[1]]} if peers else None),
            "digests": [digests[(m, k)] for k in range(params.rounds)],
            "fronts": fronts_out,
            "paired": paired(fronts_out, REFERENCE),
        }
    return {"params": {"rounds": params.rounds, "duration_s": params.duration,
                       "timeout_s": params.timeout, "unicorn_workers": UNICORN_WORKERS,
                       "unix_backlog": UNIX_BACKLOG, "front_workers": params.front_workers,
                       "hosts": ips, "mixes": list(params.mixes), "fronts": list(params.fronts),
                       "reference": REFERENCE, "baseline": baseline_info,
                       "failproxy_from": origins,
                       "throughput_duration_s": params.throughput_duration,
                       "wrk_conns_per_host": params.wrk_conns_per_host,
                       "fast_ms_estimate": FAST_MS_ESTIMATE,
                       "estimated_s": round(estimate_seconds(params))},
            "front_errors": errors, "mixes": mixes_out, "no_overload": tput}


def _one_run(procs: Processes, mix: Mix, k: int, plan: list[openloop.Arrival], front: str,
             uport: int, socks: dict[str, str], env: dict[str, str] | None, params: Params
             ) -> tuple[dict[str, Any], openloop.LoadResult | None]:
    """One front on one mix for one round: fresh fronts, the round's schedule, then the
    fronts stopped, their logs read and unicorn drained."""
    tag = f"{front}-{mix.name}-r{k + 1}"
    port = free_port(*(ip for _, ip in HOSTS))
    try:
        running = start_fronts(procs, front, port, uport, socks, tag, env,
                               params.front_workers)
    except (StartError, OSError) as exc:
        log(f"  !! {tag}: fronts did not start: {exc}")
        return {"round": k + 1, "error": str(exc)[:2000]}, None
    try:
        clients = [openloop.Front(name, ip, port) for name, ip in HOSTS]
        res = openloop.run(clients, plan, slow_ms=mix.slow_ms, timeout=params.timeout)
    finally:
        for proc in running.procs:
            procs.stop(proc)
    kind = FRONTS[front].kind
    dests: dict[int, str] = {}
    reasons: dict[str, dict[str, int]] = {}
    for name, _ in HOSTS:
        d, r = read_front_log(kind, running.logs[name], socks[name])
        dests.update(d)
        reasons[name] = dict(r)
    row = summarise(res, dests, plan)
    row["round"], row["seed"], row["failover_reasons"] = k + 1, k, reasons
    # the pairing: every front of this round got exactly this schedule, all of it
    assert res.digest == openloop.digest(plan)
    row["complete"] = (res.sent == res.planned and not res.skipped and not res.lost
                       and len(res.outcomes) == res.planned)
    log(f"  r{k + 1} {mix.name:<10} {front:<18} ok {row['ok']}/{row['planned']} "
        f"err {row['error_count']}  fast p50 {row['fast_p50_ms']:.1f} p99 "
        f"{row['fast_p99_ms']:.1f}  slow p50 {row['slow_p50_ms']:.0f} p99 "
        f"{row['slow_p99_ms']:.0f}  all p99 {row['p99_ms']:.1f} ms  left box "
        f"{row['left_box_share']:.1%}  h1 -> {_fmt_dest(row['dest'].get('h1', {}))}  "
        f"lag p99 {row['client_lag_p99_ms']:.1f} ms")
    waited = drain(uport)
    if waited > 1:
        log(f"    drained unicorn queues in {waited:.1f} s")
    return row, res


def _fmt_dest(d: dict[str, int]) -> str:
    return " ".join(f"{k}:{v}" for k, v in sorted(d.items())) or "-"


def summarise(res: openloop.LoadResult, dests: dict[int, str],
              plan: list[openloop.Arrival]) -> dict[str, Any]:
    """One run's figures: latencies by class, errors, who served what."""
    out = res.summary()
    ok = [o for o in res.outcomes if o.status == 200]
    lat = sorted(o.latency_ms for o in ok)
    fast = sorted(o.latency_ms for o in ok if not o.slow)
    slow = sorted(o.latency_ms for o in ok if o.slow)
    for q in (50, 90, 99):
        out[f"p{q}_ms"] = percentile(lat, q)
    out["max_ms"] = lat[-1] if lat else float("nan")
    out["fast_p50_ms"], out["fast_p99_ms"] = percentile(fast, 50), percentile(fast, 99)
    out["slow_p50_ms"], out["slow_p99_ms"] = percentile(slow, 50), percentile(slow, 99)
    out["fast_ok"], out["slow_ok"] = len(fast), len(slow)
    # where each box's front sent its requests, from the front's own log
    dest: dict[str, Counter[str]] = {name: Counter() for name, _ in HOSTS}
    overflow: Counter[str] = Counter()
    for a in plan:
        d = dests.get(a.index)
        if d is None:
            continue
        host = HOSTS[a.front][0]
        dest[host][d] += 1
        if d != "unix":
            overflow["slow" if a.slow else "fast"] += 1
    out["dest"] = {h: dict(sorted(c.items())) for h, c in dest.items()}
    out["logged"] = sum(sum(c.values()) for c in dest.values())
    out["overflow"] = sum(overflow.values())
    out["overflow_fast"], out["overflow_slow"] = overflow["fast"], overflow["slow"]
    out["overflow_share"] = out["overflow"] / out["logged"] if out["logged"] else 0.0
    return out


COMBINED_MEDIANS = ("p50_ms", "p90_ms", "p99_ms", "max_ms", "fast_p50_ms", "fast_p99_ms",
                    "slow_p50_ms", "slow_p99_ms", "left_box_share", "overflow_share",
                    "client_lag_p99_ms")


def combine(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Over the rounds: medians of the per-round figures, sums of the counts."""
    good = [r for r in rows if "error" not in r]
    if not good:
        return {}
    out: dict[str, Any] = {k: median([r[k] for r in good]) for k in COMBINED_MEDIANS}
    for k in ("planned", "sent", "ok", "error_count", "left_box", "overflow", "overflow_fast",
              "overflow_slow", "logged", "fast_ok", "slow_ok"):
        out[k] = sum(r[k] for r in good)
    errors: Counter[str] = Counter()
    reasons: dict[str, Counter[str]] = {}
    dest: dict[str, Counter[str]] = {}
    for r in good:
        errors.update(r["errors"])
        for h, c in r["dest"].items():
            dest.setdefault(h, Counter()).update(c)
        for h, c in r["failover_reasons"].items():
            reasons.setdefault(h, Counter()).update(c)
    out["errors"] = dict(errors)
    out["dest"] = {h: dict(sorted(c.items())) for h, c in dest.items()}
    out["failover_reasons"] = {h: dict(c) for h, c in reasons.items()}
    out["client_lag_max_ms"] = max(r["client_lag_max_ms"] for r in good)
    out["complete"] = all(r["complete"] for r in good) and len(good) == len(rows)
    out["rounds_run"] = len(good)
    return out


def spread(values: list[float | None]) -> dict[str, Any] | None:
    vals = [v for v in values if v is not None and v == v]
    if not vals:
        return None
    return {"median": median(vals), "min": min(vals), "max": max(vals),
            "per_round": [None if v is None else round(v, 4) for v in values]}


def paired(fronts: dict[str, dict[str, Any]], reference: str) -> dict[str, Any]:
    """Per front, the ratios to `reference` round by round (same seed = same schedule)."""
    ref = {r["round"]: r for r in fronts.get(reference, {}).get("rounds", [])
           if "error" not in r}
    out: dict[str, Any] = {}
    for name, f in fronts.items():
        if name == reference or not ref:
            continue
        per: dict[str, list[float | None]] = {"fast_p99": [], "p99": [], "slow_p99": []}
        for r in f.get("rounds", []):
            base = ref.get(r["round"])
            if "error" in r or base is None:
                continue
            for key, fig in (("fast_p99", "fast_p99_ms"), ("p99", "p99_ms"),
                             ("slow_p99", "slow_p99_ms")):
                b = base.get(fig)
                per[key].append(r[fig] / b if b and b == b and r[fig] == r[fig] else None)
        out[name] = {k: spread(v) for k, v in per.items()}
    return out


# ---------------------------------------------------------------- no overload: wrk

def _throughput(params: Params, procs: Processes, uport: int, live: list[str],
                envs: dict[str, dict[str, str] | None], socks: dict[str, str],
                unicorns: list[Proc]) -> dict[str, Any]:
    """No overload: closed-loop wrk, fast action, through each front vs unicorn's TCP port.
    CPU µs per request is measured for the three fronts together and for the unicorns."""
    ips = [ip for _, ip in HOSTS]
    ports: dict[str, int] = {"direct": uport}
    fronts: dict[str, list[Proc]] = {"direct": []}
    errors: dict[str, str] = {}
    for front in live:
        ports[front] = free_port(*ips)
        try:
            fronts[front] = start_fronts(procs, front, ports[front], uport, socks,
                                         f"{front}-wrk", envs[front],
                                         params.front_workers).procs
        except (StartError, OSError) as exc:
            log(f"  !! {front} fronts did not start: {exc}")
            errors[front] = str(exc)[:2000]
    targets = ["direct"] + [f for f in live if f not in errors]
    runs: dict[str, list[dict[str, Any]]] = {}
    conns = params.wrk_conns_per_host * len(HOSTS)
    for r in range(params.rounds):
        # the order changes from round to round (round_order), each target gets a 1 s warm-up
        for name in round_order(targets, r):
            port = ports[name]
            script = wrk.write_script(procs.workdir / f"wrk-{name}.lua",
                                      [(ip, port) for ip in ips])
            wrk.run(f"http://{ips[0]}:{port}/fast", script=script, duration=1.0,
                    connections=conns, threads=len(HOSTS))
            front_split0 = cpu_split_of(fronts[name])
            app_cpu0 = sum(p.cpu_seconds() for p in unicorns)
            res = wrk.run(f"http://{ips[0]}:{port}/fast", script=script,
                          duration=params.throughput_duration, connections=conns,
                          threads=len(HOSTS))
            front_user, front_sys = (b - a for a, b in zip(front_split0,
                                                           cpu_split_of(fronts[name]),
                                                           strict=True))
            app_cpu = sum(p.cpu_seconds() for p in unicorns) - app_cpu0
            row = res.as_dict()
            row["round"] = r + 1
            per_req = 1e6 / res.requests if res.requests else 0.0
            row["front_cpu_us_per_req"] = (front_user + front_sys) * per_req
            row["front_user_us_per_req"] = front_user * per_req
            row["front_system_us_per_req"] = front_sys * per_req
            row["unicorn_cpu_us_per_req"] = app_cpu * 1e6 / res.requests if res.requests else 0
            runs.setdefault(name, []).append(row)
            log(f"  round {r + 1}/{params.rounds} no-overload {name:<18} "
                f"{res.req_s:>8,.0f} req/s  p50 {res.p50_ms:.2f} ms  p99 {res.p99_ms:.2f} ms"
                f"  CPU µs/req fronts {row['front_cpu_us_per_req']:.0f} "
                f"(user {row['front_user_us_per_req']:.0f}) "
                f"unicorns {row['unicorn_cpu_us_per_req']:.0f}  errors {res.errors}")
            time.sleep(0.3)
    for name in targets[1:]:
        for proc in fronts[name]:
            procs.stop(proc)
    out: dict[str, Any] = {}
    direct = median([x["req_s"] for x in runs["direct"]])
    for name, rs in runs.items():
        req_s = median([x["req_s"] for x in rs])
        out[name] = {"label": "unicorn TCP ports directly" if name == "direct"
                     else FRONTS[name].label,
                     "req_s": req_s, "p50_ms": median([x["p50_ms"] for x in rs]),
                     "p99_ms": median([x["p99_ms"] for x in rs]),
                     "front_cpu_us_per_req": median([x["front_cpu_us_per_req"] for x in rs]),
                     "front_user_us_per_req": median([x["front_user_us_per_req"] for x in rs]),
                     "front_system_us_per_req": median([x["front_system_us_per_req"]
                                                        for x in rs]),
                     "unicorn_cpu_us_per_req": median([x["unicorn_cpu_us_per_req"]
                                                       for x in rs]),
                     "errors": sum(x["errors"] for x in rs),
                     "ratio_direct": req_s / direct if direct else None, "rounds": rs}
    for name in errors:
        out[name] = {"label": FRONTS[name].label, "error": errors[name]}
    # paired: failproxy over failproxy-old, round by round (interleaved runs)
    pairs = None
    if "failproxy" in runs and "failproxy-old" in runs:
        pairs = spread([a["req_s"] / b["req_s"] if b["req_s"] else None
                        for a, b in zip(runs["failproxy"], runs["failproxy-old"],
                                        strict=True)])
    return {"wrk": f"wrk -t{len(HOSTS)} -c{conns} -d{max(1, round(params.throughput_duration))}s"
                   " (one thread per host)", "targets": out,
            "failproxy_vs_old_req_s": pairs}
