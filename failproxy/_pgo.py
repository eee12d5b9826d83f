"""The load a profile-guided build trains on (setup.py, with GCC; `make build` and the image).

GCC compiles the hot modules twice: first instrumented, then with the counts this load leaves
(`-fprofile-use`), so that the paths it takes are laid out together and the rest is moved out
of their way. On a box shared with the app server that matters more than the instruction count:
after each switch to another process a request meets cold caches, and a front's code that is
spread over fewer cache lines and pages costs less to bring back (bench/PROFILE.md, "A
profile-guided build").

What runs here is what a worker does for the seed's layout, in one process over real sockets:
a client on keep-alive TCP connections, failproxy's WorkerContext and ClientConnection with the
seed's upstream section (the local UNIX socket first, two peers' TCP ports and this box's own as
backups, so the `room` policy decides), the access log on, the default headers, route learning;
the upstream answers as unicorn does (a new connection a request, closed after its answer), then
as a pooled app server does (keep-alive), then as unicorn does again with the C core in front
(proxy/_core.pyx) where the build has it. Mostly GETs of a few routes, some POSTs with a body, a
chunked answer now and then. It is a load, not a test: it checks only that every request was
answered, so that a broken build does not train on error paths unnoticed.

    python -m failproxy._pgo [REQUESTS]
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import tempfile
from typing import Any

import httptools

from failproxy import config
from failproxy.proxy.context import WorkerContext
from failproxy.proxy.downstream import ClientConnection
from failproxy.telemetry import logs
from failproxy.telemetry.metrics import WorkerMetrics

CONFIG = """
[server]
listen = ["127.0.0.1:1"]  # not bound: the front below has its own socket
workers = 1
[upstream]
self = "{own}"
[[upstream.server]]
address = "unix:{path}"
[[upstream.server]]
address = "{peer1}"
backup = true
[[upstream.server]]
address = "{peer2}"
backup = true
[[upstream.server]]
address = "{own}"
backup = true
[log]
file = "{log}"
"""

# (method, target, body): the client's requests, in turn
REQUESTS = (
    (b"GET", b"/fast", b""),
    (b"GET", b"/users/1234/posts?page=2", b""),
    (b"GET", b"/fast", b""),
    (b"POST", b"/orders", b'{"item": 42, "quantity": 1}'),
    (b"GET", b"/assets/app.css", b""),
    (b"GET", b"/fast", b""),
    (b"GET", b"/chunked", b""),
    (b"HEAD", b"/fast", b""),
)
BODY = b"<html><body>" + b"ok " * 120 + b"</body></html>\n"


def request(method: bytes, target: bytes, body: bytes) -> bytes:
    head = (b"%s %s HTTP/1.1\r\nHost: app.example\r\nUser-Agent: pgo\r\n"
            b"Accept: text/html\r\nAccept-Encoding: gzip\r\n" % (method, target))
    if body:
        head += b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
    return head + b"\r\n" + body


def answer(target: bytes, head_only: bool, close: bool) -> bytes:
    conn = b"Connection: close\r\n" if close else b""
    if target == b"/chunked":
        out = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n"
               + conn + b"\r\n")
        return out if head_only else out + b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    out = (b"HTTP/1.1 200 OK\r\nDate: Sun, 06 Dec 2026 03:00:00 GMT\r\n"
           b"Content-Type: text/html; charset=utf-8\r\nContent-Length: %d\r\n"
           b"X-Runtime: 0.001\r\n%s\r\n" % (len(BODY), conn))
    return out if head_only else out + BODY


class Upstream(asyncio.Protocol):
    """An app server: answers each request once its head and body are in; with `close`, as
    unicorn, one request a connection."""

    def __init__(self, close: bool) -> None:
        self.close = close
        self.parser = httptools.HttpRequestParser(self)
        self.transport: Any = None
        self.target = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.target = url

    def on_message_complete(self) -> None:
        head_only = self.parser.get_method() == b"HEAD"
        self.transport.write(answer(self.target.split(b"?")[0], head_only, self.close))
        if self.close:
            self.transport.close()


class Client(asyncio.Protocol):
    """One keep-alive client connection: a request, its answer, the next."""

    def __init__(self, left: list[int], done: asyncio.Future[None], offset: int) -> None:
        self.left = left
        self.done = done
        self.turn = offset
        self.parser = httptools.HttpResponseParser(self)
        self.transport: Any = None
        self.head: bytes | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.next()

    def next(self) -> None:
        if self.left[0] <= 0:
            if not self.done.done():
                self.done.set_result(None)
            self.transport.close()
            return
        self.left[0] -= 1
        method, target, body = REQUESTS[self.turn % len(REQUESTS)]
        self.turn += 1
        # httptools cannot be told an answer is to a HEAD: its head's end ends it
        self.head = b"" if method == b"HEAD" else None
        self.transport.write(request(method, target, body))

    def data_received(self, data: bytes) -> None:
        if self.head is not None:
            self.head += data
            if b"\r\n\r\n" in self.head:
                self.answered(int(self.head[9:12]))
                self.head = None
                self.next()
            return
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        self.answered(self.parser.get_status_code())
        asyncio.get_running_loop().call_soon(self.next)

    def answered(self, status: int) -> None:
        if status != 200 and not self.done.done():
            self.done.set_exception(RuntimeError(f"answered {status}: the build is broken"))

    def connection_lost(self, exc: Exception | None) -> None:
        """failproxy closes a connection after `keepalive_requests`: as a browser, open another."""
        if self.left[0] > 0 and not self.done.done():
            loop = asyncio.get_running_loop()
            peer = self.transport.get_extra_info("peername")
            task = loop.create_task(loop.create_connection(
                lambda: Client(self.left, self.done, self.turn), peer[0], peer[1]))
            task.add_done_callback(self._reconnected)

    def _reconnected(self, task: asyncio.Task[Any]) -> None:
        if task.exception() is not None and not self.done.done():
            self.done.set_exception(RuntimeError(f"a client could not reconnect: "
                                                 f"{task.exception()!r}"))


async def run(requests: int) -> None:
    with tempfile.TemporaryDirectory(prefix="failproxy-pgo-") as tmp:
        path = os.path.join(tmp, "app.sock")
        peers = []
        for _ in range(3):  # two peers' TCP ports and this box's own, all answering
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sock.listen(128)
            peers.append(sock)
        addr = [f"127.0.0.1:{s.getsockname()[1]}" for s in peers]
        cfg = config.loads(CONFIG.format(path=path, peer1=addr[0], peer2=addr[1], own=addr[2],
                                         log=os.path.join(tmp, "access.log")))
        logs.configure(cfg.log)
        # unicorn's way, then a pooled app server's, then unicorn's way through the C core
        # where the build has it (proxy/_core.pyx: what it does not answer it hands over)
        phases = [(True, None), (False, None)]
        core = _core()
        if core is not None:
            phases.append((True, core))
        try:
            for close, front in phases:
                await _phase(cfg, path, peers, close, requests // len(phases), front)
        finally:
            for sock in peers:
                sock.close()


async def _phase(cfg: config.Config, path: str, peers: list[socket.socket], close: bool,
                 requests: int, core: Any) -> WorkerContext:
    """`requests` through a new worker context (returned: its counters tell what ran)."""
    loop = asyncio.get_running_loop()
    servers = [await loop.create_unix_server(lambda: Upstream(close), path, backlog=64)]
    for sock in peers:
        servers.append(await loop.create_server(lambda: Upstream(close), sock=sock.dup()))
    ctx = WorkerContext(cfg, WorkerMetrics(len(cfg.upstream.servers)), loop)
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(128)
    front = await loop.create_server(_factory(ctx, core), sock=lsock)
    port = lsock.getsockname()[1]
    left = [requests]
    done: asyncio.Future[None] = loop.create_future()
    try:
        for i in range(4):
            await loop.create_connection(_client(left, done, i), "127.0.0.1", port)
        await asyncio.wait_for(done, timeout=120)
    finally:
        front.close()
        for server in servers:
            server.close()
        os.unlink(path)
    return ctx


def _factory(ctx: WorkerContext, core: Any) -> Any:
    """As the worker's (process/worker.py, which this build environment may not import)."""
    def make() -> Any:
        if core is not None:
            return core(ctx, False, ClientConnection)
        return ClientConnection(ctx, False)

    return make


def _core() -> Any:
    """The C core's protocol class, where this build has it (proxy/core.py asks the same)."""
    try:
        from failproxy.proxy._core import CoreConnection  # type: ignore[import-not-found]
    except ImportError:
        return None
    return CoreConnection


def _client(left: list[int], done: asyncio.Future[None], offset: int) -> Any:
    def make() -> Client:
        return Client(left, done, offset)

    return make


def main() -> None:
    import uvloop

    from failproxy import BUILD

    if "compiled" not in BUILD:
        raise SystemExit(f"failproxy._pgo: the build that runs is {BUILD!r}: nothing to train")
    requests = int(sys.argv[1]) if len(sys.argv) > 1 else 40000
    uvloop.run(run(requests))
    print(f"failproxy._pgo: {requests} requests through the {BUILD} build")


if __name__ == "__main__":
    main()
