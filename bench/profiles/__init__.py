"""Profiles: the cost of one request — µs of Python on fake transports (`micro`, and `microrun`,
the `micro` scenario comparing two trees), instructions counted by callgrind (`instructions`,
`realsock` through real sockets), `perf record` on a worker (`perfrun`), a new connection per
request behind unicorn (`newconn`, `conncost`) and the name lookups left in mypyc's C (`lookups`).
They sit above the scenarios: `microrun` takes its baseline tree from `seed`, `newconn` its app.
"""

from __future__ import annotations

from pathlib import Path


def micro_module(tree: Path) -> str:
    """The micro module of another checkout, as `python -m` names it: bench.profiles.micro, or
    bench.micro in a tree from before bench/ was split into sub-packages."""
    if (tree / "bench" / "profiles" / "micro.py").exists():
        return "bench.profiles.micro"
    return "bench.micro"
