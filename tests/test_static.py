"""SPEC 10 through a running failproxy: files from static.root served without the app (path
escapes never served), conditional and range answers, gzip_static, error pages (failproxy's
own and, with intercept_errors, the upstream's), and streaming gzip of text answers.

tests/test_static_unit.py and test_compress_unit.py test the rules themselves; these check that
the proxy applies them on the wire and never takes an app worker for a file.
"""

from __future__ import annotations

import gzip
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from backends import HTTPBackend, Reply
from support import build_request

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def public(tmp_path: Path) -> Path:
    root = tmp_path / "public"
    (root / "assets").mkdir(parents=True)
    (root / "docs").mkdir()
    (root / "index.html").write_text("<h1>home</h1>")
    (root / "docs" / "index.html").write_text("<h1>docs</h1>")
    (root / "about.html").write_text("<h1>about</h1>")
    (root / "assets" / "app.css").write_text("body { color: red }\n" * 100)
    (root / "assets" / "app.css.gz").write_bytes(gzip.compress((root / "assets" / "app.css")
                                                               .read_bytes()))
    (root / "ten.txt").write_bytes(b"0123456789")
    (root / "500.html").write_text("<h1>sorry</h1>")
    (root / ".env").write_text("SECRET=1")
    secret = tmp_path / "secret.txt"
    secret.write_text("outside root")
    os.symlink(secret, root / "leak.txt")
    return root


@pytest.fixture
def app(backend: Any) -> HTTPBackend:
    return backend("app", unix=True)


def _get(fp: Any, target: str, *headers: tuple[str, str], method: str = "GET") -> Any:
    with fp.connect() as c:
        c.send(build_request(method, target, headers=list(headers)))
        return c.read_response(method)


def test_files_are_served_without_the_app(proxy: Any, app: HTTPBackend, public: Path) -> None:
    fp = proxy([app], static={"root": str(public)})
    r = _get(fp, "/assets/app.css")
    assert r.status == 200 and r.body == (public / "assets" / "app.css").read_bytes()
    assert r.header("content-type") == "text/css; charset=utf-8"
    assert r.header("etag") and r.header("last-modified") and r.header("date")
    # try_files: $uri/index.html, then $uri.html
    assert _get(fp, "/docs").body == b"<h1>docs</h1>"
    assert _get(fp, "/about").body == b"<h1>about</h1>"
    ev = fp.log.wait_for_event("request", path="/assets/app.css")
    assert ev["static"] is True and ev["upstream"] is None and ev["upstreams"] == []
    assert app.connections == 0, "a file request never takes an app worker"
    # no candidate: the app answers, on the same keep-alive connection as a file
    with fp.connect() as c:
        c.send(build_request("GET", "/ten.txt") + build_request("GET", "/users/1"))
        assert c.read_response().body == b"0123456789"
        r = c.read_response()
        assert r.status == 200 and r.body == b"app GET /users/1"
    assert [q.path for q in app.wait_requests(1)] == ["/users/1"]
    ev = fp.log.wait_for_event("request", path="/users/1")
    assert ev["static"] is False and ev["route"] == "GET /users/:id"


@pytest.mark.parametrize("target", [
    "/../secret.txt", "/%2e%2e/secret.txt", "/assets/%2F..%2F..%2Fsecret.txt", "/leak.txt",
    "/.env", "/ten.txt%00", "/assets/..%5c..%5csecret.txt",
])
def test_path_escapes_go_to_the_app_never_to_disk(
    proxy: Any, app: HTTPBackend, public: Path, target: str
) -> None:
    fp = proxy([app], static={"root": str(public)})
    with fp.connect() as c:
        c.send(f"GET {target} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
        r = c.read_response()
    assert b"outside root" not in r.body and b"SECRET" not in r.body
    if r.status == 200:
        assert r.body.startswith(b"app GET"), "answered by the app, not from disk"


def test_conditional_and_range_answers(proxy: Any, app: HTTPBackend, public: Path) -> None:
    fp = proxy([app], static={"root": str(public)})
    first = _get(fp, "/ten.txt")
    etag, modified = first.header("etag"), first.header("last-modified")
    assert _get(fp, "/ten.txt", ("If-None-Match", etag)).status == 304
    assert _get(fp, "/ten.txt", ("If-Modified-Since", modified)).status == 304
    r = _get(fp, "/ten.txt", ("Range", "bytes=2-4"))
    assert r.status == 206 and r.body == b"234"
    assert r.header("content-range") == "bytes 2-4/10"
    r = _get(fp, "/ten.txt", ("Range", "bytes=20-"))
    assert r.status == 416 and r.header("content-range") == "bytes */10"
    r = _get(fp, "/ten.txt", method="HEAD")
    assert r.status == 200 and r.header("content-length") == "10" and r.body == b""
    assert app.connections == 0


def test_gzip_static(proxy: Any, app: HTTPBackend, public: Path) -> None:
    fp = proxy([app], static={"root": str(public)})
    plain = (public / "assets" / "app.css").read_bytes()
    r = _get(fp, "/assets/app.css", ("Accept-Encoding", "gzip, br"))
    assert r.header("content-encoding") == "gzip" and gzip.decompress(r.body) == plain
    assert r.header("vary") == "Accept-Encoding"
    r = _get(fp, "/assets/app.css", ("Accept-Encoding", "gzip;q=0"))
    assert r.header("content-encoding") is None and r.body == plain


def test_large_file_to_a_slow_client_arrives_whole(proxy: Any, app: HTTPBackend,
                                                  public: Path) -> None:
    data = os.urandom(6 << 20)
    (public / "big.bin").write_bytes(data)
    fp = proxy([app], static={"root": str(public)})
    with fp.connect(timeout=30, rcvbuf=8192) as c:
        c.send(build_request("GET", "/big.bin"))
        head = c.read_head()
        assert head.status == 200 and head.header("content-type") == "application/octet-stream"
        assert fp.request("GET", "/ten.txt").body == b"0123456789", "the worker is not blocked"
        body = c._read_exact(len(data), time.monotonic() + 30, "the body")
    assert body == data


def test_error_pages_replace_failproxys_own_answers(proxy: Any, public: Path,
                                                   sockdir: Path) -> None:
    fp = proxy([f"unix:{sockdir}/nobody.sock"],
               static={"root": str(public), "error_pages": {502: "/500.html", 504: "/gone.html"}})
    r = _get(fp, "/x")
    assert r.status == 502 and r.body == b"<h1>sorry</h1>"
    assert r.header("content-type") == "text/html; charset=utf-8"
    r = _get(fp, "/x", method="HEAD")
    assert r.status == 502 and r.body == b""


def test_intercept_errors_replaces_the_upstreams_5xx(proxy: Any, backend: Any,
                                                    public: Path) -> None:
    app = backend("app", unix=True, handler=lambda r: (
        Reply(500, headers=[("Content-Type", "text/plain")], body=b"stack trace")
        if r.path == "/boom" else Reply(200, body=b"fine")))
    fp = proxy([app], static={"root": str(public), "error_pages": {500: "/500.html"},
                              "intercept_errors": True})
    with fp.connect() as c:
        c.send(build_request("GET", "/boom") + build_request("GET", "/ok"))
        r = c.read_response()
        assert r.status == 500 and r.body == b"<h1>sorry</h1>"
        assert c.read_response().body == b"fine", "the connection stays in step"
    # without intercept_errors the upstream's own 5xx goes through
    fp2 = proxy([app], static={"root": str(public), "error_pages": {500: "/500.html"}})
    assert _get(fp2, "/boom").body == b"stack trace"


def test_gzip_of_text_answers(proxy: Any, backend: Any) -> None:
    text = b"hello compressible world\n" * 400
    app = backend("app", unix=True, handler=lambda r: Reply(
        200, headers=[("Content-Type", "text/html; charset=utf-8"), ("ETag", '"v1"')],
        body=[text[:5000], text[5000:]], chunked=r.path == "/chunked",
        content_length=None if r.path == "/chunked" else len(text)))
    fp = proxy([app], compress={"gzip": True})
    for path in ("/plain", "/chunked"):
        r = _get(fp, path, ("Accept-Encoding", "gzip"))
        assert r.status == 200 and r.header("content-encoding") == "gzip"
        assert gzip.decompress(r.body) == text
        assert r.header("content-length") is None and r.chunked
        assert r.header("vary") == "Accept-Encoding" and r.header("etag") == 'W/"v1"'
    r = _get(fp, "/plain")
    assert r.header("content-encoding") is None and r.body == text
    r = _get(fp, "/plain", ("Accept-Encoding", "gzip"), method="HEAD")
    assert r.header("content-encoding") is None
    # HTTP/1.0: no chunked framing, so the compressed answer ends with the connection
    s = socket.create_connection(fp.address, timeout=10)
    s.sendall(b"GET /plain HTTP/1.0\r\nAccept-Encoding: gzip\r\n\r\n")
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"Content-Encoding: gzip" in head and gzip.decompress(body) == text


def test_small_and_binary_answers_are_not_compressed(proxy: Any, backend: Any) -> None:
    app = backend("app", unix=True, handler=lambda r: Reply(
        200, headers=[("Content-Type", "image/png" if r.path == "/png" else "text/plain")],
        body=b"x" * (100 if r.path == "/small" else 5000)))
    fp = proxy([app], compress={"gzip": True})
    assert _get(fp, "/small", ("Accept-Encoding", "gzip")).header("content-encoding") is None
    assert _get(fp, "/png", ("Accept-Encoding", "gzip")).header("content-encoding") is None
    assert _get(fp, "/text", ("Accept-Encoding", "gzip")).header("content-encoding") == "gzip"


def test_compress_applies_to_static_files_too(proxy: Any, app: HTTPBackend, public: Path) -> None:
    """[compress] gzip compresses a text file from root that has no .gz beside it, as nginx's
    gzip does; one with a .gz is served pre-compressed (gzip_static) as before."""
    text = b"<p>compressible</p>\n" * 500
    (public / "page.html").write_bytes(text)
    fp = proxy([app], static={"root": str(public)}, compress={"gzip": True})
    with fp.connect() as c:
        c.send(build_request("GET", "/page.html", headers=[("Accept-Encoding", "gzip")])
               + build_request("GET", "/ten.txt"))
        r = c.read_response()
        assert r.header("content-encoding") == "gzip" and r.chunked
        assert gzip.decompress(r.body) == text and len(r.body) < len(text) // 5
        assert r.header("content-length") is None and r.header("etag", "").startswith("W/")
        assert c.read_response().body == b"0123456789", "the connection stays in step"
    ev = fp.log.wait_for_event("request", path="/page.html")
    assert ev["static"] is True and ev["bytes_sent"] > len(r.body)
    plain = _get(fp, "/page.html")
    assert plain.body == text and plain.header("content-encoding") is None
    assert app.connections == 0
