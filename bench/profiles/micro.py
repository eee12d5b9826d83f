"""The Python cost of one proxied request, with the sockets taken out.

A client connection and a pooled upstream connection get fake transports that only collect
bytes; each round feeds one request to the client protocol and one response to the upstream
protocol, exactly as uvloop would. What is left is failproxy's own per-request work (parsing,
header rules, the walk, logging, metrics, timers): the part a profiler can act on, measured
without the kernel's loopback work and without noise from other processes.

    python -m bench.profiles.micro                  # µs per request, access log on and off
    python -m bench.profiles.micro --profile        # the same under cProfile, top functions
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import time
from typing import Any

import uvloop

from failproxy import config
from failproxy.proxy.context import WorkerContext
from failproxy.proxy.downstream import ClientConnection
from failproxy.proxy.upstream import UpstreamConnection
from failproxy.telemetry import logs
from failproxy.telemetry.metrics import WorkerMetrics

REQUEST = (
    b"GET /hello HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n"
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sat, 21 Nov 2026 06:25:06 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nok\n"
)
CONFIG = """
[server]
keepalive_requests = 1000000000
[upstream]
keepalive_requests = 1000000000
[log]
access = {access}
file = "/dev/null"
[[upstream.server]]
address = "unix:/nonexistent/upstream.sock"
"""


class FakeTransport:
    """Collects what would have been written; reading is always on."""

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def writelines(self, lines: list[bytes]) -> None:
        self.out.extend(lines)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, _name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000)

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing


async def measure(requests: int, access: bool, profile: bool) -> float:
    cfg = config.loads(CONFIG.format(access="true" if access else "false"))
    logs.configure(cfg.log)
    loop = asyncio.get_running_loop()
    ctx = WorkerContext(cfg, WorkerMetrics(1), loop)
    client_transport = FakeTransport()
    client = ClientConnection(ctx, False)
    client.connection_made(client_transport)  # type: ignore[arg-type]
    server = ctx.peers[0]
    upstream = UpstreamConnection(server, loop)
    upstream_transport = FakeTransport()
    if hasattr(upstream, "connection_made"):  # a tree from before rawtransport.py
        upstream.connection_made(upstream_transport)
    else:
        upstream.transport = upstream_transport
    upstream.idle_since = loop.time()
    server.put_idle(upstream)

    def one() -> None:
        client.data_received(REQUEST)
        upstream.data_received(RESPONSE)

    for _ in range(2000):
        one()
    assert client_transport.out[-1].endswith(b"ok\n"), "the response did not reach the client"
    profiler = cProfile.Profile() if profile else None
    started = time.process_time()
    if profiler is not None:
        profiler.enable()
    for i in range(requests):
        one()
        if i % 64 == 0:  # let the log sink flush, as the event loop would
            client_transport.out.clear()
            upstream_transport.out.clear()
            await asyncio.sleep(0)
    if profiler is not None:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
    return (time.process_time() - started) / requests * 1e6


async def measure_floor(requests: int) -> float:
    """The same round through bench/targets/floor_proxy.py: the Python floor of uvloop +
    httptools."""
    from bench.targets import floor_proxy

    client_transport = FakeTransport()
    upstream_transport = FakeTransport()
    client = floor_proxy.Client("/nonexistent")
    client.transport = client_transport  # type: ignore[assignment]
    upstream = floor_proxy.Upstream(client)
    upstream.connection_made(upstream_transport)  # type: ignore[arg-type]
    client.upstream = upstream

    def one() -> None:
        client.data_received(REQUEST)
        upstream.data_received(RESPONSE)

    for _ in range(2000):
        one()
    started = time.process_time()
    for i in range(requests):
        one()
        if i % 64 == 0:
            client_transport.out.clear()
            upstream_transport.out.clear()
            await asyncio.sleep(0)
    return (time.process_time() - started) / requests * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    for access in (True, False):
        us = uvloop.run(measure(args.requests, access, args.profile))
        print(f"access log {'on ' if access else 'off'}: {us:.2f} µs of Python per request")
    if not args.profile:
        us = uvloop.run(measure_floor(args.requests))
        print(f"floor proxy   : {us:.2f} µs of Python per request (bench/targets/floor_proxy.py)")


if __name__ == "__main__":
    main()
