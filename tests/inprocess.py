"""The hot path in-process, on fake transports: a worker's context, a client connection and
upstream connections built directly, fed bytes as uvloop would feed them.

A subprocess test cannot choose *when* each side's bytes arrive; these can, so they reach the
interleavings (a client gone during a TCP connect, an upstream EOF during a pooled reuse, a
pipelined request arriving while a response streams). Real sockets are still used where the
exchange makes them itself (a fresh connect), through a real uvloop loop.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from failproxy import config
from failproxy.proxy.context import WorkerContext
from failproxy.proxy.downstream import ClientConnection
from failproxy.proxy.upstream import UpstreamConnection
from failproxy.routing.peer import Peer
from failproxy.telemetry import logs
from failproxy.telemetry.metrics import WorkerMetrics


class FakeTransport:
    """Collects what would have been written; records pause/close as a transport would."""

    def __init__(self, peer: tuple[str, int] = ("127.0.0.1", 40000)) -> None:
        self.out: list[bytes] = []
        self.closing = False
        self.aborted = False
        self.reading = True
        self.peer = peer
        self.high_water: int | None = None
        self.buffered = 0

    def write(self, data: bytes) -> None:
        assert not self.closing, "write after close"
        self.out.append(bytes(data))

    def writelines(self, lines: list[bytes]) -> None:
        for line in lines:
            self.write(line)

    def data(self) -> bytes:
        return b"".join(self.out)

    def take(self) -> bytes:
        data = self.data()
        self.out.clear()
        return data

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True
        self.aborted = True

    def is_closing(self) -> bool:
        return self.closing

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.high_water = high

    def get_write_buffer_size(self) -> int:
        return self.buffered  # what a test says the kernel has not taken yet

    def can_write_eof(self) -> bool:
        return False  # close() then closes at once (no lingering read on a fake)


class Harness:
    """A worker context (from TOML), with the log written to a file that tests read back."""

    def __init__(self, toml: str, log_path: Path, loop: asyncio.AbstractEventLoop) -> None:
        cfg = config.loads(toml + f'\n[log]\nfile = "{log_path}"\n')
        logs.configure(cfg.log)
        self.log_path = log_path
        self.loop = loop
        self.ctx = WorkerContext(cfg, WorkerMetrics(len(cfg.upstream.servers)), loop)

    def client(self) -> tuple[ClientConnection, FakeTransport]:
        conn = ClientConnection(self.ctx, False)
        transport = FakeTransport()
        conn.connection_made(transport)  # type: ignore[arg-type]
        return conn, transport

    def pooled(self, peer: Peer) -> tuple[UpstreamConnection, FakeTransport]:
        """An idle keep-alive connection in `peer`'s pool, on a fake transport."""
        conn = UpstreamConnection(peer, self.loop)
        transport = FakeTransport()
        conn.transport = transport
        conn.idle_since = self.loop.time()
        peer.put_idle(conn)
        return conn, transport

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        logs.flush()
        lines = [json.loads(line) for line in self.log_path.read_text().splitlines() if line]
        return [e for e in lines if name is None or e["event"] == name]


RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def request(path: str = "/", method: str = "GET", extra: str = "") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: a\r\n{extra}\r\n".encode()
