"""Instructions per request of one failproxy worker behind unicorn, a loop turn per request.

The seed's no-overload check gives each front 4 connections, so a turn of its loop mostly carries
one request and everything a turn costs is paid per request; `bench.profiles.realsock` counts a
loop shared by three parties and `bench.profiles.instructions` fake transports. Here: unicorn (the
seed app, 2 workers, a UNIX socket), failproxy (1 worker, access log on, the UNIX socket only)
started under callgrind, and a client in this process that sends a request on each of `--conns`
connections and reads every answer before the next (lockstep: one request per turn at
`--conns 1`). After a warm-up the worker's counters are zeroed (`callgrind_control -z`),
`--requests` requests run, and the counters are dumped (`-d`): the figure is the worker's own
user-space instructions, divided by the requests. The same on any machine; unicorn's answer is
the same bytes whatever tree is measured.

    python -m bench.profiles.lockstep [--tree /work/wt/prev] [--requests 2000] [--conns 1]
                                      [--keep /tmp/out]   # keep the callgrind file
                                      [--seed]   # the seed bench's upstream section
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.instruments.procs import Processes, children, wait_http
from bench.instruments.system import free_port, which
from bench.profiles.newconn import HOST, seed_upstream, start_unicorn
from bench.targets import servers
from bench.targets.servers import toml_dumps

REQUEST = b"GET /fast HTTP/1.1\r\nHost: h1\r\nUser-Agent: lockstep\r\n\r\n"


def run(port: int, requests: int, conns: int) -> None:
    """`requests` requests, `conns` at a time in lockstep; a connection the front closes
    (keepalive_requests) is opened again."""
    socks = [socket.create_connection((HOST, port)) for _ in range(conns)]
    for _ in range(requests // conns):
        for s in socks:
            s.sendall(REQUEST)
        for i, s in enumerate(socks):
            got = b""
            while not got.endswith(b"ok\n"):
                chunk = s.recv(65536)
                assert chunk, f"the front closed mid-answer: {got!r}"
                got += chunk
            assert got.startswith(b"HTTP/1.1 200"), got[:200]
            if b"onnection: close" in got:
                s.close()
                socks[i] = socket.create_connection((HOST, port))
    for s in socks:
        s.close()


def measure(tree: Path, requests: int, conns: int, keep: Path | None,
            seed: bool = False) -> float:
    """Instructions per request of the worker of `tree`'s failproxy."""
    assert which("valgrind") and which("callgrind_control"), "valgrind is not installed"
    with tempfile.TemporaryDirectory(prefix="bench-lockstep-") as tmp:
        procs = Processes(Path(tmp))
        try:
            sock, uport, _ = start_unicorn(procs)
            port = free_port(HOST)
            cfg = servers.failproxy_config(
                listen=[f"{HOST}:{port}"], servers=[{"address": f"unix:{sock}"}], workers=1,
                log_file=f"{tmp}/failproxy.log", keepalive=0)
            if seed:
                cfg["upstream"] = seed_upstream(sock, uport)
            path = Path(tmp) / "failproxy.toml"
            path.write_text(toml_dumps(cfg))
            env = servers.python_env(tree)
            env["PYTHONHASHSEED"] = "0"  # the same dict probes each run
            out = f"{tmp}/cg.%p.out"
            front = procs.start("failproxy", [
                "valgrind", "--tool=callgrind", "--trace-children=yes",
                f"--callgrind-out-file={out}", sys.executable, "-m", "failproxy", "serve",
                str(path)], env=env)
            wait_http(front, HOST, port, "/fast", timeout=300)
            run(port, 300, conns)  # warm: the caches, the first allocations
            worker = children(front.pid)[0]
            subprocess.run(["callgrind_control", "-z", str(worker)], check=True,
                           capture_output=True)
            run(port, requests, conns)
            subprocess.run(["callgrind_control", "-d", str(worker)], check=True,
                           capture_output=True)
            dump = Path(tmp) / f"cg.{worker}.out.1"
            for _ in range(100):
                if dump.exists() and "summary:" in dump.read_text(errors="replace"):
                    break
                time.sleep(0.1)
            match = re.search(r"^summary: (\d+)", dump.read_text(errors="replace"), re.M)
            assert match, f"no summary in {dump}"
            if keep is not None:
                shutil.copy(dump, keep)
            return int(match.group(1)) / (requests // conns * conns)
        finally:
            procs.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, default=Path(__file__).resolve().parents[2])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--conns", type=int, default=1)
    parser.add_argument("--keep", type=Path, help="copy the callgrind file here")
    parser.add_argument("--seed", action="store_true",
                        help="the seed bench's upstream section (newconn.seed_upstream): the "
                        "overflow policy's bookkeeping, as the seed check pays it")
    args = parser.parse_args()
    tree = args.tree.resolve()
    per = measure(tree, args.requests, args.conns, args.keep, args.seed)
    print(f"{tree}: {per / 1000:.1f}k instructions per request (the worker alone, "
          f"{args.conns} connection(s) in lockstep)")


if __name__ == "__main__":
    main()
