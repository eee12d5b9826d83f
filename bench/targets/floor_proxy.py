"""The floor of failproxy's own stack: a feature-less pass-through proxy on uvloop + httptools.

Each client connection gets one upstream connection of its own, pinned for its whole life.
Request bytes are parsed (llhttp validates them and finds where each request ends) and copied
upstream as they came; response bytes are parsed the same way and copied back. No header rules,
no failover, no pool, no timers, no log, no metrics: what is left is what uvloop's transports
and httptools' parsers cost per request, so every throughput run can show failproxy against
nginx, HAProxy *and* the lowest cost this stack can reach.

    python -m bench.targets.floor_proxy --listen 127.0.0.1:8080 --upstream unix:/tmp/up.sock
"""

from __future__ import annotations

import argparse
import asyncio
import socket

import httptools
import uvloop


class Upstream:
    """The pinned upstream side: response bytes go straight back to the client."""

    __slots__ = ("client", "parser", "transport")

    def __init__(self, client: Client) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        # The parser only finds where each response ends; it calls nothing per header.
        self.parser = httptools.HttpResponseParser(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)
        self.client.transport.write(data)  # type: ignore[union-attr]

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        transport = self.client.transport
        if transport is not None:
            transport.close()

    def pause_writing(self) -> None:
        self.client.transport.pause_reading()  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        self.client.transport.resume_reading()  # type: ignore[union-attr]


class Client:
    """One client connection; its bytes wait in `pending` until the upstream is connected."""

    __slots__ = ("parser", "pending", "transport", "upstream", "upstream_path")

    def __init__(self, upstream_path: str) -> None:
        self.upstream_path = upstream_path
        self.transport: asyncio.Transport | None = None
        self.upstream: Upstream | None = None
        self.pending: list[bytes] = []
        self.parser = httptools.HttpRequestParser(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        upstream = Upstream(self)
        try:
            await loop.create_unix_connection(  # type: ignore[type-var]  # not a BaseProtocol
                lambda: upstream, self.upstream_path)
        except OSError:
            if self.transport is not None:
                self.transport.close()
            return
        self.upstream = upstream
        if self.pending:
            upstream.transport.writelines(self.pending)  # type: ignore[union-attr]
            self.pending.clear()

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)
        upstream = self.upstream
        if upstream is None:
            self.pending.append(data)
        else:
            upstream.transport.write(data)  # type: ignore[union-attr]

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        upstream = self.upstream
        if upstream is not None and upstream.transport is not None:
            upstream.transport.close()

    def pause_writing(self) -> None:
        upstream = self.upstream
        if upstream is not None:
            upstream.transport.pause_reading()  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        upstream = self.upstream
        if upstream is not None:
            upstream.transport.resume_reading()  # type: ignore[union-attr]


async def serve(host: str, port: int, upstream_path: str) -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = await loop.create_server(lambda: Client(upstream_path), sock=sock,  # type: ignore
                                      backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    parser.add_argument("--upstream", required=True, help="unix:/path")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    if not args.upstream.startswith("unix:"):
        parser.error("--upstream must be unix:/path")
    uvloop.run(serve(host, int(port), args.upstream[len("unix:"):]))


if __name__ == "__main__":
    main()
