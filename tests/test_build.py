"""The build that runs is the one `make test` asked for: compiled by mypyc where a C compiler
exists (what `pip install .` gives users), pure Python with FAILPROXY_PURE=1 (what users without
a compiler get). A suite that silently tested the other build would prove nothing."""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import subprocess
import sys

import pytest

import failproxy
from failproxy import _build

EXPECT = os.environ.get("FAILPROXY_EXPECT_BUILD", "")


def _files() -> dict[str, str]:
    return {name: str(importlib.import_module(f"failproxy.{name}").__file__)
            for name in _build.COMPILED}


@pytest.mark.skipif(EXPECT != "compiled", reason="FAILPROXY_EXPECT_BUILD is not 'compiled'")
def test_the_hot_modules_are_compiled() -> None:
    assert failproxy.BUILD == "compiled with mypyc"
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    assert {n: f for n, f in _files().items() if not f.endswith(suffix)} == {}


@pytest.mark.skipif(EXPECT != "pure", reason="FAILPROXY_EXPECT_BUILD is not 'pure'")
def test_the_hot_modules_are_pure_python() -> None:
    assert failproxy.BUILD.startswith("pure Python")
    assert {n: f for n, f in _files().items() if not f.endswith(".py")} == {}


def test_version_names_the_build() -> None:
    out = subprocess.run([sys.executable, "-m", "failproxy", "--version"], capture_output=True,
                         text=True, check=True).stdout
    assert out == f"failproxy {failproxy.__version__} ({failproxy.BUILD})\n"
