"""The floor of failproxy's own stack: a feature-less pass-through proxy on uvloop + httptools.

Each client connection gets one upstream connection of its own, pinned for its whole life.
Request bytes are parsed (llhttp validates them and finds where each request ends) and copied
upstream as they came; response bytes are parsed the same way and copied back. No header rules,
no failover, no pool, no timers, no log, no metrics: what is left is what uvloop's transports
and httptools' parsers cost per request, so every throughput run can show failproxy against
nginx, HAProxy *and* the lowest cost this stack can reach.

    python -m bench.targets.floor_proxy --listen 127.0.0.1:8080 --upstream unix:/tmp/up.sock

`--per-request` is the floor of the seed's layout instead: unicorn closes its connection after
every answer, so each request gets a new UNIX connection (a non-blocking socket, connect(),
the request's bytes sent, the answer read until the app closes), and the client's connection is
kept alive: the answer's `Connection: close` line is taken out of its head, as nginx does. The
upstream sockets wait in one epoll set of the process's own that uvloop watches as one reader
(failproxy's Poller, in plain Python: uvloop's `add_reader` per socket costs six epoll_ctl
calls a request). Still no header rules, failover, timers, log or metrics. `--raw-clients`
puts the listener and the clients' sockets in that set too, read and written with plain socket
calls instead of uvloop's transports: what taking the clients off uvloop gives alone.
"""

from __future__ import annotations

import argparse
import asyncio
import select
import socket
from typing import Protocol

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


def receive(sock: socket.socket) -> bytes | None:
    """What a non-blocking socket has: None when nothing yet, b"" when it ended or failed."""
    try:
        return sock.recv(65536)
    except BlockingIOError:
        return None
    except OSError:
        return b""


class Readable(Protocol):
    def readable(self) -> None: ...


class Upstreams:
    """The process's upstream sockets in one epoll set, uvloop watching the set's fd (and, with
    `--raw-clients`, the listener and the client sockets too)."""

    __slots__ = ("epoll", "waiting")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.epoll = select.epoll()
        self.waiting: dict[int, Readable] = {}
        loop.add_reader(self.epoll.fileno(), self._ready)

    def watch(self, sock: socket.socket, client: Readable) -> None:
        fd = sock.fileno()
        self.waiting[fd] = client
        self.epoll.register(fd, select.EPOLLIN)

    def forget(self, sock: socket.socket) -> None:
        """Before the socket is closed (closing it takes it out of the set)."""
        del self.waiting[sock.fileno()]

    def _ready(self) -> None:
        waiting = self.waiting
        for fd, _ in self.epoll.poll(0):
            client = waiting.get(fd)
            if client is not None:
                client.readable()


class PerRequestClient:
    """One client connection; each of its requests gets a new upstream connection (unicorn's
    way). Requests are answered in order: one at a time, the next waits in `pending`."""

    __slots__ = ("answered", "head_done", "keep_alive", "parser", "pending", "sock",
                 "transport", "upstream_path", "upstreams", "waiting")

    def __init__(self, upstream_path: str, upstreams: Upstreams) -> None:
        self.upstream_path = upstream_path
        self.upstreams = upstreams
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.pending = bytearray()  # request bytes not yet sent upstream
        # whole requests behind the one upstream now, and whether the client keeps alive after
        self.waiting: list[tuple[bytes, bool]] = []
        self.sock: socket.socket | None = None
        self.keep_alive = True
        self.head_done = False
        self.answered = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.pending += data
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        request = bytes(self.pending)
        self.pending.clear()
        keep_alive = self.parser.should_keep_alive()
        if self.sock is None:
            self._send(request, keep_alive)
        else:
            self.waiting.append((request, keep_alive))

    def _send(self, request: bytes, keep_alive: bool) -> None:
        self.keep_alive = keep_alive
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        try:
            sock.connect(self.upstream_path)
            sock.send(request)
        except OSError:
            sock.close()
            if self.transport is not None:
                self.transport.close()
            return
        self.sock = sock
        self.head_done = False
        self.upstreams.watch(sock, self)

    def readable(self) -> None:
        """Read until the app closes or has no more for now (an answer and its end often come
        in one wake-up)."""
        sock = self.sock
        assert sock is not None
        transport = self.transport
        while True:
            data = receive(sock)
            if data is None:
                return
            if not data:
                break
            if self.head_done:
                if transport is not None:
                    transport.write(data)
                continue
            self.answered += data
            end = self.answered.find(b"\r\n\r\n")
            if end < 0:
                continue
            self.head_done = True
            head = bytes(self.answered[:end + 2])
            rest = bytes(self.answered[end + 2:])
            self.answered.clear()
            lines = [line for line in head.split(b"\r\n")
                     if line.lower() != b"connection: close"]
            if transport is not None:
                transport.write(b"\r\n".join(lines) + rest)
        self.upstreams.forget(sock)
        sock.close()
        self.sock = None
        if not self.keep_alive:
            if transport is not None:
                transport.close()
        elif self.waiting:
            self._send(*self.waiting.pop(0))

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        sock = self.sock
        if sock is not None:
            self.upstreams.forget(sock)
            sock.close()
            self.sock = None


class RawClientTransport:
    """A client socket in the same epoll set as the upstreams, read and written with plain
    socket calls: what PerRequestClient asks of a transport (write, close), not uvloop's."""

    __slots__ = ("client", "sock", "upstreams")

    def __init__(self, sock: socket.socket, upstreams: Upstreams,
                 client: PerRequestClient) -> None:
        self.sock: socket.socket | None = sock
        self.upstreams = upstreams
        self.client = client

    def readable(self) -> None:
        sock = self.sock
        if sock is None:
            return
        data = receive(sock)
        if data is None:
            return
        if not data:
            self.close()
            return
        self.client.data_received(data)

    def write(self, data: bytes) -> None:
        """Answers here are small: the socket takes them whole, or the client is given up."""
        sock = self.sock
        if sock is None:
            return
        try:
            sent = sock.send(data)
        except OSError:
            sent = -1
        if sent != len(data):
            self.close()

    def close(self) -> None:
        sock = self.sock
        if sock is None:
            return
        self.sock = None
        self.upstreams.forget(sock)
        sock.close()
        self.client.connection_lost(None)


class Acceptor:
    """The listener in the epoll set: each new client a RawClientTransport."""

    __slots__ = ("listener", "upstream_path", "upstreams")

    def __init__(self, listener: socket.socket, upstream_path: str,
                 upstreams: Upstreams) -> None:
        self.listener = listener
        self.upstream_path = upstream_path
        self.upstreams = upstreams

    def readable(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as uvloop's
            client = PerRequestClient(self.upstream_path, self.upstreams)
            transport = RawClientTransport(sock, self.upstreams, client)
            self.upstreams.watch(sock, transport)
            client.connection_made(transport)  # type: ignore[arg-type]  # not a Transport


async def serve(host: str, port: int, upstream_path: str, per_request: bool = False,
                raw_clients: bool = False) -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    if raw_clients:
        sock.listen(1024)
        sock.setblocking(False)
        upstreams = Upstreams(loop)
        upstreams.watch(sock, Acceptor(sock, upstream_path, upstreams))
        await asyncio.Event().wait()  # forever
    if per_request:
        upstreams = Upstreams(loop)
        server = await loop.create_server(  # not a BaseProtocol
            lambda: PerRequestClient(upstream_path, upstreams),  # type: ignore[arg-type,return-value]
            sock=sock, backlog=1024)
    else:
        server = await loop.create_server(lambda: Client(upstream_path),  # type: ignore
                                          sock=sock, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    parser.add_argument("--upstream", required=True, help="unix:/path")
    parser.add_argument("--per-request", action="store_true",
                        help="a new upstream connection a request (unicorn's way)")
    parser.add_argument("--raw-clients", action="store_true",
                        help="with --per-request: the clients' sockets in the upstreams' epoll "
                        "set too, read and written with plain socket calls, not uvloop's "
                        "transports")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    if not args.upstream.startswith("unix:"):
        parser.error("--upstream must be unix:/path")
    uvloop.run(serve(host, int(port), args.upstream[len("unix:"):], args.per_request,
                     args.raw_clients))


if __name__ == "__main__":
    main()
