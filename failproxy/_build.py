"""Which build of failproxy runs: the hot modules compiled by mypyc, or pure Python.

`pip install .` compiles the modules in COMPILED (setup.py) where a C compiler exists and leaves
them as plain Python where none does: the same source either way. This module, imported first
by the package, decides which one is imported:

- `FAILPROXY_PURE=1` in the environment: the .py files, even where the compiled ones exist (the
  test suite runs the hot-path tests this way too);
- in a source checkout, a compiled build older than any of its sources is stale (an edit since
  the last `make build`): the .py files, with a warning, rather than code that is not the
  source's;
- otherwise the compiled modules where they exist.

Standard library only, and nothing here runs after import.
"""

from __future__ import annotations

import importlib.machinery
import os
import sys
from pathlib import Path

# The hot path, compiled by mypyc (plain typed Python, no compiled-only code). Bottom first.
COMPILED = (
    "reasons",
    "turnend",
    "jsonlog",
    "timer",
    "headers",
    "policy",
    "metrics",
    "queue_depth",
    "loadshare",
    "peer",
    "capacity",
    "balance",
    "connect",
    "rawtransport",
    "upstream",
    "routes",
    "request",
    "events",
    "context",
    "exchange",
    "downstream",
)
# mypyc's shared library for the group, inside the package (see setup.py).
GROUP = "failproxy._compiled"


def _shared_library(package_dir: Path) -> Path | None:
    for path in package_dir.glob("_compiled__mypyc*" + importlib.machinery.EXTENSION_SUFFIXES[0]):
        return path
    return None


def _stale(package_dir: Path, library: Path) -> bool:
    """A source checkout whose hot sources changed after the compiled build was made."""
    if not (package_dir.parent / "pyproject.toml").exists():
        return False  # an installed wheel: its files are what was built
    built = library.stat().st_mtime
    if any((package_dir / f"{name}.py").stat().st_mtime > built for name in COMPILED):
        return True
    # The extension of a module no longer compiled would shadow its source.
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    return any(
        path.name[: -len(suffix)] not in COMPILED
        for path in package_dir.glob("*" + suffix)
        if path != library
    )


def _source_only(package_dir: Path) -> None:
    """Import failproxy's submodules from their .py files, skipping compiled extensions."""
    sys.path_importer_cache[str(package_dir)] = importlib.machinery.FileFinder(
        str(package_dir),
        (importlib.machinery.SourceFileLoader, importlib.machinery.SOURCE_SUFFIXES),
        (importlib.machinery.SourcelessFileLoader, importlib.machinery.BYTECODE_SUFFIXES),
    )


def select(package_dir: str) -> str:
    """Choose the build for this process; returns how `failproxy --version` names it:
    "compiled with mypyc", or "pure Python" with the reason when a compiled build exists."""
    directory = Path(package_dir)
    library = _shared_library(directory)
    if os.environ.get("FAILPROXY_PURE", "") not in ("", "0"):
        _source_only(directory)
        return "pure Python: FAILPROXY_PURE=1"
    if library is None:
        return "pure Python"
    if _stale(directory, library):
        _source_only(directory)
        print(
            "failproxy: the compiled build is older than its sources; running the pure-Python "
            "modules (run `make build` to compile them again)",
            file=sys.stderr,
        )
        return "pure Python: the compiled build is stale"
    return "compiled with mypyc"
