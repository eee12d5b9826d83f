"""Build: the hot modules compiled by mypyc where a C compiler exists, plain Python otherwise.

Everything else about the package is in pyproject.toml. `FAILPROXY_PURE_BUILD=1` skips the
compiled build on purpose; a compiler or mypyc that fails leaves the pure-Python package (the
same source), with a warning. `FAILPROXY_STRICT_BUILD=1` (`make build`, the Docker image) makes
a missing compiler or a failed compile an error instead. `failproxy --version` says which build
an install runs.
"""

from __future__ import annotations

import os
import runpy
import shutil
import sysconfig
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext

BUILD = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                   "failproxy", "_build.py"))


class OptionalBuildExt(build_ext):
    """A compiled build that fails is not an install that fails: pure Python then."""

    def run(self) -> None:
        self._remove_stale()
        try:
            super().run()
        except Exception as exc:  # CompileError, LinkError, a missing header ...
            if _strict():
                raise
            print(f"warning: compiled build failed ({exc}); failproxy stays pure Python")
            for ext in self.extensions:
                path = self.get_ext_fullpath(ext.name)
                if os.path.exists(path):
                    os.remove(path)


    def _remove_stale(self) -> None:
        """A build (in place, or in build/ that a wheel is made from) keeps the extension of a
        module no longer compiled, which would shadow its .py: remove those first."""
        if self.inplace:
            package = os.path.join(os.path.dirname(os.path.abspath(__file__)), "failproxy")
        else:
            package = os.path.join(self.build_lib, "failproxy")
        if not os.path.isdir(package):
            return
        for directory, _, names in os.walk(package):
            below = os.path.relpath(directory, package)
            prefix = "" if below == "." else below.replace(os.sep, ".") + "."
            for name in names:
                stem = prefix + name.split(".", 1)[0]
                if (name.endswith(".so") and stem not in BUILD["COMPILED"] + BUILD["CYTHON"]
                        and "__mypyc" not in stem):
                    os.remove(os.path.join(directory, name))


def _compiler_found() -> bool:
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    return shutil.which(cc) is not None


def _strict() -> bool:
    return os.environ.get("FAILPROXY_STRICT_BUILD", "") not in ("", "0")


def ext_modules() -> list[Any]:
    if os.environ.get("FAILPROXY_PURE_BUILD", "") not in ("", "0"):
        print("FAILPROXY_PURE_BUILD is set: failproxy stays pure Python")
        return []
    if not _compiler_found():
        cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
        if _strict():
            raise SystemExit(f"error: no C compiler ({cc}) to compile failproxy's hot modules")
        print(f"warning: no C compiler ({cc}) found; failproxy stays pure Python")
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        print("warning: mypyc is not installed; failproxy stays pure Python")
        return []
    paths = [os.path.join("failproxy", *name.split(".")) + ".py" for name in BUILD["COMPILED"]]
    try:
        extensions = list(mypycify(paths, opt_level="3", group_name=BUILD["GROUP"]))
    except BaseException as exc:  # mypy's errors end in SystemExit: never a failed install
        if _strict():
            # `make build`: a developer must hear of it, not run the last good build unawares
            raise SystemExit(f"error: mypyc failed ({exc!r})") from None
        print(f"warning: mypyc failed ({exc!r}); failproxy stays pure Python")
        return []
    return extensions + cython_modules()


def cython_modules() -> list[Any]:
    """The .pyx twins (_build.CYTHON), each beside the pure-Python code it stands in for."""
    try:
        from Cython.Build import cythonize
    except ImportError:
        if _strict():
            raise SystemExit("error: Cython is not installed (pip install cython)") from None
        print("warning: Cython is not installed; its modules' pure-Python twins run instead")
        return []
    from setuptools import Extension

    modules = []
    for name in BUILD["CYTHON"]:
        sources, include_dirs = BUILD["CYTHON_C"].get(name, ((), ()))
        modules.append(Extension("failproxy." + name,
                                 [os.path.join("failproxy", *name.split(".")) + ".pyx",
                                  *sources],
                                 include_dirs=list(include_dirs)))
    return list(cythonize(modules, compiler_directives={"language_level": 3}, quiet=True))


setup(ext_modules=ext_modules(), cmdclass={"build_ext": OptionalBuildExt})
