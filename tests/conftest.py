"""Shared fixtures: short socket directories, backends and failproxy processes torn down after
each test."""

from __future__ import annotations

import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from backends import HTTPBackend, TcpBlackhole, WSEchoBackend
from support import Proxy


def _interrupted(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    """SIGTERM stops the run as Ctrl-C does, fixtures torn down: `make test` runs a pytest in
    the background (where SIGINT is ignored) and stops it so; the failproxy processes a test
    started run in sessions of their own and would outlive a plain kill."""
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupted)
    config.addinivalue_line(
        "markers",
        "shares: the overflow policy's shares of real traffic over real unicorn boxes. They "
        "run on the compiled build; the pure-Python run (`-m 'not shares'`) checks the same "
        "policy code through its in-process tests: on the slower build a fully loaded "
        "machine moves the shares by timing alone.",
    )


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for UNIX socket paths (sun_path holds 107 bytes; tmp_path may not fit)."""
    d = Path(tempfile.mkdtemp(prefix="fpt-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def backend(sockdir: Path) -> Iterator[Callable[..., HTTPBackend]]:
    """`backend("a")` on a free TCP port, `backend("a", unix=True)` on sockdir/a.sock."""
    made: list[HTTPBackend] = []

    def make(name: str, unix: bool = False, **kw: Any) -> HTTPBackend:
        address = f"unix:{sockdir / (name + '.sock')}" if unix else "127.0.0.1:0"
        b = HTTPBackend(name, address, **kw)
        made.append(b)
        return b

    yield make
    for b in made:
        b.stop()


@pytest.fixture
def blackhole() -> Iterator[Callable[[], TcpBlackhole]]:
    made: list[TcpBlackhole] = []

    def make() -> TcpBlackhole:
        b = TcpBlackhole()
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()


@pytest.fixture
def ws_backend() -> Iterator[WSEchoBackend]:
    b = WSEchoBackend()
    yield b
    b.stop()


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[Callable[..., Proxy]]:
    """`proxy(servers, upstream={...}, server={...}, headers={...})` -> a started failproxy."""
    made: list[Proxy] = []

    def start(servers: list[Any], **kw: Any) -> Proxy:
        p = Proxy(tmp_path / f"proxy{len(made)}", servers, **kw)
        made.append(p)
        return p.start()

    yield start
    for p in made:
        p.stop()
