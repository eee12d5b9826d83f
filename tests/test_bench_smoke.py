"""The benchmark harness runs: `python -m bench smoke` measures direct and failproxy throughput;
`python -m bench seed` on a tiny mix runs issue 7's seed instrument end to end.

A few seconds of tiny load each (wrk -c10, 1 s per target; 2 s of open-loop arrivals per front).
They need nginx, wrk and unicorn; the harness installs them with apt-get when they are missing
(as `make bench` does), so nothing is skipped.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # bench/ is not an installed package
    sys.path.insert(0, str(REPO))


def test_bench_smoke(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "smoke", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    files = list(tmp_path.glob("*-smoke.json"))
    assert len(files) == 1, proc.stderr[-2000:]
    doc = json.loads(files[0].read_text())

    assert doc["run"]["machine"]["nproc"] >= 1
    targets = {t["name"]: t for t in doc["scenarios"]["throughput"]["targets"]}
    assert set(targets) == {"direct", "failproxy1"}
    for name, t in targets.items():
        assert t["error"] is None, f"{name}: {t['error']}"
        m = t["median"]
        assert m["req_s"] > 0, name
        assert 0 < m["p50_ms"] <= m["p99_ms"], name
        assert m["cpu_us_per_req"] > 0, name
        assert t["errors_total"] == 0, name
    # the smoke run must not rewrite the committed results
    assert "RESULTS.md" not in proc.stderr


def test_seed_schedule_is_paired() -> None:
    """Same (mix, seed): the same schedule for every front; another seed: another one."""
    from bench.instruments import openloop
    from bench.scenarios import seed

    mix = seed.MIXES["skew100"]
    a = seed.schedule(mix, 3, 10.0)
    b = seed.schedule(mix, 3, 10.0)
    assert a == b and openloop.digest(a) == openloop.digest(b)
    assert openloop.digest(seed.schedule(mix, 4, 10.0)) != openloop.digest(a)
    assert [x.index for x in a] == list(range(len(a)))
    assert [x.at for x in a] == sorted(x.at for x in a)
    # Poisson per front at rate/3, slow only on host1 (60 %)
    assert 0.8 * mix.rate * 10 < len(a) < 1.2 * mix.rate * 10
    slow = [x for x in a if x.slow]
    assert slow and {x.front for x in slow} == {0}
    assert 0.45 < len(slow) / sum(1 for x in a if x.front == 0) < 0.75
    assert seed.MIXES["skew1s-10"].offered()[0] > 1.4  # host1 overloaded ...
    assert seed.MIXES["skew1s-10"].cluster_load() < 0.6  # ... the cluster has room


def test_bench_seed_smoke(tmp_path: Path) -> None:
    """The issue-7 seed path end to end in seconds: a tiny mix, 1 round of 2 s, the three
    default fronts (failproxy-old from this very tree), and a 1 s wrk no-overload check."""
    from bench.instruments import openloop
    from bench.scenarios import seed

    proc = subprocess.run(
        [sys.executable, "-m", "bench", "seed", "--mixes", "smoke", "--rounds", "1",
         "--duration", "2", "--throughput-duration", "1", "--baseline", str(REPO),
         "--no-report", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    files = list(tmp_path.glob("*-seed.json"))
    assert len(files) == 1, proc.stderr[-2000:]
    r = json.loads(files[0].read_text())["scenarios"]["seed"]
    assert r["params"]["baseline"]["path"] == str(REPO)
    m = r["mixes"]["smoke"]
    want = openloop.digest(seed.schedule(seed.MIXES["smoke"], 0, 2.0))
    assert m["digests"] == [want]
    assert set(m["fronts"]) == set(seed.DEFAULT_FRONTS)
    for name, f in m["fronts"].items():
        assert f["error"] is None, f"{name}: {f['error']}"
        assert f["complete"], name
        assert f["rounds"][0]["digest"] == want, name
        assert f["ok"] == f["planned"] > 200, name
        assert f["error_count"] == 0, (name, f["errors"])
        assert 0 < f["fast_p50_ms"] <= f["fast_p99_ms"], name
        assert 100 <= f["slow_p50_ms"] <= f["slow_p99_ms"], name
        # every request was found in the front's own log, host1's mostly on its socket
        assert f["logged"] == f["ok"], name
        assert f["dest"]["h1"].get("unix", 0) > 0, name
        assert sorted(f["latencies_fast_ms"]) == f["latencies_fast_ms"]
    for name in ("failproxy", "failproxy-old"):
        assert m["paired"][name]["fast_p99"]["median"] > 0
    t = r["no_overload"]["targets"]
    assert set(t) == {"direct", *seed.DEFAULT_FRONTS}
    assert all(x["req_s"] > 0 and x["errors"] == 0 for x in t.values()), t
    assert r["no_overload"]["failproxy_vs_old_req_s"]["median"] > 0


def test_syscall_counts_are_read_from_strace(tmp_path: Path) -> None:
    """bench.profiles.syscalls reads `strace -c -f` as strace prints it: a real trace of a
    child that makes a known number of write() calls (-B: no .pyc written beside them)."""
    from bench.profiles.syscalls import parse_summary

    out = tmp_path / "summary"
    subprocess.run(["strace", "-c", "-f", "-o", str(out), sys.executable, "-B", "-c",
                    "import os\nfor _ in range(37): os.write(1, b'x')"],
                   check=True, capture_output=True, timeout=60)
    text = out.read_text()
    calls = parse_summary(text)
    assert calls["write"] == 37, text
    total = next(line for line in text.splitlines() if line.rstrip().endswith("total"))
    assert sum(calls.values()) == int(total.split()[3]), text
