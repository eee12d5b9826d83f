"""Build: the hot modules compiled by mypyc where a C compiler exists, plain Python otherwise.

Everything else about the package is in pyproject.toml. `FAILPROXY_PURE_BUILD=1` skips the
compiled build on purpose; a compiler or mypyc that fails leaves the pure-Python package (the
same source), with a warning. `FAILPROXY_STRICT_BUILD=1` (`make build`, the Docker image) makes
a missing compiler or a failed compile an error instead. `failproxy --version` says which build
an install runs.

With GCC (10 or later) the compiled build is profile-guided: compiled instrumented, run on
`failproxy._pgo`'s load, compiled again with the counts that load left (`-fprofile-use`), as
CPython's `--enable-optimizations` does; `FAILPROXY_PGO=0` compiles once, without a profile
(bench/PROFILE.md, "A profile-guided build": -20 % of the front's user time in the seed's
layout). A training load that fails is an error under FAILPROXY_STRICT_BUILD, else a warning
and a build without a profile.
"""

from __future__ import annotations

import os
import re
import runpy
import shutil
import subprocess
import sys
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
            why_not = _no_pgo() if self.extensions else "nothing to compile"
            if why_not:
                if self.extensions:
                    print(f"failproxy: compiled without a profile ({why_not})")
                super().run()
            else:
                self._profile_guided()
        except Exception as exc:  # CompileError, LinkError, a missing header ...
            if _strict():
                raise
            print(f"warning: compiled build failed ({exc}); failproxy stays pure Python")
            for ext in self.extensions:
                path = self.get_ext_fullpath(ext.name)
                if os.path.exists(path):
                    os.remove(path)


    def _profile_guided(self) -> None:
        """Compile instrumented, run the training load on that build, compile again with the
        counts it left; the same build directory throughout (the counts are found by the
        objects' paths)."""
        compiler = self.compiler  # run() replaces the name with the compiler it made
        self._remove(".gcda")  # an earlier build's counts would be added to this one's
        self._flags(["-fprofile-generate"], ["-fprofile-generate"])
        self.force = True  # each time compiled again, whatever the timestamps say
        try:
            super().run()
        except Exception as exc:  # e.g. no libgcov to link: a build without a profile still
            if _strict():
                raise
            failed = f"the instrumented build failed: {exc}"
        else:
            failed = _train(os.path.dirname(os.path.abspath(__file__)) if self.inplace
                            else os.path.abspath(self.build_lib))
        if failed:
            if _strict():
                raise SystemExit(f"error: the profile-guided build failed:\n{failed}")
            print(f"warning: compiled without a profile:\n{failed}")
            self._flags([], [])
        else:
            self._flags(["-fprofile-use", "-fprofile-partial-training", "-Wno-missing-profile"],
                        [])
        self.compiler = compiler
        super().run()

    def _flags(self, compile_args: list[str], link_args: list[str]) -> None:
        for ext in self.extensions:
            if not hasattr(ext, "failproxy_args"):  # what mypyc or Cython set, kept
                ext.failproxy_args = (list(ext.extra_compile_args or []),
                                      list(ext.extra_link_args or []))
            ext.extra_compile_args = ext.failproxy_args[0] + compile_args
            ext.extra_link_args = ext.failproxy_args[1] + link_args

    def _remove(self, suffix: str) -> None:
        for directory, _, names in os.walk(self.build_temp):
            for name in names:
                if name.endswith(suffix):
                    os.remove(os.path.join(directory, name))

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


def _no_pgo() -> str:
    """Why the compiled build is not profile-guided; "" when it is."""
    if os.environ.get("FAILPROXY_PGO", "1") in ("", "0"):
        return "FAILPROXY_PGO=0"
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    try:
        said = subprocess.run([cc, "-v"], capture_output=True, text=True, timeout=60).stderr
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{cc} -v: {exc}"
    version = re.search(r"^gcc version (\d+)", said, re.MULTILINE)
    if version is None:
        return f"{cc} is not GCC"
    if int(version.group(1)) < 10:  # -fprofile-partial-training
        return f"GCC {version.group(1)}, not 10 or later"
    return ""


def _train(root: str) -> str:
    """`failproxy._pgo`'s load on the instrumented build found at `root`; "" when it ran, else
    what it said. Each instrumented module writes its counts as the process exits."""
    env = dict(os.environ)
    # first, before what is there already (pip's isolated build finds its packages that way)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env.pop("FAILPROXY_PURE", None)
    try:
        done = subprocess.run([sys.executable, "-m", "failproxy._pgo"], env=env, cwd=root,
                              capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    print(done.stdout.strip())
    return "" if done.returncode == 0 else (done.stdout + done.stderr)[-3000:]


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
