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
    "telemetry.turnend",
    "telemetry.jsonlog",
    "proxy.timer",
    "proxy.headers",
    "routing.policy",
    "telemetry.metrics",
    "routing.queue_depth",
    "routing.loadshare",
    "routing.localbooks",
    "routing.peer",
    "routing.capacity",
    "routing.balance",
    "proxy.connect",
    "proxy.rawtransport",
    "proxy.responseparser",
    "proxy.requestparser",
    "proxy.upstream",
    "routing.routes",
    "proxy.request",
    "proxy.events",
    "proxy.context",
    "proxy.corebooks",
    "proxy.exchange",
    "proxy.downstream",
)
# mypyc's shared library for the group, inside the package (see setup.py).
GROUP = "failproxy._compiled"
# Written in Cython (a .pyx each), each the twin of pure-Python code that a plain module selects
# at import (telemetry/accessline.py, telemetry/slot.py, routing/loadshare.py,
# routing/localbooks.py, proxy/headers.py, proxy/rawtransport.py, proxy/responseparser.py and
# proxy/requestparser.py, both from
# proxy/_llhttp.pyx; proxy/_reuse.pyx has none: proxy/upstream.py reuses nothing without it, nor
# has proxy/_core.pyx: proxy/core.py runs the Python relay alone without it):
# compiled beside the mypyc group where Cython is present.
CYTHON = (
    "telemetry._accessline", "telemetry._slot", "routing._loadview", "routing._localbooks",
    "proxy._heads", "proxy._llhttp", "proxy._sockio", "proxy._reuse", "proxy._core",
)
# C sources compiled into a Cython module beside its .pyx, and their include directories
# (relative to the repository): llhttp, the parser httptools bundles, at httptools' version.
_LLHTTP = (
    ("vendor/llhttp/src/llhttp.c", "vendor/llhttp/src/api.c", "vendor/llhttp/src/http.c"),
    ("vendor/llhttp/include",),
)
CYTHON_C = {"proxy._llhttp": _LLHTTP, "proxy._core": _LLHTTP}


def _shared_library(package_dir: Path) -> Path | None:
    for path in package_dir.glob("_compiled__mypyc*" + importlib.machinery.EXTENSION_SUFFIXES[0]):
        return path
    return None


def _stale(package_dir: Path, library: Path) -> bool:
    """A source checkout whose hot sources changed after the compiled build was made."""
    if not (package_dir.parent / "pyproject.toml").exists():
        return False  # an installed wheel: its files are what was built
    built = library.stat().st_mtime
    if any(_source(package_dir, name).stat().st_mtime > built for name in COMPILED):
        return True
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    for name in CYTHON:
        extension = package_dir.joinpath(*name.split(".")).with_suffix(suffix)
        for kind in (".pyx", ".pxd"):
            source = extension.with_name(extension.name[: -len(suffix)] + kind)
            if (extension.exists() and source.exists()
                    and source.stat().st_mtime > extension.stat().st_mtime):
                return True
    # The extension of a module no longer compiled would shadow its source.
    return any(
        _dotted(package_dir, path)[: -len(suffix)] not in COMPILED + CYTHON
        for path in package_dir.rglob("*" + suffix)
        if path != library
    )


def _source(package_dir: Path, name: str) -> Path:
    """The .py file of a COMPILED name ("proxy.exchange" -> proxy/exchange.py)."""
    return package_dir.joinpath(*name.split(".")).with_suffix(".py")


def _dotted(package_dir: Path, path: Path) -> str:
    """A file's module name below the package, with its file suffix ("proxy.exchange.so")."""
    return ".".join(path.relative_to(package_dir).parts)


def _source_only(package_dir: Path) -> None:
    """Import failproxy's modules from their .py files, skipping compiled extensions: the
    package's directory and each sub-package's get a finder that knows only sources."""
    for directory in (package_dir, *(p.parent for p in package_dir.glob("*/__init__.py"))):
        sys.path_importer_cache[str(directory)] = _source_finder(directory)


def _source_finder(directory: Path) -> importlib.machinery.FileFinder:
    return importlib.machinery.FileFinder(
        str(directory),
        (importlib.machinery.SourceFileLoader, importlib.machinery.SOURCE_SUFFIXES),
        (importlib.machinery.SourcelessFileLoader, importlib.machinery.BYTECODE_SUFFIXES),
    )


def _cython_built(package_dir: Path) -> bool:
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    return all(package_dir.joinpath(*name.split(".")).with_suffix(suffix).exists()
               for name in CYTHON)


def select(package_dir: str) -> str:
    """Choose the build for this process; returns how `failproxy --version` names it:
    "compiled with mypyc and Cython" (or "compiled with mypyc" where Cython was missing), or
    "pure Python" with the reason when a compiled build exists. Pure Python means no compiled
    module at all: a Cython extension without the mypyc build is not used either."""
    directory = Path(package_dir)
    library = _shared_library(directory)
    if os.environ.get("FAILPROXY_PURE", "") not in ("", "0"):
        _source_only(directory)
        return "pure Python: FAILPROXY_PURE=1"
    if library is None:
        _source_only(directory)
        return "pure Python"
    if _stale(directory, library):
        _source_only(directory)
        print(
            "failproxy: the compiled build is older than its sources; running the pure-Python "
            "modules (run `make build` to compile them again)",
            file=sys.stderr,
        )
        return "pure Python: the compiled build is stale"
    return "compiled with mypyc and Cython" if _cython_built(directory) else "compiled with mypyc"
