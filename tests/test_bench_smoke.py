"""The benchmark harness runs: `python -m bench smoke` measures direct and failproxy throughput.

A few seconds of tiny load (wrk -c10, 1 s per target). It needs nginx and wrk; the harness
installs them with apt-get when they are missing (as `make bench` does), so nothing is skipped.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


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
