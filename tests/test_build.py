"""The build that runs is the one `make test` asked for: compiled by mypyc where a C compiler
exists (what `pip install .` gives users), pure Python with FAILPROXY_PURE=1 (what users without
a compiler get). A suite that silently tested the other build would prove nothing."""

from __future__ import annotations

import fnmatch
import importlib
import importlib.machinery
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import failproxy
from failproxy import _build

EXPECT = os.environ.get("FAILPROXY_EXPECT_BUILD", "")


def _files() -> dict[str, str]:
    return {name: str(importlib.import_module(f"failproxy.{name}").__file__)
            for name in _build.COMPILED}


@pytest.mark.skipif(EXPECT != "compiled", reason="FAILPROXY_EXPECT_BUILD is not 'compiled'")
def test_the_hot_modules_are_compiled() -> None:
    assert failproxy.BUILD == "compiled with mypyc and Cython"
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    assert {n: f for n, f in _files().items() if not f.endswith(suffix)} == {}
    cython = {name: str(importlib.import_module(f"failproxy.{name}").__file__)
              for name in _build.CYTHON}
    assert {n: f for n, f in cython.items() if not f.endswith(suffix)} == {}


@pytest.mark.skipif(EXPECT != "compiled", reason="FAILPROXY_EXPECT_BUILD is not 'compiled'")
def test_no_instrumented_build_is_left() -> None:
    """The profile-guided build (setup.py) compiles twice; what runs must be the second one. An
    instrumented extension left in place would run slower and write its counts on every exit."""
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    files = list(Path(failproxy.__file__).parent.rglob(f"*{suffix}"))
    assert files
    assert [str(f) for f in files if b"__gcov_" in f.read_bytes()] == []


@pytest.mark.skipif(EXPECT != "compiled", reason="FAILPROXY_EXPECT_BUILD is not 'compiled'")
def test_the_training_load_runs_on_this_build() -> None:
    """The load the profile-guided build trains on (failproxy._pgo) still gets every request
    answered 200 through this code: a load broken by a later change would fail `make build`
    under FAILPROXY_STRICT_BUILD, or train an install on error paths."""
    out = subprocess.run([sys.executable, "-m", "failproxy._pgo", "400"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout == f"failproxy._pgo: 400 requests through the {failproxy.BUILD} build\n"


@pytest.mark.skipif(EXPECT != "pure", reason="FAILPROXY_EXPECT_BUILD is not 'pure'")
def test_the_training_load_refuses_the_pure_build() -> None:
    out = subprocess.run([sys.executable, "-m", "failproxy._pgo", "40"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0
    assert "nothing to train" in out.stderr


@pytest.mark.skipif(EXPECT != "pure", reason="FAILPROXY_EXPECT_BUILD is not 'pure'")
def test_the_hot_modules_are_pure_python() -> None:
    assert failproxy.BUILD.startswith("pure Python")
    assert {n: f for n, f in _files().items() if not f.endswith(".py")} == {}
    for name in _build.CYTHON:  # hidden: its pure twin runs
        with pytest.raises(ImportError):
            importlib.import_module(f"failproxy.{name}")


def test_version_names_the_build() -> None:
    out = subprocess.run([sys.executable, "-m", "failproxy", "--version"], capture_output=True,
                         text=True, check=True).stdout
    assert out == f"failproxy {failproxy.__version__} ({failproxy.BUILD})\n"


# ---- what a user of this repository reads and installs ---------------------------------------
REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but - and _ dropped, spaces -."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors() -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    fence = False
    for line in README.splitlines():
        if line.startswith("```"):
            fence = not fence
        if fence or not line.startswith("#"):
            continue
        slug = _slug(line.lstrip("#"))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _sections() -> list[str]:
    return [ln[3:] for ln in README.splitlines() if ln.startswith("## ")]


def _section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else None]


def test_readme_speaks_to_users_of_this_repository_only() -> None:
    """No specification section numbers, issue numbers or paths outside the repository."""
    found = {
        pattern: re.findall(rf".{{0,30}}{pattern}.{{0,30}}", README)
        for pattern in (r"\bSPEC\b", r"\b[Ss]ection \d", r"\b[Ii]ssue #?\d", r"\.\./",
                        r"/work/", r"shared/")
    }
    assert {k: v for k, v in found.items() if v} == {}


def test_readme_links_resolve() -> None:
    anchors = _anchors()
    links = re.findall(r"\]\(([^)\s]+)\)", README)
    assert len(links) > 30
    broken = [link for link in links if link.startswith("#") and link[1:] not in anchors]
    assert broken == []
    files = [link.split("#")[0] for link in links if not link.startswith(("#", "http"))]
    assert [f for f in files if not (REPO / f).exists()] == []


def test_readme_contents_lists_every_section_in_order() -> None:
    contents = _section("Contents")
    listed = re.findall(r"^- \[([^\]]+)\]\(#([^)]+)\)", contents, re.M)
    sections = [s for s in _sections() if s != "Contents"]
    assert [title for title, _ in listed] == sections
    assert [anchor for _, anchor in listed] == [_slug(s) for s in sections]
    # the short top comes first: what it is and why, then the quick start, then the contents
    assert sections[:3] == ["Quick start", "Installing", "When not to use failproxy"]
    order = [README.index(f"\n## {s}\n") for s in ("Quick start", "Contents", "Installing")]
    assert order == sorted(order)
    assert "make demo" in _section("Quick start") and "make test" in _section("Quick start")


def test_readme_says_what_make_demo_installs() -> None:
    makefile = (REPO / "Makefile").read_text()
    demo = re.search(r"^demo:(.*)$", makefile, re.M)
    assert demo and "deb-deps" in demo.group(1).split()
    packages = re.search(r"^DEB_PACKAGES := (.*?)(?<!\\)\n", makefile, re.M | re.S)
    assert packages
    names = packages.group(1).replace("\\\n", " ").split()
    quick = " ".join(_section("Quick start").split())
    assert names and [n for n in names if n not in quick] == []
    assert "apt-get" in quick and "sudo" in quick


def test_license_is_mit_and_packaged() -> None:
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License\n")
    assert "Copyright (c) 2026 the failproxy authors" in text
    assert "THE SOFTWARE IS PROVIDED \"AS IS\"" in text
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    license_ = project["license"]
    assert license_ in ("MIT", {"text": "MIT"}), license_
    # setuptools puts LICEN[CS]E* into the wheel's and the sdist's metadata unless told otherwise
    patterns = project.get("license-files", ["LICEN[CS]E*"])
    assert any(fnmatch.fnmatch("LICENSE", p) for p in patterns)
    # the Docker build context lets through what builds the package (setup.py compiles it)
    dockerignore = (REPO / ".dockerignore").read_text().splitlines()
    assert {"!setup.py", "!LICENSE", "!pyproject.toml", "!README.md"} <= set(dockerignore)


def _setup_version(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`setup.py --version` where no C compiler is on PATH."""
    empty = tmp_path / "bin"
    empty.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, "setup.py", "--version"], cwd=REPO, text=True,
                          capture_output=True, timeout=120,
                          env={"PATH": str(empty), "HOME": str(tmp_path), **env})


def test_an_install_without_a_compiler_says_it_stays_pure(tmp_path: Path) -> None:
    r = _setup_version(tmp_path)
    assert r.returncode == 0, r.stderr
    assert "no C compiler" in r.stdout and "failproxy stays pure Python" in r.stdout
    assert r.stdout.rstrip().endswith(failproxy.__version__)
    strict = _setup_version(tmp_path, FAILPROXY_STRICT_BUILD="1")
    assert strict.returncode != 0
    assert "error: no C compiler" in strict.stderr
