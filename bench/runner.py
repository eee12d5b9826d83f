"""`python -m bench MODE`: run the scenarios, write raw JSON, regenerate bench/RESULTS.md.

Modes:
    quick       every scenario, short loads (1 round; under 5 minutes on 2 cores, plus about 3
                for slowclients)
    full        every scenario, 3 interleaved rounds of 10 s loads, 10 000 idle connections;
                seed: issue 7's protocol, 6 mixes x 5 paired rounds x 60 s (about 2 hours);
                slowclients: N = 0, 50, 500 x 60 s, a 1 GiB upload (about 11 minutes)
    smoke       about 20 s: direct and failproxy throughput, and slowclients in miniature
                (N = 5, 1.5 s, 10 idle readers, an 8 MiB upload); used by the test suite;
                writes JSON only, never RESULTS.md
    throughput | failover | memory | seed | micro | slowclients
                one scenario (quick sizes; add --full for full sizes)

Raw results go to bench/out/<timestamp>-<mode>.json (git-ignored). The latest result of each
scenario is merged into bench/results.json, from which bench/RESULTS.md is regenerated.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import report
from bench.instruments.procs import Processes
from bench.instruments.system import ensure_packages, log, machine_facts, raise_nofile
from bench.profiles import microrun
from bench.scenarios import failover, memory, seed, slowclients, throughput

BENCH_DIR = Path(__file__).resolve().parent
SCENARIOS = ("throughput", "failover", "memory", "seed", "micro", "slowclients")


def settings(size: str) -> dict[str, Any]:
    """Per-scenario parameters for one size: smoke, quick or full."""
    if size == "smoke":
        return {"throughput": throughput.Params(rounds=1, duration=1.0, connections=10,
                                                warmup=0.2, log_sets=(True,),
                                                kinds=("failproxy1",)),
                # N = 5 only (no baseline run), 10 idle readers, an 8 MiB upload
                "slowclients": slowclients.Params(ns=(5,), duration=1.5, rate=50.0,
                                                  settle=0.5, mem_readers=10, mem_hold=0.5,
                                                  mem_waves=1, upload_mib=8)}
    if size == "quick":
        return {
            "throughput": throughput.Params(rounds=1, duration=3.0),
            "failover": failover.Params(rounds=1, duration=3.0),
            "memory": memory.Params(connections=2000),
            "seed": seed.Params(rounds=1, duration=10.0, throughput_duration=3.0,
                                mixes=seed.QUICK_MIXES),
            "micro": microrun.Params(rounds=1, requests=30_000, baseline=seed.BASELINE_DEFAULT),
            # issue 18, quick: N = 0 and 50, 20 s each; a 256 MiB upload (full: 1 GiB)
            "slowclients": slowclients.Params(ns=(0, 50), duration=20.0, upload_mib=256),
        }
    return {
        "throughput": throughput.Params(rounds=3, duration=10.0, warmup=1.0),
        "failover": failover.Params(rounds=3, duration=10.0),
        "memory": memory.Params(connections=10000),
        # issue 7's protocol: >= 5 paired rounds of >= 60 s per mix (about 2 hours)
        "seed": seed.Params(rounds=5, duration=60.0, throughput_duration=10.0),
        "micro": microrun.Params(rounds=5, requests=100_000, baseline=seed.BASELINE_DEFAULT),
        "slowclients": slowclients.Params(ns=(0, 50, 500), duration=60.0, upload_mib=1024),
    }


RUNNERS: dict[str, Callable[[Any, Processes], dict[str, Any]]] = {
    "throughput": throughput.run,
    "failover": failover.run,
    "memory": memory.run,
    "seed": seed.run,
    "micro": microrun.run,
    "slowclients": slowclients.run,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("quick", "full", "smoke", *SCENARIOS))
    parser.add_argument("--full", action="store_true", help="full sizes for a single scenario")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "out",
                        help="directory for the raw JSON (default bench/out)")
    parser.add_argument("--no-report", action="store_true",
                        help="do not touch bench/results.json and bench/RESULTS.md")
    parser.add_argument("--note", default="", help="free text stored with the run "
                        "(e.g. 'shared machine')")
    parser.add_argument("--keep", action="store_true", help="keep the temp dirs (configs, logs)")
    group = parser.add_argument_group("seed scenario")
    group.add_argument("--mixes", help="comma-separated mixes (default: the mode's set; all: "
                       + ", ".join(seed.MIXES) + ")")
    group.add_argument("--fronts", help="comma-separated fronts (default: "
                       + ",".join(seed.DEFAULT_FRONTS) + "; all: " + ", ".join(seed.FRONTS)
                       + ")")
    group.add_argument("--rounds", type=int, help="seed: paired rounds (full: 5, quick: 1); "
                       "throughput: interleaved rounds (full: 3, quick: 1); slowclients: "
                       "rounds (1)")
    group.add_argument("--duration", type=float, help="seconds of arrivals per run "
                       "(seed full: 60, quick: 10; slowclients full: 60, quick: 20)")
    group.add_argument("--throughput-duration", type=float, help="seconds per wrk run of the "
                       "no-overload check (full: 10, quick: 3; 0 = skip it)")
    group.add_argument("--wrk-conns", type=int, help="wrk connections per host in the "
                       "no-overload check (4): fewer leave the app servers idle more often, "
                       "which makes each of their requests dearer")
    group.add_argument("--baseline", help="failproxy-old's source: a tree holding failproxy/, "
                       f"or a git revision of this repository (default {seed.BASELINE_DEFAULT}); "
                       "given, the throughput scenario measures it too (failproxy1-base)")
    group = parser.add_argument_group("slowclients scenario")
    group.add_argument("--ns", help="comma-separated numbers of slow uploaders (and as many "
                       "slow readers) per run, 0 = the baseline (quick: 0,50; full: 0,50,500)")
    group.add_argument("--mem-readers", type=int, help="idle readers of 8 MiB in the memory "
                       "part (1000; 0 skips it)")
    group.add_argument("--upload-mib", type=int, help="size of the large upload in MiB "
                       "(quick: 256, full: 1024; 0 skips it)")
    args = parser.parse_args(argv)

    raw_argv = sys.argv[1:] if argv is None else argv
    command = "python -m bench " + " ".join(shlex.quote(a) for a in raw_argv)
    if args.mode in ("quick", "full", "smoke"):
        size, names = args.mode, (("throughput", "slowclients") if args.mode == "smoke"
                                  else SCENARIOS)
    else:
        size, names = ("full" if args.full else "quick"), (args.mode,)
    write_report = not args.no_report and args.mode != "smoke"

    ensure_packages(["nginx", "wrk", "unicorn"] if args.mode == "smoke" else None)
    nofile = raise_nofile(65536)
    started = time.monotonic()
    run_id = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    doc: dict[str, Any] = {
        "run": {"id": run_id, "command": command, "mode": args.mode, "size": size,
                "note": args.note, "machine": machine_facts(), "rlimit_nofile": nofile},
        "scenarios": {},
    }
    log(f"run {run_id}: {command} ({size} sizes; scenarios: {', '.join(names)})")
    params = settings(size)
    if "seed" in params:
        try:
            params["seed"] = seed.with_options(
                params["seed"], mixes=args.mixes, fronts=args.fronts, rounds=args.rounds,
                duration=args.duration, throughput_duration=args.throughput_duration,
                baseline=args.baseline, wrk_conns=args.wrk_conns)
        except ValueError as exc:
            parser.error(str(exc))
    if args.baseline is not None and "throughput" in params:
        params["throughput"] = dataclasses.replace(params["throughput"], baseline=args.baseline)
    if args.rounds is not None and "throughput" in params:  # a noisy box: more rounds, one median
        params["throughput"] = dataclasses.replace(params["throughput"], rounds=args.rounds)
    if "slowclients" in params:
        changes: dict[str, Any] = {}
        if args.ns:
            try:
                changes["ns"] = tuple(int(x) for x in args.ns.split(",") if x.strip())
            except ValueError:
                parser.error(f"--ns {args.ns}: comma-separated whole numbers please")
        for key, value in (("rounds", args.rounds), ("duration", args.duration),
                           ("mem_readers", args.mem_readers), ("upload_mib", args.upload_mib)):
            if value is not None:
                changes[key] = value
        params["slowclients"] = dataclasses.replace(params["slowclients"], **changes)
    if args.baseline is not None and "micro" in params:
        params["micro"] = dataclasses.replace(params["micro"], baseline=args.baseline)
    failures = 0
    for name in names:
        log(f"== {name}")
        t0 = time.monotonic()
        workdir = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
        procs = Processes(workdir)
        try:
            result = RUNNERS[name](params[name], procs)
        except Exception as exc:  # one broken scenario must not hide the others
            failures += 1
            log(f"!! scenario {name} failed: {exc!r}")
            traceback.print_exc()
            result = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            procs.close()
            if args.keep:
                log(f"   kept {workdir}")
            else:
                shutil.rmtree(workdir, ignore_errors=True)
        result["elapsed_s"] = round(time.monotonic() - t0, 1)
        result["run_id"] = run_id
        doc["scenarios"][name] = result
        log(f"== {name} done in {result['elapsed_s']} s")

    doc["run"]["elapsed_s"] = round(time.monotonic() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    raw_path = args.out / f"{run_id}-{args.mode}.json"
    raw_path.write_text(json.dumps(doc, indent=1, default=str))
    log(f"raw results: {raw_path}")
    if write_report:
        seed_result = doc["scenarios"].get("seed")
        if seed_result and not report.failed(seed_result):
            if report.plot_seed(seed_result, BENCH_DIR / report.PLOT_NAME):
                log(f"plotted {BENCH_DIR / report.PLOT_NAME}")
            else:
                log("!! matplotlib is not installed: no plot")
        slow_result = doc["scenarios"].get("slowclients")
        if slow_result and not report.failed(slow_result):
            if report.plot_slowclients(slow_result, BENCH_DIR / report.SLOW_PLOT_NAME):
                log(f"plotted {BENCH_DIR / report.SLOW_PLOT_NAME}")
            else:
                log("!! matplotlib is not installed: no plot")
        merged = report.merge(BENCH_DIR / "results.json", doc)
        report.write(BENCH_DIR / "RESULTS.md", merged)
        log(f"updated {BENCH_DIR / 'results.json'} and {BENCH_DIR / 'RESULTS.md'}")
    print(report.console_summary(doc))
    log(f"total {doc['run']['elapsed_s']} s")
    return 1 if failures else 0
