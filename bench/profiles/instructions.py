"""CPU instructions per proxied request, counted by callgrind: the one figure on this shared
machine that does not move with the load beside it.

`bench.profiles.micro`'s loop (fake transports: only failproxy's own work) is run under
`valgrind --tool=callgrind` twice, for 1 and for 1 + N requests; the difference over N is what
one request costs, start-up and imports cancelled out. Each tree is measured with its own
bench/profiles/micro.py, as it stands (a tree built in place runs compiled, `FAILPROXY_PURE=1`
pure).

    python -m bench.profiles.instructions                       # this checkout, log on and off
    python -m bench.profiles.instructions --tree /work/wt/base  # another checkout (the baseline)

A tree from before bench/ was split into sub-packages has its micro module at bench/micro.py:
that one is run then (bench.profiles.micro_module).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.profiles import micro_module

RUNNER = """\
import importlib, sys, uvloop
sys.path.insert(0, sys.argv[3])
micro = importlib.import_module(sys.argv[4])
uvloop.run(micro.measure(int(sys.argv[1]), sys.argv[2] == "on", False))
"""


def collected(tree: Path, requests: int, access: str, python: str, pure: bool) -> int:
    """Instructions callgrind counted for one run of `requests` requests."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    if pure:
        env["FAILPROXY_PURE"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "run.py"
        script.write_text(RUNNER)
        out = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/cg.out", python,
             str(script), str(requests), access, str(tree), micro_module(tree)],
            cwd=tree, env=env, capture_output=True, text=True, check=True)
    match = re.search(r"Collected : (\d+)", out.stderr)
    if match is None:
        raise SystemExit(f"callgrind printed no count:\n{out.stderr[-2000:]}")
    return int(match.group(1))


def per_request(tree: Path, requests: int, access: str, python: str, pure: bool) -> float:
    one = collected(tree, 1, access, python, pure)
    many = collected(tree, 1 + requests, access, python, pure)
    return (many - one) / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, default=Path(__file__).resolve().parents[2])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--pure", action="store_true", help="set FAILPROXY_PURE=1")
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args()
    for access in ("on", "off"):
        n = per_request(args.tree.resolve(), args.requests, access, args.python, args.pure)
        print(f"{args.tree} access log {access}: {n / 1000:.1f}k instructions per request")


if __name__ == "__main__":
    main()
