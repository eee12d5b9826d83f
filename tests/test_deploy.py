"""What the deployment files promise, checked without an engine (tests/docker-test.sh runs them
in a real one): the image's health check against a real proxy, and the timeouts that make a
`docker stop` a graceful drain instead of a SIGKILL.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support import REPO, free_port
from test_master import gone, start_proxy, status, wait_until

from failproxy import config
from failproxy.process import healthcheck

pytestmark = pytest.mark.timeout(60)

DOCKERFILE = (REPO / "Dockerfile").read_text()
COMPOSE = (REPO / "deploy" / "compose.yaml").read_text()
DOCKER_STOP_DEFAULT = 10.0  # seconds: `docker stop` without -t


def run_check(config_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "failproxy.process.healthcheck", str(config_path)],
                          capture_output=True, text=True, timeout=30, cwd=REPO,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})


def test_healthcheck_asks_the_admin_endpoint_of_the_config(
        tmp_path: Path, backend: Any, sockdir: Path) -> None:
    proxy = start_proxy(tmp_path / "p", [backend("app")])
    try:
        r = run_check(proxy.config_path)
        assert r.returncode == 0 and r.stdout == f"{proxy.admin_listen}: 200 ok\n", r  # type: ignore[attr-defined]
        # a wildcard admin address is asked on loopback; a unix: one over its socket
        port = int(proxy.admin_listen.rsplit(":", 1)[1])  # type: ignore[attr-defined]
        wildcard = tmp_path / "wildcard.toml"
        wildcard.write_text(f'[admin]\nlisten = "0.0.0.0:{port}"\n')
        assert run_check(wildcard).returncode == 0
        proxy.send_signal(signal.SIGQUIT)
        wait_until(lambda: proxy.wait_exit(0.1) is not None, 20, "the proxy stopped")
        r = run_check(proxy.config_path)
        assert r.returncode == 1 and r.stdout.startswith(proxy.admin_listen), r  # type: ignore[attr-defined]
    finally:
        proxy.stop()
    unix = start_proxy(tmp_path / "u", [backend("app2")])
    try:
        admin_sock = sockdir / "admin.sock"
        text = unix.config_path.read_text().replace(
            f'listen = "{unix.admin_listen}"', f'listen = "unix:{admin_sock}"')  # type: ignore[attr-defined]
        unix.config_path.write_text(text)
        since = unix.log.mark()
        unix.send_signal(signal.SIGHUP)
        unix.log.wait_for_event("reloaded", since=since, timeout=15)
        r = run_check(unix.config_path)
        assert r.returncode == 0 and r.stdout == f"unix:{admin_sock}: 200 ok\n", r
    finally:
        unix.stop()


def test_healthcheck_fails_without_an_admin_endpoint(tmp_path: Path) -> None:
    none = tmp_path / "none.toml"
    none.write_text('[[upstream.server]]\naddress = "unix:/tmp/x.sock"\n')
    r = run_check(none)
    assert r.returncode == 1 and "no admin.listen" in r.stdout, r
    closed = tmp_path / "closed.toml"
    closed.write_text(f'[admin]\nlisten = "127.0.0.1:{free_port()}"\n')
    r = run_check(closed)
    assert r.returncode == 1 and "refused" in r.stdout.lower(), r
    assert run_check(tmp_path / "missing.toml").returncode == 1
    assert healthcheck.main([str(none)]) == 1


def test_the_image_default_config_drains_within_dockers_default_stop_timeout() -> None:
    cfg = config.load(str(REPO / "deploy" / "docker.toml"))
    assert cfg.admin.listen is not None and cfg.admin.listen.host == "127.0.0.1"
    assert [s.address.text for s in cfg.upstream.servers] == ["unix:/var/run/app/app.sock"]
    # a couple of seconds for the workers to exit and the master to follow
    assert cfg.server.shutdown_timeout + 2 <= DOCKER_STOP_DEFAULT
    assert "COPY deploy/docker.toml /etc/failproxy/config.toml" in DOCKERFILE


def test_compose_gives_the_sidecar_longer_than_its_shutdown_timeout() -> None:
    cfg = config.load(str(REPO / "deploy" / "sidecar.toml"))
    grace = re.search(r"^\s+stop_grace_period:\s*(\d+)s\s*$", COMPOSE, re.M)
    assert grace, "no stop_grace_period in deploy/compose.yaml"
    assert cfg.server.shutdown_timeout + 2 <= int(grace.group(1))
    assert "${FAILPROXY_CONFIG:-./sidecar.toml}:/etc/failproxy/config.toml:ro" in COMPOSE
    assert cfg.admin.listen is not None and cfg.upstream.servers[0].address.is_unix


def test_dockerfile_shape() -> None:
    lines = [ln for ln in DOCKERFILE.splitlines() if ln and not ln.startswith("#")]
    assert lines[0] == "ARG BASE=python:3.11-slim"
    froms = [ln for ln in lines if ln.startswith("FROM ")]
    assert froms == ["FROM ${BASE} AS build", "FROM ${BASE}"]
    final = lines[lines.index("FROM ${BASE}"):]
    user = [ln for ln in final if ln.startswith("USER ")]
    assert user == ["USER failproxy:failproxy"]
    assert "STOPSIGNAL SIGQUIT" in final
    assert any(ln.startswith("HEALTHCHECK ") for ln in final)
    assert 'CMD ["python", "-m", "failproxy.process.healthcheck", "/etc/failproxy/config.toml"]' \
        in DOCKERFILE
    assert 'VOLUME ["/var/run/app"]' in final
    # the final stage gets the virtualenv only: no pip install, no compiler
    assert not any("pip install" in ln or "apt-get" in ln for ln in final)


def test_the_image_is_compiled_or_its_build_says_why() -> None:
    """The build stage runs `failproxy --version` and fails unless it says compiled, or
    BUILD=pure asked for the pure-Python build (tests/docker-test.sh builds both in an engine)."""
    lines = [ln for ln in DOCKERFILE.splitlines() if ln and not ln.startswith("#")]
    build = lines[lines.index("FROM ${BASE} AS build"):lines.index("FROM ${BASE}")]
    assert "ARG BUILD=compiled" in build
    stage = "\n".join(build)
    assert "version=$(/opt/failproxy/bin/failproxy --version)" in stage
    assert '"${version%(compiled with mypyc and Cython)}" = "$version"' in stage
    assert "not the compiled build" in stage and "exit 1" in stage
    assert "FAILPROXY_STRICT_BUILD=1 /opt/failproxy/bin/pip install /src" in stage
    assert "(compiled with mypyc and Cython)" in (REPO / "README.md").read_text()


# ---- deploy/failproxy.service --------------------------------------------------------------------
UNIT_PATH = REPO / "deploy" / "failproxy.service"
UNIT_BIN = "/usr/local/bin/failproxy"
UNIT_CONFIG = "/etc/failproxy/config.toml"


def unit_directives() -> dict[str, list[str]]:
    """[Service] Key=value lines, in order (ExecReload= may repeat)."""
    out: dict[str, list[str]] = {}
    section = ""
    for line in UNIT_PATH.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
            continue
        key, _, value = line.partition("=")
        if section == "[Service]":
            out.setdefault(key, []).append(value)
    return out


def test_systemd_unit_signals_and_limits_fit_failproxy() -> None:
    unit = unit_directives()
    defaults = config.ServerConfig()
    assert unit["ExecStart"] == [f"{UNIT_BIN} serve {UNIT_CONFIG}"]
    assert unit["ExecReload"] == [f"{UNIT_BIN} check {UNIT_CONFIG}", "/bin/kill -HUP $MAINPID"]
    assert unit["KillSignal"] == ["SIGQUIT"]  # the graceful stop, not systemd's TERM
    assert unit["KillMode"] == ["mixed"]
    # systemd's SIGKILL comes only after the drain had its shutdown_timeout
    assert float(unit["TimeoutStopSec"][0]) >= defaults.shutdown_timeout + 2
    assert int(unit["LimitNOFILE"][0]) > 2 * defaults.max_connections
    (pid_file,) = unit["PIDFile"]
    assert pid_file == f"/run/{unit['RuntimeDirectory'][0]}/failproxy.pid"
    # what the unit's header and the README tell users to put in the config
    assert f'server.pid_file = "{pid_file}"' in UNIT_PATH.read_text()
    assert f'pid_file = "{pid_file}"' in (REPO / "README.md").read_text()


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    binary = Path(sys.executable).parent / "failproxy"
    if not binary.exists():
        pytest.skip(f"no {binary}: the failproxy command is not installed next to {sys.executable}")
    # the same unit, with ExecStart= naming where failproxy is installed on this machine
    unit = tmp_path / "failproxy.service"
    unit.write_text(UNIT_PATH.read_text().replace(UNIT_BIN, str(binary)))
    r = subprocess.run([analyze, "verify", "--man=no", "--generators=no", str(unit)],
                       capture_output=True, text=True, timeout=60)
    complaints = [ln for ln in (r.stdout + r.stderr).splitlines() if "failproxy" in ln]
    assert r.returncode == 0 and complaints == [], r


def test_the_units_reload_and_upgrade_commands_as_systemd_runs_them(
        tmp_path: Path, backend: Any) -> None:
    """ExecReload= and the USR2 procedure of the unit's header, with MainPID followed through
    PIDFile= as systemd does when the main process exits; then KillSignal= stops it."""
    unit = unit_directives()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    pid_file = run_dir / Path(unit["PIDFile"][0]).name
    proxy = start_proxy(tmp_path / "p", [backend("app")], server={"pid_file": str(pid_file)})
    binary = f"{sys.executable} -m failproxy"
    main_pid = proxy.pid
    new_master = 0
    try:
        since = proxy.log.mark()
        for command in unit["ExecReload"]:
            line = command.replace(UNIT_BIN, binary).replace(UNIT_CONFIG, str(proxy.config_path))
            line = line.replace("$MAINPID", str(main_pid))
            subprocess.run(line.split(), check=True, capture_output=True, timeout=60,
                           env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
        proxy.log.wait_for_event("reloaded", since=since, timeout=15)
        # the upgrade: kill -USR2 $MAINPID
        header = UNIT_PATH.read_text()
        assert 'kill -USR2 "$(systemctl show --property=MainPID --value failproxy)"' in header
        os.kill(main_pid, signal.SIGUSR2)
        assert proxy.wait_exit(30) == 0  # the old master hands over, drains, exits
        new_master = int(pid_file.read_text())  # what systemd reads at the main process's exit
        assert new_master != main_pid and not gone(new_master)
        assert status(proxy)["pid"] == new_master
        assert not Path(f"{pid_file}.oldbin").exists()
        # systemctl stop: KillSignal= to the main process, then it must be gone in time
        os.kill(new_master, getattr(signal, unit["KillSignal"][0]))
        wait_until(lambda: gone(new_master), float(unit["TimeoutStopSec"][0]), "the stop")
        assert not pid_file.exists()  # no stale PID for systemd to follow
    finally:
        if new_master and not gone(new_master):
            os.kill(new_master, signal.SIGKILL)
        proxy.stop()
