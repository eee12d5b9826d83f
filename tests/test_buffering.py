"""SPEC 9: failproxy buffers as nginx does in front of a prefork app server.

Requests are read whole before any upstream is contacted (a bad chunk, 413 or 408 reaches no
upstream; a slow upload never holds an app worker); answers are read at the upstream's speed (a
slow reader never holds an app worker), spilling to temp files that go away with the request.

The worker-holding cases run against real unicorn with one worker: a UNIX listener whose only
worker is held shows exactly as a fast request that cannot be answered.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from backends import HTTPBackend, Reply
from support import IncompleteResponse, build_request, free_port, proc_status, reset_peak_rss
from test_unicorn import UNICORN, Unicorn

pytestmark = pytest.mark.timeout(90)

POST = "POST /upload HTTP/1.1\r\nHost: app.test\r\n"
CHUNKED = "Transfer-Encoding: chunked\r\n\r\n"

# A chunked body that goes wrong after a good chunk, in eight shapes (issue 18): each is refused
# by the parser, so none of the request may reach an upstream.
BAD_CHUNKS = {
    "hex_prefix": b"5\r\nhello\r\n0x5\r\nworld\r\n0\r\n\r\n",
    "trailing_space": b"5\r\nhello\r\n5 \r\nworld\r\n0\r\n\r\n",
    "bare_cr_in_extension": b"5\r\nhello\r\n5;a\rb\r\nworld\r\n0\r\n\r\n",
    "missing_crlf": b"5\r\nhello\r\n5\r\nworldXX0\r\n\r\n",
    "size_overflow": b"5\r\nhello\r\nfffffffffffffffffffff\r\nworld\r\n0\r\n\r\n",
    "content_length_trailer": b"5\r\nhello\r\n0\r\nContent-Length: 5\r\n\r\n",
    "more_data_than_size": b"5\r\nhello\r\n3\r\nworld\r\n0\r\n\r\n",
    "not_hex": b"5\r\nhello\r\nzz\r\nworld\r\n0\r\n\r\n",
}


@pytest.fixture
def app(backend: Any) -> HTTPBackend:
    return backend("app", unix=True)


def _read_all(c: Any) -> bytes:
    with contextlib.suppress(OSError):
        return c.wait_closed(5)
    return b""


@pytest.mark.parametrize("buffering", [True, False], ids=["buffered", "streamed"])
@pytest.mark.parametrize("shape", sorted(BAD_CHUNKS))
def test_head_and_bad_chunk_in_one_read_reach_no_upstream(
    proxy: Any, app: HTTPBackend, shape: str, buffering: bool
) -> None:
    """SPEC 8/9: a malformed chunk in the same read as the head: 400, and not one byte of the
    request (head or the good chunk before the bad one) reaches the app, whether bodies are
    buffered or streamed."""
    fp = proxy([app], server={"request_buffering": buffering})
    with fp.connect() as c:
        c.send((POST + CHUNKED).encode() + BAD_CHUNKS[shape])
        resp = c.read_response()
        assert resp.status == 400
        assert resp.header("connection") == "close"
    fp.log.wait_for_event("client_error", status=400)
    # the request was answered: had anything gone upstream it would have been connected first
    fp.request("GET", "/after")
    assert [r.path for r in app.wait_requests(1)] == ["/after"]
    assert app.connections == 1


def test_buffered_bad_chunk_in_a_later_read_reaches_no_upstream(
    proxy: Any, app: HTTPBackend
) -> None:
    """Buffered: the head and a good chunk arrive first, the bad chunk a read later; still
    nothing reaches the app (no upstream is contacted before the body is whole)."""
    admin = f"127.0.0.1:{free_port()}"
    fp = proxy([app], admin={"listen": admin})
    with fp.connect() as c:
        c.send((POST + CHUNKED).encode() + b"5\r\nhello\r\n")
        _wait(lambda: _gauge(admin, "failproxy_request_bodies_buffering") == 1, 10,
              "the body is being buffered (its first read parsed)")
        c.send(b"5 \r\nworld\r\n0\r\n\r\n")
        assert c.read_response().status == 400
    fp.log.wait_for_event("client_error", status=400)
    assert app.connections == 0
    _wait(lambda: _gauge(admin, "failproxy_request_bodies_buffering") == 0, 10,
          "the gauge back to 0")


def _gauge(admin: str, name: str) -> float:
    host, port = admin.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    for line in data.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics")


def test_chunked_request_goes_upstream_with_content_length(proxy: Any, app: HTTPBackend) -> None:
    """Buffered: a chunked upload is de-chunked and sent with Content-Length, trailers dropped,
    Expect answered by failproxy and not forwarded."""
    fp = proxy([app])
    with fp.connect() as c:
        c.send((POST + "Expect: 100-continue\r\n" + CHUNKED).encode())
        head = c.read_head()
        assert head.status == 100, "failproxy says 100 Continue itself"
        c.send(b"5\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n")
        resp = c.read_response()
        assert resp.status == 200
    (req,) = app.wait_requests(1)
    assert req.body == b"hello world" and not req.chunked
    assert req.header("content-length") == "11"
    assert not req.has_header("transfer-encoding")
    assert not req.has_header("expect") and not req.has_header("x-trailer")


def test_expect_with_length_over_the_limit_is_413_at_once(proxy: Any, app: HTTPBackend) -> None:
    fp = proxy([app], server={"max_body_bytes": 1000})
    with fp.connect() as c:
        c.send((POST + "Expect: 100-continue\r\nContent-Length: 5000\r\n\r\n").encode())
        resp = c.read_response()
        assert resp.status == 413 and not resp.interim
    assert app.connections == 0


def test_buffered_body_over_max_body_bytes_reaches_no_upstream(
    proxy: Any, app: HTTPBackend
) -> None:
    """A chunked body that crosses max_body_bytes: 413, and the app never saw the request."""
    fp = proxy([app], server={"max_body_bytes": 100000})
    with fp.connect() as c:
        c.send((POST + CHUNKED).encode())
        for _ in range(30):
            try:
                c.send(b"1000\r\n" + b"x" * 4096 + b"\r\n")
            except OSError:
                break
        assert c.read_response().status == 413
    assert app.connections == 0


def test_stalled_buffered_body_is_408_without_upstream(proxy: Any, app: HTTPBackend) -> None:
    fp = proxy([app], server={"body_timeout": 0.5})
    with fp.connect() as c:
        c.send((POST + "Content-Length: 100\r\n\r\n" + "x" * 10).encode())
        assert c.read_response(timeout=10).status == 408
    assert app.connections == 0


def test_temp_file_that_cannot_be_written_gives_503(
    proxy: Any, app: HTTPBackend, tmp_path: Path
) -> None:
    """The request body must spill, and temp_dir is gone: 503, temp_file_error, no upstream."""
    spill = tmp_path / "spill"
    spill.mkdir()
    fp = proxy([app], server={"temp_dir": str(spill), "request_buffer_bytes": 1024})
    spill.rmdir()
    resp = fp.request("POST", "/upload", body=b"x" * 100000)
    assert resp.status == 503
    ev = fp.log.wait_for_event("temp_file_error", side="request")
    assert ev["errno"] == "ENOENT"
    assert app.connections == 0
    # a body that fits in memory does not need the directory
    assert fp.request("POST", "/small", body=b"y" * 500).status == 200


def test_x_accel_buffering_no_is_streamed_and_not_forwarded(
    proxy: Any, backend: Any
) -> None:
    body = os.urandom(1 << 20)
    app = backend("app", unix=True, handler=lambda r: Reply(
        200, headers=[("X-Accel-Buffering", "no")], body=body))
    fp = proxy([app])
    with fp.connect(rcvbuf=4096) as c:
        c.send(build_request("GET", "/events"))
        resp = c.read_response(slow_read=lambda got: time.sleep(0.001) if got < 200000 else None)
    assert resp.body == hashlib.sha256(body).hexdigest().encode()
    assert not resp.has_header("x-accel-buffering")
    ev = fp.log.wait_for_event("request", path="/events")
    assert ev["spilled_bytes"] == 0


def test_answer_spill_fails_falls_back_to_back_pressure(
    proxy: Any, backend: Any, tmp_path: Path
) -> None:
    """Answer side: the temp file cannot be made, so the upstream is read only as fast as the
    client reads; the answer still arrives whole, and the failure is logged."""
    spill = tmp_path / "spill"
    spill.mkdir()
    body = os.urandom(3 << 20)
    app = backend("app", unix=True, handler=lambda r: Reply(200, body=body))
    fp = proxy([app], server={"temp_dir": str(spill)},
               upstream={"response_buffer_bytes": 16384})
    spill.rmdir()
    with fp.connect(rcvbuf=4096) as c:
        c.send(build_request("GET", "/big"))
        head = c.read_head()
        assert head.status == 200
        fp.log.wait_for_event("temp_file_error", side="response")
        got = c._read_exact(len(body), time.monotonic() + 30, "the body")
    assert got == body


# ---- one-worker unicorn: what a fast request waits for ------------------------------------------

RACK_APP = """\
big = ("0123456789abcdef" * 65536 * 8).freeze   # 8 MiB
app = lambda do |env|
  case env["PATH_INFO"]
  when "/big"
    [200, {"Content-Type" => "application/octet-stream",
           "Content-Length" => big.bytesize.to_s}, [big]]
  when "/upload"
    data = env["rack.input"].read
    require "digest"
    [200, {"Content-Type" => "text/plain"}, ["#{data.bytesize} #{Digest::SHA256.hexdigest(data)}"]]
  else
    [200, {"Content-Type" => "text/plain"}, ["fast pid=#{Process.pid}\\n"]]
  end
end
run app
"""
BIG = b"0123456789abcdef" * 65536 * 8


@pytest.fixture
def unicorn1(sockdir: Path) -> Iterator[Unicorn]:
    """Real unicorn, one worker: whoever holds its connection holds the app."""
    if UNICORN is None:
        pytest.skip("unicorn is not installed (Debian package `unicorn`; the Makefile installs it)")
    u = Unicorn(sockdir, workers=1, app=RACK_APP)
    try:
        u.wait_ready()
        yield u
    finally:
        u.stop()


def _fast_get(fp: Any, timeout: float) -> bytes:
    with socket.create_connection(fp.address, timeout=timeout) as s:
        s.sendall(b"GET /fast HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def test_slow_upload_does_not_hold_the_only_worker(proxy: Any, unicorn1: Unicorn,
                                                   tmp_path: Path) -> None:
    """A phone uploading 160 KiB in 16 KiB pieces: the upload stops half way until a fast GET,
    sent meanwhile, has been answered. Were the upload streamed to the app, its only worker
    would wait for the rest of the body and the GET would never be answered."""
    spill = _spill_dir(tmp_path)
    fp = proxy([unicorn1.unix_address], server={"temp_dir": str(spill)},
               upstream={"read_timeout": 30.0})
    piece = os.urandom(16384)
    with fp.connect(timeout=30) as up:
        up.send((POST + f"Content-Length: {10 * len(piece)}\r\n\r\n").encode() + piece)
        for _ in range(4):
            up.send(piece)
        answer = _fast_get(fp, timeout=10)
        assert answer.startswith(b"HTTP/1.1 200") and b"fast pid=" in answer
        for _ in range(5):
            up.send(piece)
        resp = up.read_response(timeout=20)
    assert resp.status == 200
    assert resp.body == f"{10 * len(piece)} {hashlib.sha256(piece * 10).hexdigest()}".encode()
    ev = fp.log.wait_for_event("request", path="/upload")
    assert ev["spilled_bytes"] == 10 * len(piece) - 65536  # past request_buffer_bytes


def test_chunked_slow_upload_does_not_hold_the_only_worker(
    proxy: Any, unicorn1: Unicorn
) -> None:
    fp = proxy([unicorn1.unix_address], upstream={"read_timeout": 30.0})
    piece = os.urandom(16384)
    chunk = b"%x\r\n%b\r\n" % (len(piece), piece)
    with fp.connect(timeout=30) as up:
        up.send((POST + CHUNKED).encode() + chunk * 3)
        answer = _fast_get(fp, timeout=10)
        assert answer.startswith(b"HTTP/1.1 200")
        up.send(chunk * 2 + b"0\r\n\r\n")
        resp = up.read_response(timeout=20)
    assert resp.body == f"{5 * len(piece)} {hashlib.sha256(piece * 5).hexdigest()}".encode()


def _spill_dir(tmp_path: Path) -> Path:
    """A directory of its own for temp files (the proxy's log file is under tmp_path)."""
    d = tmp_path / "spill"
    d.mkdir(exist_ok=True)
    return d


def _temp_fds(pid: int, temp_dir: Path) -> list[str]:
    """The worker's open fds that are files in temp_dir (O_TMPFILE ones show as '/dir/#N')."""
    out = []
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in os.listdir(fd_dir):
        with contextlib.suppress(OSError):
            target = os.readlink(fd_dir / fd)
            if target.startswith(str(temp_dir) + "/"):
                out.append(target)
    return out


def _worker_pid(fp: Any) -> int:
    """The one worker's pid, as it logged it (a config with workers = 1 still forks one)."""
    return int(fp.log.wait_for_event("worker_started")["worker_pid"])


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.02)


def test_slow_reader_does_not_hold_the_only_worker(proxy: Any, unicorn1: Unicorn,
                                                   tmp_path: Path) -> None:
    """A client that reads an 8 MiB answer slowly (small receive window): the app's worker is
    free as soon as the app has written the answer. A fast GET is answered while the reader
    has read almost nothing; the answer then arrives whole, and its temp file goes away."""
    spill = _spill_dir(tmp_path)
    fp = proxy([unicorn1.unix_address], server={"temp_dir": str(spill)},
               upstream={"read_timeout": 30.0})
    worker = _worker_pid(fp)
    with fp.connect(timeout=30, rcvbuf=8192) as slow:
        slow.send(build_request("GET", "/big"))
        head = slow.read_head(timeout=10)
        assert head.status == 200
        answer = _fast_get(fp, timeout=10)
        assert answer.startswith(b"HTTP/1.1 200") and b"fast pid=" in answer
        ev = fp.log.wait_for_event("request", path="/fast")
        assert ev["upstream_ms"] is not None
        assert _temp_fds(worker, spill), "the unread rest of the answer is in a temp file"
        body = slow._read_exact(len(BIG), time.monotonic() + 30, "the body")
    assert body == BIG
    ev = fp.log.wait_for_event("request", path="/big")
    assert ev["spilled_bytes"] > 0 and ev["upstream_ms"] <= ev["duration_ms"]
    _wait(lambda: not _temp_fds(worker, spill), 5, "the temp file closed")


def test_client_leaving_mid_answer_drops_its_temp_file(proxy: Any, unicorn1: Unicorn,
                                                       tmp_path: Path) -> None:
    """Nothing leaks when a slow reader leaves: its temp file is closed (fd and disk space), the
    worker's fd count goes back to where it was, and the proxy still serves."""
    spill = _spill_dir(tmp_path)
    fp = proxy([unicorn1.unix_address], server={"temp_dir": str(spill)},
               upstream={"read_timeout": 30.0})
    worker = _worker_pid(fp)
    assert fp.request("GET", "/fast").status == 200
    fds_before = len(os.listdir(f"/proc/{worker}/fd"))
    for _ in range(3):
        slow = fp.connect(timeout=30, rcvbuf=8192)
        slow.send(build_request("GET", "/big"))
        assert slow.read_head(timeout=10).status == 200
        _wait(lambda: bool(_temp_fds(worker, spill)), 10, "the answer spilled")
        slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        slow.close()  # RST: gone mid answer
        _wait(lambda: not _temp_fds(worker, spill), 10, "the temp file closed")
    assert fp.request("GET", "/fast").status == 200
    _wait(lambda: len(os.listdir(f"/proc/{worker}/fd")) <= fds_before, 5,
          "the worker's fds back to where they were")
    events = fp.log.wait_for_events("request", 3, path="/big")
    assert all(ev["spilled_bytes"] > 0 for ev in events)


def test_large_upload_memory_stays_bounded(proxy: Any, backend: Any, tmp_path: Path) -> None:
    """48 MiB uploaded through the proxy arrive intact while the worker's peak RSS grows by
    far less than the body: past request_buffer_bytes it goes to the temp file, and it is sent
    on from there piece by piece as the upstream takes it."""
    app = backend("app", unix=True, record_body_limit=0)
    spill = _spill_dir(tmp_path)
    fp = proxy([app], server={"temp_dir": str(spill), "max_body_bytes": 0})
    worker = _worker_pid(fp)
    assert fp.request("POST", "/warm", body=b"x" * 70000).status == 200
    if not reset_peak_rss(worker):
        pytest.skip("cannot reset the peak RSS (clear_refs)")
    base = proc_status(worker)["VmHWM"]
    piece = os.urandom(1 << 20)
    digest = hashlib.sha256()
    total = 48
    with fp.connect(timeout=60) as c:
        c.send((POST + f"Content-Length: {total * len(piece)}\r\n\r\n").encode())
        for _ in range(total):
            c.send(piece)
            digest.update(piece)
        resp = c.read_response(timeout=60)
    assert resp.status == 200
    got = app.seen(path="/upload")[0]
    assert got.body_len == total * len(piece) and got.body_sha256 == digest.hexdigest()
    grown_kib = proc_status(worker)["VmHWM"] - base
    assert grown_kib < 16 * 1024, f"peak RSS grew {grown_kib} KiB for a 48 MiB upload"



def test_a_client_that_takes_nothing_is_closed_after_send_timeout(
    proxy: Any, backend: Any, tmp_path: Path
) -> None:
    """server.send_timeout (nginx's send_timeout): a client that stops taking its answer does
    not hold it, nor its temp file, forever; the upstream was released long before."""
    spill = _spill_dir(tmp_path)
    body = os.urandom(8 << 20)
    app = backend("app", unix=True, handler=lambda r: Reply(200, body=body))
    fp = proxy([app], server={"temp_dir": str(spill), "send_timeout": 1.0})
    worker = _worker_pid(fp)
    with fp.connect(timeout=30, rcvbuf=4096) as c:
        c.send(build_request("GET", "/big"))
        assert c.read_head().status == 200
        _wait(lambda: bool(_temp_fds(worker, spill)), 10, "the answer spilled")
        ev = fp.log.wait_for_event("request", path="/big", timeout=15)
        assert ev["upstream_ms"] is not None and ev["spilled_bytes"] > 0
        _wait(lambda: not _temp_fds(worker, spill), 5, "the temp file dropped")
        with pytest.raises((IncompleteResponse, OSError)):  # reset or closed: either ends it
            c._read_exact(len(body), time.monotonic() + 10, "the body")
