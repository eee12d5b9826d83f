"""What the deployment files promise, checked without an engine (tests/docker-test.sh runs them
in a real one): the image's health check against a real proxy, and the timeouts that make a
`docker stop` a graceful drain instead of a SIGKILL.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support import REPO, free_port
from test_master import start_proxy, wait_until

from failproxy import config, healthcheck

pytestmark = pytest.mark.timeout(60)

DOCKERFILE = (REPO / "Dockerfile").read_text()
COMPOSE = (REPO / "deploy" / "compose.yaml").read_text()
DOCKER_STOP_DEFAULT = 10.0  # seconds: `docker stop` without -t


def run_check(config_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "failproxy.healthcheck", str(config_path)],
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
    assert 'CMD ["python", "-m", "failproxy.healthcheck", "/etc/failproxy/config.toml"]' \
        in DOCKERFILE
    assert 'VOLUME ["/var/run/app"]' in final
    # the final stage gets the virtualenv only: no pip install, no compiler
    assert not any("pip install" in ln or "apt-get" in ln for ln in final)
