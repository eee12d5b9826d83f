"""CPU instructions per proxied request through real sockets, counted by callgrind.

`bench.profiles.instructions` counts failproxy's own work on fake transports; this counts what the
transports add: a client, failproxy's worker and an upstream run in one uvloop loop, over real
loopback TCP (client side) and a real UNIX socket (upstream side), pooled or one connection per
request (`--close`, what unicorn does). The client and the upstream are the same small
protocols whatever tree is measured, so the difference between two trees is failproxy's.
callgrind counts user-space instructions only: the syscalls are the same for both trees
(check with strace -c), their kernel time is not in the figure.

    python -m bench.profiles.realsock                        # this checkout: pooled and --close
    python -m bench.profiles.realsock --tree /work/wt/prev   # another checkout built in place
    python -m bench.profiles.realsock --time                 # no callgrind: µs of CPU per request
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

# failproxy comes from the measured tree (PYTHONPATH), this module from its own file.
RUNNER = """\
import importlib.util, sys, uvloop
spec = importlib.util.spec_from_file_location("realsock", sys.argv[4])
realsock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(realsock)
print(uvloop.run(realsock.measure(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "close")))
"""

def _micro() -> Any:
    """This directory's bench/profiles/micro.py, loaded by path (this file runs in a process whose
    `bench` package may be another tree's): its request, response and config are used here."""
    spec = importlib.util.spec_from_file_location("_micro", Path(__file__).parent / "micro.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_M = _micro()
REQUEST: bytes = _M.REQUEST
# micro's response without its `Connection: keep-alive` and body: each mode adds its own.
RESPONSE_HEAD: bytes = _M.RESPONSE[: _M.RESPONSE.index(b"Connection:")]
END = b"\r\n\r\nok\n"
CONFIG: str = (_M.CONFIG.format(access="true")
               .replace("unix:/nonexistent/upstream.sock", "unix:{path}"))


async def measure(requests: int, conns: int, close: bool) -> float:
    """Run `requests` requests on `conns` client connections; CPU µs per request (all three
    parties: only a difference between trees means anything)."""
    import asyncio
    import socket
    import time

    from failproxy import config
    from failproxy.proxy.context import WorkerContext
    from failproxy.proxy.downstream import ClientConnection
    from failproxy.telemetry import logs
    from failproxy.telemetry.metrics import WorkerMetrics

    loop = asyncio.get_running_loop()
    tmp = tempfile.mkdtemp()
    path = f"{tmp}/up.sock"
    response = RESPONSE_HEAD + (b"Connection: close\r\n\r\nok\n" if close
                                else b"Connection: keep-alive\r\n\r\nok\n")

    class Upstream(asyncio.Protocol):
        """Answers every request head it reads; closes after it when `close`."""

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.t: Any = transport
            self.buf = b""

        def data_received(self, data: bytes) -> None:
            self.buf += data
            while b"\r\n\r\n" in self.buf:
                _, self.buf = self.buf.split(b"\r\n\r\n", 1)
                self.t.write(response)
                if close:
                    self.t.close()
                    return

    upstream = await loop.create_unix_server(Upstream, path, backlog=128)  # kept: a server
    # nothing refers to is collected, and its listening socket closed with it
    cfg = config.loads(CONFIG.format(path=path))
    logs.configure(cfg.log)
    ctx = WorkerContext(cfg, WorkerMetrics(1), loop)
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(128)
    port = lsock.getsockname()[1]
    front = await loop.create_server(lambda: ClientConnection(ctx, False), sock=lsock)

    left = [requests]
    done = loop.create_future()

    class Client(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.t: Any = transport
            self.buf = b""
            self._next()

        def _next(self) -> None:
            if left[0] <= 0:
                if not done.done():
                    done.set_result(None)
                return
            left[0] -= 1
            self.t.write(REQUEST)

        def data_received(self, data: bytes) -> None:
            buf = self.buf + data  # one response ends at each END (failproxy rewrites the head)
            n = buf.count(END)
            self.buf = buf[buf.rindex(END) + len(END):] if n else buf
            for _ in range(n):
                self._next()

    async def run(n: int) -> None:
        left[0] = n
        nonlocal done
        done = loop.create_future()
        for _ in range(conns):
            await loop.create_connection(Client, "127.0.0.1", port)
        await done

    await run(200)  # warm: the pool, the caches, the first allocations
    started = time.process_time()
    await run(requests)
    spent = (time.process_time() - started) / requests * 1e6
    front.close()
    upstream.close()
    return spent


def _run(tree: Path, requests: int, conns: int, mode: str, python: str,
         wrap: list[str]) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONHASHSEED="0")  # same dict probes each run
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "run.py"
        script.write_text(RUNNER)
        return subprocess.run(
            [*[w.format(tmp=tmp) for w in wrap], python, str(script), str(requests), str(conns),
             mode, __file__], cwd=tree, env=env, capture_output=True, text=True, check=True)


def collected(tree: Path, requests: int, conns: int, mode: str, python: str) -> int:
    out = _run(tree, requests, conns, mode, python,
               ["valgrind", "--tool=callgrind", "--callgrind-out-file={tmp}/cg.out"])
    match = re.search(r"Collected : (\d+)", out.stderr)
    if match is None:
        raise SystemExit(f"callgrind printed no count:\n{out.stderr[-2000:]}")
    return int(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, default=Path(__file__).resolve().parents[2])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--conns", type=int, default=4)
    parser.add_argument("--mode", choices=("pooled", "close", "both"), default="both")
    parser.add_argument("--time", action="store_true", help="CPU time, no callgrind")
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args()
    tree = args.tree.resolve()
    modes = ("pooled", "close") if args.mode == "both" else (args.mode,)
    for mode in modes:
        if args.time:
            out = _run(tree, args.requests, args.conns, mode, args.python, []).stdout
            print(f"{tree} {mode}: {float(out.split()[-1]):.1f} µs CPU per request (all parties)")
            continue
        one = collected(tree, 1, args.conns, mode, args.python)
        many = collected(tree, 1 + args.requests, args.conns, mode, args.python)
        print(f"{tree} {mode}: {(many - one) / args.requests / 1000:.1f}k instructions per "
              f"request (client, failproxy, upstream)")


if __name__ == "__main__":
    main()
