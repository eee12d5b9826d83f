"""Scenario "micro": `python -m bench.profiles.micro` for this checkout and a baseline, interleaved.

The Python cost of one pooled request with the sockets taken out (bench/profiles/micro.py), measured
for failproxy as it is and for the baseline checkout (`--baseline`, each with its own micro.py and
the same interpreter) in alternating rounds, so the before/after ratio comes from one sitting.
Both runs are single-core and CPU-bound; each tree's micro reports its own per-request figure
(this tree's counts process CPU time, older trees wall time: on a quiet machine the same).
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.instruments.procs import Processes
from bench.instruments.stats import median
from bench.instruments.system import log
from bench.profiles import micro_module
from bench.targets import servers

_LINE = re.compile(r"access log (on|off)\s*: ([\d.]+) µs")


@dataclass(frozen=True)
class Params:
    rounds: int = 3
    requests: int = 100_000
    baseline: str | None = None  # a tree holding failproxy/, or a git revision (scenarios.seed)


def _once(tree: Path, requests: int) -> dict[str, float]:
    # a tree from before bench/ had sub-packages runs its bench/micro.py
    out = subprocess.run([sys.executable, "-m", micro_module(tree), "--requests", str(requests)],
                         cwd=tree, env=servers.python_env(tree), capture_output=True, text=True,
                         timeout=600, check=True).stdout
    got = {m.group(1): float(m.group(2)) for m in _LINE.finditer(out)}
    if set(got) != {"on", "off"}:
        raise RuntimeError(f"{micro_module(tree)} in {tree} printed no figures: {out[-300:]!r}")
    return got


def run(params: Params, procs: Processes) -> dict[str, Any]:
    from bench.scenarios import seed

    trees = {"failproxy": servers.REPO}
    if params.baseline:
        trees["baseline"] = seed.baseline_tree(params.baseline, procs.workdir)[0]
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    for r in range(params.rounds):
        for name, tree in trees.items():
            got = _once(tree, params.requests)
            rounds[name].append(got)
            log(f"  round {r + 1}/{params.rounds} {name:<10} log on {got['on']:.2f} µs, "
                f"off {got['off']:.2f} µs of Python per request")
    med = {name: {k: median([x[k] for x in rs]) for k in ("on", "off")}
           for name, rs in rounds.items()}
    ratio = None
    if "baseline" in med:
        ratio = {k: med["failproxy"][k] / med["baseline"][k] for k in ("on", "off")}
    return {"params": {"rounds": params.rounds, "requests": params.requests,
                       "baseline": str(trees.get("baseline", ""))},
            "rounds": rounds, "median": med, "ratio": ratio}
