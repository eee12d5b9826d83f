"""TLS as an edge server needs it (failproxy/tls.py), with real clients: curl and openssl s_client.

A certificate renewed on disk is served after HUP without a restart; a broken one fails the
reload (`reload_failed`) and the old one stays in service; ALPN says `http/1.1`; TLS 1.0/1.1
are refused by the server; the master reads the key, so workers running as `server.user` need
no access to it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import REPO, Proxy, free_port
from test_master import start_proxy, status, uid_of, wait_until

from failproxy import tls

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(not (shutil.which("openssl") and shutil.which("curl")),
                       reason="needs openssl and curl (make deb-deps installs them)"),
]


def make_pair(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for localhost / 127.0.0.1 (its own CA for curl --cacert)."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-subj", f"/CN=localhost/O={name}", "-days", "2",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=30)
    return cert, key


@pytest.fixture
def pairs(tmp_path: Path) -> Iterator[dict[str, tuple[Path, Path]]]:
    d = tmp_path / "pki"
    d.mkdir()
    yield {name: make_pair(d, name) for name in ("first", "renewed")}


def curl(port: int, cacert: Path) -> subprocess.CompletedProcess[str]:
    """GET / over https://localhost:PORT, verifying the server against `cacert` only."""
    return subprocess.run(
        ["curl", "-sS", "--max-time", "10", "--cacert", str(cacert),
         "--resolve", f"localhost:{port}:127.0.0.1",
         "-w", "\n%{http_code} %{http_version}", f"https://localhost:{port}/tls"],
        capture_output=True, text=True, timeout=20)


def assert_serves(port: int, cacert: Path) -> None:
    r = curl(port, cacert)
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith("\n200 1.1"), r.stdout  # ALPN picked http/1.1 over curl's h2


def assert_rejected_by(port: int, cacert: Path) -> None:
    r = curl(port, cacert)
    assert r.returncode == 60, (r.returncode, r.stdout, r.stderr)  # peer certificate not trusted


def s_client(port: int, cacert: Path, *args: str) -> str:
    r = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
         "-CAfile", str(cacert), "-verify_return_error", *args],
        input="", capture_output=True, text=True, timeout=20)
    return r.stdout + r.stderr


def tls_proxy(workdir: Path, app: Any, cert: Path, key: Path, **server: Any) -> tuple[Proxy, int]:
    port = free_port()
    proxy = start_proxy(workdir, [app], server={
        "workers": 1, "tls_listen": [f"127.0.0.1:{port}"], "tls_cert": str(cert),
        "tls_key": str(key), **server})
    return proxy, port


def hup(proxy: Proxy, event: str) -> dict[str, Any]:
    since = proxy.log.mark()
    proxy.send_signal(signal.SIGHUP)
    found = proxy.log.wait_for_event(event, since=since, timeout=15)
    if event == "reloaded":
        wait_until(lambda: not status(proxy)["retiring"], 15, "the old worker exited")
    return found


def test_hup_serves_a_renewed_certificate_and_keeps_the_old_one_when_broken(
        tmp_path: Path, backend: Any, pairs: dict[str, tuple[Path, Path]]) -> None:
    app = backend("app")
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "cert.pem", live / "key.pem"
    shutil.copy(pairs["first"][0], cert)
    shutil.copy(pairs["first"][1], key)
    proxy, port = tls_proxy(tmp_path / "proxy", app, cert, key)
    try:
        assert_serves(port, pairs["first"][0])
        assert_rejected_by(port, pairs["renewed"][0])

        # renewal: new files at the same paths, then HUP; no restart
        master = proxy.pid
        shutil.copy(pairs["renewed"][0], cert)
        shutil.copy(pairs["renewed"][1], key)
        hup(proxy, "reloaded")
        assert proxy.pid == master and proxy.alive()
        assert_serves(port, pairs["renewed"][0])
        assert_rejected_by(port, pairs["first"][0])

        # a broken certificate: the reload fails and the renewed one stays in service
        generation = status(proxy)["generation"]
        cert.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n")
        failed = hup(proxy, "reload_failed")
        assert failed["detail"].startswith("server.tls_cert: "), failed
        assert_serves(port, pairs["renewed"][0])

        # a key that does not match the certificate: the reload fails, naming the key
        shutil.copy(pairs["renewed"][0], cert)
        shutil.copy(pairs["first"][1], key)
        failed = hup(proxy, "reload_failed")
        assert failed["detail"].startswith("server.tls_key: "), failed
        assert "does not match" in failed["detail"]
        assert status(proxy)["generation"] == generation
        assert_serves(port, pairs["renewed"][0])
    finally:
        proxy.stop()


def test_alpn_is_http11_and_tls_below_12_is_refused_by_the_server(
        tmp_path: Path, backend: Any, pairs: dict[str, tuple[Path, Path]]) -> None:
    cert, key = pairs["first"]
    proxy, port = tls_proxy(tmp_path / "proxy", backend("app"), cert, key)
    try:
        out = s_client(port, cert, "-alpn", "h2,http/1.1")
        assert "ALPN protocol: http/1.1" in out, out
        assert "Verify return code: 0 (ok)" in out, out
        assert "No ALPN negotiated" in s_client(port, cert, "-alpn", "h2")  # h2 is not spoken
        assert "Protocol  : TLSv1.2" in s_client(port, cert, "-tls1_2")
        # SECLEVEL=0 lets this client offer the old versions, so a refusal is the server's:
        # the client sent its hello and got no certificate back (uvloop closes the connection
        # without an alert)
        lenient = ("-cipher", "DEFAULT@SECLEVEL=0")
        assert "Protocol  : TLSv1.2" in s_client(port, cert, "-tls1_2", *lenient)
        for old in ("-tls1", "-tls1_1"):
            out = s_client(port, cert, old, *lenient)
            sent = re.search(r"SSL handshake has read \d+ bytes and written (\d+) bytes", out)
            assert sent and int(sent.group(1)) > 0, out
            assert "no peer certificate available" in out and "Cipher is (NONE)" in out, out
            assert "no protocols available" not in out, out
    finally:
        proxy.stop()


def test_workers_serve_a_key_only_root_can_read(
        tmp_path: Path, backend: Any, pairs: dict[str, tuple[Path, Path]]) -> None:
    """The master reads the key (as root) before forking; workers run as `server.user`."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    workdir = Path(tempfile.mkdtemp(prefix="fpt-tls-", dir="/tmp"))
    try:
        workdir.chmod(0o755)
        (workdir / "proxy.log").touch()
        (workdir / "proxy.log").chmod(0o666)
        cert, key = workdir / "cert.pem", workdir / "key.pem"
        shutil.copy(pairs["first"][0], cert)
        shutil.copy(pairs["first"][1], key)
        key.chmod(0o600)
        proxy, port = tls_proxy(workdir, backend("app"), cert, key, user="nobody")
        try:
            assert_serves(port, cert)
            shutil.copy(pairs["renewed"][0], cert)
            shutil.copy(pairs["renewed"][1], key)
            hup(proxy, "reloaded")
            assert_serves(port, pairs["renewed"][0])
            (worker,) = status(proxy)["workers"]
            assert uid_of(worker) != 0 and uid_of(proxy.pid) == 0
        finally:
            proxy.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_check_reports_a_certificate_that_cannot_be_loaded(
        tmp_path: Path, pairs: dict[str, tuple[Path, Path]]) -> None:
    cert, key = pairs["first"]
    junk = tmp_path / "junk.pem"
    junk.write_text("junk\n")
    config = tmp_path / "fp.toml"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for c, k, want in ((cert, key, None), (junk, key, "server.tls_cert: no PEM certificate in"),
                       (cert, junk, "server.tls_key: cannot load the certificate and key")):
        config.write_text(
            f'[server]\ntls_listen = ["127.0.0.1:{free_port()}"]\n'
            f'tls_cert = "{c}"\ntls_key = "{k}"\n'
            '[[upstream.server]]\naddress = "unix:/tmp/app.sock"\n')
        commands = ["check"] if want is None else ["check", "serve"]
        for command in commands:
            r = subprocess.run([sys.executable, "-m", "failproxy", command, str(config)],
                               capture_output=True, text=True, env=env, timeout=60)
            if want is None:
                assert r.returncode == 0 and r.stdout.startswith("ok\n"), r
            else:
                assert r.returncode == 1 and r.stderr.startswith(want), (command, r)


def test_build_names_the_file_at_fault(
        tmp_path: Path, pairs: dict[str, tuple[Path, Path]]) -> None:
    (cert, key), (other_cert, other_key) = pairs["first"], pairs["renewed"]
    junk = tmp_path / "junk.pem"
    junk.write_text("junk\n")
    encrypted = tmp_path / "enc.key"
    subprocess.run(["openssl", "pkey", "-in", str(key), "-aes256", "-passout", "pass:x",
                    "-out", str(encrypted)], check=True, capture_output=True, timeout=30)
    cases = [
        (junk, key, "tls_cert", "no PEM certificate in"),
        (key, key, "tls_cert", "no PEM certificate in"),
        (cert, junk, "tls_key", "no usable PEM private key in"),
        (cert, other_key, "tls_key", "does not match the certificate in server.tls_cert"),
        (cert, encrypted, "tls_key", "is encrypted"),
        (tmp_path, key, "tls_cert", "cannot read"),
        (cert, tmp_path / "absent.key", "tls_key", "cannot read"),
    ]
    for c, k, field, words in cases:
        with pytest.raises(tls.TLSError) as caught:
            tls.build(str(c), str(k))
        assert caught.value.key == field, (c, k, caught.value)
        assert words in caught.value.detail, (c, k, caught.value)
        assert caught.value.problems == [f"server.{field}: {caught.value.detail}"]
    ctx = tls.build(str(other_cert), str(other_key))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
