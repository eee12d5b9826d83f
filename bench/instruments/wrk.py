"""Running wrk and reading its figures.

wrk's own text rounds latencies ("1.23ms"); a small Lua `done()` hook prints the exact figures
(microseconds, from its HdrHistogram) as one JSON line, which is what we parse. With several
addresses, a `setup()` hook points each wrk thread at one of them (one wrk, several hosts).
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.instruments.system import which

_DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d,"max_us":%d,"mean_us":%.2f,' ..
    '"err_connect":%d,"err_read":%d,"err_write":%d,"err_status":%d,"err_timeout":%d}\n',
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean,
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""

_SETUP = r"""
local addrs = {%s}
local n = 0
function setup(thread)
  local a = addrs[(n %% #addrs) + 1]
  n = n + 1
  thread.addr = wrk.lookup(a[1], a[2])[1]
end
"""


@dataclass
class WrkResult:
    requests: int
    duration_s: float
    req_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    mean_ms: float
    errors: int  # socket errors + non-2xx/3xx responses
    non_2xx: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def write_script(path: Path, addrs: list[tuple[str, int]] | None = None) -> Path:
    text = _DONE
    if addrs:
        items = ", ".join(f'{{"{h}", "{p}"}}' for h, p in addrs)
        text = _SETUP % items + text
    path.write_text(text)
    return path


def run(url: str, *, script: Path, duration: float, connections: int, threads: int = 1,
        timeout_s: float = 2.0) -> WrkResult:
    """One bounded wrk run (whole seconds: wrk takes no fractions); raises RuntimeError when
    wrk fails or prints no figures."""
    exe = which("wrk")
    if exe is None:
        raise RuntimeError("wrk not installed")
    argv = [exe, f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency",
            "--timeout", f"{timeout_s:g}s", "-s", str(script), url]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30)
    return parse(out.stdout, out.stderr, out.returncode)


def parse(stdout: str, stderr: str = "", returncode: int = 0) -> WrkResult:
    for line in stdout.splitlines():
        if line.startswith("BENCHJSON "):
            d = json.loads(line[len("BENCHJSON "):])
            break
    else:
        raise RuntimeError(f"wrk printed no figures (rc {returncode}): {stdout[-400:]} "
                           f"{stderr[-400:]}")
    dur = d["duration_us"] / 1e6
    errs = d["err_connect"] + d["err_read"] + d["err_write"] + d["err_timeout"]
    return WrkResult(
        requests=d["requests"], duration_s=round(dur, 3),
        req_s=round(d["requests"] / dur, 1) if dur else 0.0,
        p50_ms=d["p50_us"] / 1000, p90_ms=d["p90_us"] / 1000, p99_ms=d["p99_us"] / 1000,
        p999_ms=d["p999_us"] / 1000, max_ms=d["max_us"] / 1000,
        mean_ms=round(d["mean_us"] / 1000, 4),
        errors=errs + d["err_status"], non_2xx=d["err_status"])
