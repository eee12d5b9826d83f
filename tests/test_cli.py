"""The command line (SPEC 2): exit codes and output, as `python -m failproxy` shows them."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import failproxy
from failproxy import cli

ROOT = Path(__file__).resolve().parent.parent

VALID = """
[upstream]
self = "127.0.1.2:9000"
[[upstream.server]]
address = "unix:/tmp/app.sock"
[[upstream.server]]
address = "127.0.1.1:9000"
backup = true
[[upstream.server]]
address = "127.0.1.2:9000"
backup = true
[[upstream.server]]
address = "127.0.1.3:9000"
backup = true
"""

INVALID = """
[server]
workers = -1
[upstream]
retry_on = ["connect", "bogus"]
[[upstream.server]]
address = "unix:/tmp/app.sock"
[[upstream.server]]
address = "foo"
[headers]
bogus = true
"""


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "failproxy", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=60,
    )


@pytest.fixture
def valid(tmp_path: Path) -> Path:
    path = tmp_path / "failproxy.toml"
    path.write_text(VALID)
    return path


@pytest.fixture
def invalid(tmp_path: Path) -> Path:
    path = tmp_path / "failproxy.toml"
    path.write_text(INVALID)
    return path


def test_check_valid_prints_ok_and_the_order(valid: Path) -> None:
    result = run("check", str(valid))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "ok",
        "1. unix:/tmp/app.sock (primary)",
        "2. 127.0.1.3:9000 (backup)",
        "3. 127.0.1.1:9000 (backup)",
        "4. 127.0.1.2:9000 (backup, self: tried last)",
        "overflow: room (upstream.overflow): the UNIX socket while the box has an idle worker "
        "(learned), else the least-loaded backup with room (its concurrency learned), else held "
        "up to upstream.hold_timeout = 2 s, then where its expected wait is least; a box whose "
        "answers all came within upstream.slow_after = 0.05 s waits for its own workers; "
        'overflow = "ring" for the order alone',
        "routes: slow when learned slower than routes.slow_ms = 200 ms or under routes.slow = "
        "none; always fast under routes.fast = none; a slow-route request waits in failproxy "
        "after fast ones, never shed (routes.shed_after = 0)",
    ]
    assert result.stderr == ""


def test_check_relative_path(valid: Path) -> None:
    result = run("check", valid.name, cwd=valid.parent)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok\n")


def test_check_invalid_prints_every_problem_on_its_own_line(invalid: Path) -> None:
    result = run("check", str(invalid))
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert [line.split(":", 1)[0] for line in lines] == [
        "server.workers",
        "upstream.retry_on[1]",
        "upstream.server[1].address",
        "headers.bogus",
    ]
    assert lines[2] == (
        "upstream.server[1].address: expected HOST:PORT, [V6]:PORT or unix:/absolute/path,"
        " got 'foo'"
    )
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "cannot read the config file"),
        ("[server\n", "invalid TOML"),
    ],
)
def test_check_unreadable_is_one_line(tmp_path: Path, content: str | None, problem: str) -> None:
    path = tmp_path / "failproxy.toml"
    if content is not None:
        path.write_text(content)
    result = run("check", str(path))
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"{path}: {problem}")


def test_serve_invalid_config_exits_1_without_serving(invalid: Path) -> None:
    result = run("serve", str(invalid))
    assert result.returncode == 1
    assert result.stderr.splitlines()[0].startswith("server.workers: ")
    assert "Traceback" not in result.stderr


def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout == f"failproxy {failproxy.__version__} ({failproxy.BUILD})\n"


def test_version_matches_the_package_metadata() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert failproxy.__version__ == pyproject["project"]["version"]


@pytest.mark.parametrize(
    "args",
    [
        (),
        ("bogus",),
        ("check",),
        ("serve",),
        ("check", "a.toml", "b.toml"),
        ("serve", "a.toml", "--bogus"),
        ("--bogus", "check", "a.toml"),
    ],
)
def test_bad_usage_exits_2(args: tuple[str, ...]) -> None:
    result = run(*args)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: failproxy")
    assert result.stdout == ""


def test_help_exits_0() -> None:
    result = run("--help")
    assert result.returncode == 0
    for command in ("serve", "check", "demo"):
        assert command in result.stdout


# In-process: dispatch to the modules others own, without running them.


def test_main_returns_instead_of_exiting(valid: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check", str(valid)]) == 0
    assert capsys.readouterr().out.startswith("ok\n")
    assert cli.main(["--version"]) == 0
    assert cli.main([]) == 2


def test_serve_runs_the_master_with_the_path(valid: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from failproxy.process import master

    calls: list[str] = []

    def fake_serve(path: str) -> int:
        calls.append(path)
        return 7

    monkeypatch.setattr(master, "serve", fake_serve)
    assert cli.main(["serve", str(valid)]) == 7
    assert calls == [str(valid)]


def test_serve_invalid_config_never_reaches_the_master(
    invalid: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from failproxy.process import master

    monkeypatch.setattr(master, "serve", lambda path: pytest.fail("master.serve called"))
    assert cli.main(["serve", str(invalid)]) == 1
    assert len(capsys.readouterr().err.splitlines()) == 4


@pytest.mark.parametrize(
    "rest",
    [[], ["--requests", "50"], ["--duration", "2", "--quiet"], ["--help"], ["x", "--y=1", "z"]],
)
def test_demo_gets_every_argument_after_it(
    rest: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from failproxy.demo import cluster as demo

    calls: list[list[str]] = []

    def fake_main(argv: list[str]) -> int:
        calls.append(argv)
        return 0

    monkeypatch.setattr(demo, "main", fake_main)
    assert cli.main(["demo", *rest]) == 0
    assert calls == [rest]
