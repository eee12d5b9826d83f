"""CPU per upstream connection: uvloop's transport (as failproxy made it until 8cc2c28) against
rawtransport.SocketTransport, the client side alone.

unicorn (bench.profiles.newconn's: seed app, 2 workers, UNIX socket); in this process, on uvloop, 4
request loops at once, each: socket(), connect(), send a GET, read to EOF, close, again. The
`transport` way wraps the connected socket with a Task awaiting
`loop.create_unix_connection(sock=...)`; the `raw` way is failproxy's SocketTransport. CPU is
this process's utime/stime (getrusage) over the requests; modes alternate, medians.

    python -m bench.profiles.conncost [--requests 20000] [--rounds 3]
"""

from __future__ import annotations

import _socket
import argparse
import asyncio
import resource
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import uvloop

from bench.instruments.procs import Processes
from bench.instruments.stats import median
from bench.profiles.newconn import start_unicorn
from failproxy.proxy.rawtransport import SocketTransport

REQUEST = b"GET /fast HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
CONCURRENCY = 4


class Reader:
    """Reads a response to EOF, then starts the next request (`done`)."""

    def __init__(self, done: Callable[[], None]) -> None:
        self.done = done
        self.got = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        pass

    def data_received(self, data: bytes) -> None:
        self.got += len(data)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        assert self.got > 0, "no response"
        self.done()

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass


def run(mode: str, path: str, requests: int) -> tuple[float, float, float]:
    """(req/s, user µs/request, system µs/request) for `requests` through `mode`."""
    loop = uvloop.new_event_loop()
    left = [requests]
    running = [CONCURRENCY]

    def one() -> None:
        if left[0] <= 0:
            running[0] -= 1
            if running[0] == 0:
                loop.stop()
            return
        left[0] -= 1
        reader = Reader(one)
        if mode == "transport":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            sock.connect(path)

            async def wrap() -> None:
                transport, _ = await loop.create_unix_connection(lambda: reader, sock=sock)
                transport.write(REQUEST)

            loop.create_task(wrap())
        else:
            raw = _socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            raw.connect(path)
            SocketTransport(loop, raw.detach(), reader).write(REQUEST)

    for _ in range(CONCURRENCY):
        loop.call_soon(one)
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    loop.run_forever()
    r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    loop.close()
    return (requests / (t1 - t0), (r1.ru_utime - r0.ru_utime) * 1e6 / requests,
            (r1.ru_stime - r0.ru_stime) * 1e6 / requests)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-conncost-") as tmp:
        procs = Processes(Path(tmp))
        try:
            sock, _port, _unicorn = start_unicorn(procs)
            rows: dict[str, list[tuple[float, float, float]]] = {"transport": [], "raw": []}
            for r in range(args.rounds):
                for mode in rows:
                    rows[mode].append(run(mode, sock, args.requests))
                    rps, user, system = rows[mode][-1]
                    print(f"round {r + 1} {mode:<9} {rps:8,.0f} req/s  user {user:5.1f} "
                          f"system {system:5.1f} µs/request", flush=True)
        finally:
            procs.close()
    print(f"\n{args.requests} requests x {args.rounds} rounds, {CONCURRENCY} at once, medians\n")
    print("| upstream connection made by | req/s | user µs/req | system µs/req | total |")
    print("|---|---|---|---|---|")
    for mode, rs in rows.items():
        user, system = median([x[1] for x in rs]), median([x[2] for x in rs])
        label = ("uvloop create_unix_connection in a Task" if mode == "transport"
                 else "rawtransport.SocketTransport")
        print(f"| {label} | {median([x[0] for x in rs]):,.0f} | {user:.1f} | {system:.1f} | "
              f"{user + system:.1f} |")


if __name__ == "__main__":
    main()
