"""The `request` line of the JSON access log, through a worker in-process."""

from __future__ import annotations

import asyncio
from pathlib import Path

import uvloop
from inprocess import RESPONSE, Harness


def test_a_logged_request_says_what_the_client_sent(tmp_path: Path) -> None:
    """Through a worker: the path's bytes and the client's X-Request-Id come back in the JSON
    line as the client sent them (read as latin-1), quotes and backslashes escaped."""

    async def main() -> None:
        h = Harness('[[upstream.server]]\naddress = "unix:/nonexistent/a.sock"\n',
                    tmp_path / "log", asyncio.get_running_loop())
        peer = h.ctx.peers[0]
        pooled, _ = h.pooled(peer)
        client, out = h.client()
        raw = (b'GET /p"q\\r?a=%22 HTTP/1.1\r\nHost: a\r\n'
               b'X-Request-Id: a"b\\c\xe9\r\n\r\n')  # httptools takes no non-ASCII in a URL
        client.data_received(raw)
        pooled.data_received(RESPONSE)
        assert out.data().startswith(b"HTTP/1.1 200 OK")
        (event,) = h.events("request")
        assert event["path"] == '/p"q\\r?a=%22'
        assert event["request_id"] == 'a"b\\c\xe9'
        assert event["method"] == "GET" and event["status"] == 200
        assert event["upstream"] == peer.address and event["upstreams"] == [peer.address]
        assert event["overflowed"] is False and event["tries"] == 1
        assert isinstance(event["duration_ms"], float) and event["duration_ms"] >= 0
        assert event["client"] == "127.0.0.1" and isinstance(event["pid"], int)

    uvloop.run(main())


def test_each_request_has_its_own_line_in_the_console_format(tmp_path: Path) -> None:
    """The JSON path refills one dict per request; the console path (structlog) must still get
    each request's own values, and leave the next request's line whole."""
    from failproxy import config
    from failproxy.proxy.context import WorkerContext
    from failproxy.telemetry import logs
    from failproxy.telemetry.metrics import WorkerMetrics

    log_path = tmp_path / "log"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        cfg = config.loads('[[upstream.server]]\naddress = "unix:/nonexistent/a.sock"\n'
                           f'[log]\nformat = "console"\nfile = "{log_path}"\n')
        logs.configure(cfg.log)
        h = Harness.__new__(Harness)
        h.log_path, h.loop = log_path, loop
        h.ctx = WorkerContext(cfg, WorkerMetrics(1), loop)
        peer = h.ctx.peers[0]
        for path in ("/first", "/second"):
            pooled, _ = h.pooled(peer)
            client, out = h.client()
            client.data_received(f"GET {path} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
            pooled.data_received(RESPONSE)
            assert out.data().startswith(b"HTTP/1.1 200 OK")
        logs.flush()

    try:
        uvloop.run(main())
    finally:
        logs.configure(config.loads('[[upstream.server]]\naddress = "unix:/x"\n').log)
    lines = [line for line in log_path.read_text().splitlines() if "request" in line]
    assert len(lines) == 2, lines
    assert "path=/first" in lines[0] and "/second" not in lines[0]
    assert "path=/second" in lines[1] and "status=200" in lines[1]
