"""Name lookups left in the compiled hot path: where mypyc's C looks a name up at run time.

A module-level `Final` is a C static in the compiled build; a from-import, a module attribute
(`os.read`) or a plain module constant is a dict lookup at every use (~150-300 instructions).
This lists, per compiled function, the names its C looks up in a module's globals or as an
attribute, from the generated source (`make build` leaves it in build/failproxy/). Lookups on
an error path (`except OSError`) cost nothing until the error; the rest is worth a `Final`.

    python -m bench.profiles.lookups [--all] [--c build/failproxy/__native__compiled.c]
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Functions on the per-request and per-connection paths (a prefix of their C name).
HOT = ("rawtransport___", "upstream___UpstreamConnection", "downstream___ClientConnection",
       "exchange___Exchange", "connect___start_connect", "events___Events", "jsonlog___",
       "metrics___WorkerMetrics", "timer___", "headers___", "balance___Room", "turnend___",
       "loadshare___LoadView", "request___Request", "context___WorkerContext___new_request_id")
# Names that are only looked up on an error path.
ERRORS = {"BlockingIOError", "InterruptedError", "OSError", "ValueError", "RuntimeError",
          "AssertionError", "NotImplementedError", "HttpParserError", "HttpParserUpgrade",
          "Exception", "args", "__context__"}


def lookups(c_source: str) -> dict[str, list[str]]:
    """C function name -> the names it looks up (globals dict or attribute), in order."""
    found: dict[str, list[str]] = {}
    func = ""
    lines = c_source.splitlines()
    for i, line in enumerate(lines):
        start = re.match(r"^\S.*\bCPyDef_(\w+)\(.*\)\s*\{$", line)
        if start:
            func = start.group(1)
            continue
        if not func or "top_level" in func:
            continue
        if re.search(r"CPyDict_GetItem\(|CPyDict_GetWithNone\(|CPyObject_GetAttr\(", line):
            names = re.findall(r"/\* '([^']+)' \*/", " ".join(lines[max(0, i - 2): i + 1]))
            found.setdefault(func, []).append(names[-1] if names else "?")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--c", type=Path, default=ROOT / "build/failproxy/__native__compiled.c")
    parser.add_argument("--all", action="store_true", help="every function, error paths too")
    args = parser.parse_args()
    if not args.c.exists():
        raise SystemExit(f"{args.c}: not found (run `make build` first)")
    for func, names in sorted(lookups(args.c.read_text()).items()):
        if not args.all:
            if not func.startswith(HOT) or "__init__" in func:
                continue
            names = [n for n in names if n not in ERRORS]
        if names:
            print(f"{func}: {', '.join(names)}")


if __name__ == "__main__":
    main()
