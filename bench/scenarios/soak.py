"""The fault soak (issue 9 item 5): `python -m bench.scenarios.soak [--requests 10000]`
(`make soak`).

failproxy (1 worker) in front of two real unicorn app servers running bench/targets/soak_app:
"local" (a UNIX socket with backlog 5, and TCP) and "peer" (TCP), ordered as on a cluster box: the
local socket, then the peer's TCP port, then local's own TCP port (`upstream.self`). Paced client
threads on keep-alive connections send the requests, half POST with unique ids, while:

- every `--kill-every` s one app worker (mostly local's) is SIGKILLed; unicorn respawns it;
- 1 % of requests ask the app to reset the connection before answering and 0.5 % to cut the
  answer mid-body (on the first sight of the id only, so an allowed retry succeeds);
- 1 % of requests are reset by the client itself after sending.

It counts, and `check()` asserts:
- 0 POST ids seen twice by the app servers (each logs every POST id as it arrives), and 0 POSTs
  that failproxy's own log shows moved to another server after a reset or timeout;
- 0 requests answered twice (an answer for another id, or bytes after an answer);
- 0 truncated responses presented as complete: every complete answer is byte-for-byte the body
  the app made for that id; a cut answer must end its connection;
- >= 99.9 % of idempotent requests (GET; not reset by the client, not cut on purpose) answered
  200 with the whole body.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.instruments.procs import Processes, children, wait_http
from bench.targets.servers import failproxy_config, start_failproxy

APP_DIR = Path(__file__).resolve().parents[1] / "targets" / "soak_app"
HOST = "127.0.0.1"


def payload(rid: str, size: int) -> bytes:
    unit = f"{rid}.".encode()
    return (unit * (size // len(unit) + 1))[:size]


@dataclass
class Spec:
    rid: str
    method: str
    size: int
    ms: int
    fault: str  # "", "reset", "cut"
    client_reset: bool
    body: bytes = b""


def make_specs(n: int, seed: int) -> list[Spec]:
    rng = random.Random(seed)
    run = f"{seed:x}{int(time.time()) % 100000:05d}"
    out = []
    for i in range(n):
        method = "POST" if i % 2 else "GET"
        size = rng.choices([0, 100, 2000, 30000, 150000], [5, 40, 30, 23, 2])[0]
        ms = rng.choices([0, 5, 20, 50, 200], [30, 30, 20, 15, 5])[0]
        r = rng.random()
        fault = "reset" if r < 0.01 else "cut" if r < 0.015 and size >= 100 else ""
        body = rng.randbytes(rng.choice([10, 1000, 20000])) if method == "POST" else b""
        out.append(Spec(f"{run}-{i}", method, size, ms, fault, rng.random() < 0.01, body))
    return out


def request_bytes(s: Spec) -> bytes:
    head = (f"{s.method} /soak/{s.rid} HTTP/1.1\r\nHost: soak.test\r\nX-Id: {s.rid}\r\n"
            f"X-Size: {s.size}\r\nX-Ms: {s.ms}\r\nX-Body-Len: {len(s.body)}\r\n")
    if s.body:
        head += f"X-Body-Sha: {hashlib.sha256(s.body).hexdigest()}\r\n"
    if s.fault:
        head += f"X-Fault: {s.fault}\r\n"
    if s.method == "POST":
        head += f"Content-Length: {len(s.body)}\r\n"
    return (head + "\r\n").encode() + s.body


class Cut(Exception):
    """The connection ended before the answer was complete."""


class Client:
    """One keep-alive connection to the proxy that reads whole answers (CL or chunked)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock: socket.socket | None = None
        self.buf = b""

    def connect(self) -> socket.socket:
        if self.sock is None:
            self.sock = socket.create_connection((HOST, self.port), timeout=30)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.buf = b""
        return self.sock

    def close(self, reset: bool = False) -> None:
        if self.sock is not None:
            if reset:
                with contextlib.suppress(OSError):
                    self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                         struct.pack("ii", 1, 0))
            with contextlib.suppress(OSError):
                self.sock.close()
        self.sock = None
        self.buf = b""

    def unsolicited(self) -> bytes:
        """Bytes that arrived while no request was outstanding (an answer given twice)."""
        if self.sock is None:
            return b""
        self.sock.setblocking(False)
        try:
            data = self.sock.recv(65536, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            data = b""
        except OSError:
            data = b""
        finally:
            self.sock.settimeout(30)
        return self.buf + data

    def _fill(self) -> None:
        assert self.sock is not None
        try:
            data = self.sock.recv(262144)
        except (ConnectionResetError, TimeoutError) as e:
            raise Cut(repr(e)) from None
        if not data:
            raise Cut("eof")
        self.buf += data

    def _until(self, marker: bytes) -> bytes:
        while (i := self.buf.find(marker)) < 0:
            self._fill()
        out, self.buf = self.buf[:i], self.buf[i + len(marker):]
        return out

    def _exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read(self) -> tuple[int, dict[str, str], bytes]:
        head = self._until(b"\r\n\r\n").decode("latin-1").split("\r\n")
        status = int(head[0].split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in head[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            parts = []
            while True:
                n = int(self._until(b"\r\n").split(b";")[0], 16)
                if n == 0:
                    while self._until(b"\r\n"):
                        pass
                    break
                parts.append(self._exact(n))
                if self._exact(2) != b"\r\n":
                    raise ValueError("bad chunk end")
            body = b"".join(parts)
        elif "content-length" in headers:
            body = self._exact(int(headers["content-length"]))
        else:
            raise ValueError(f"answer without framing: {head}")
        return status, headers, body


@dataclass
class Tally:
    counts: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, key: str) -> None:
        with self.lock:
            self.counts[key] += 1

    def bad(self, what: str) -> None:
        with self.lock:
            self.counts["violations"] += 1
            if len(self.violations) < 50:
                self.violations.append(what)


def one(c: Client, s: Spec, t: Tally) -> None:
    kind = f"{s.method} {'fault-' + s.fault if s.fault else 'plain'}"
    sock = c.connect()
    extra = c.unsolicited()
    if extra:
        t.bad(f"{s.rid}: {len(extra)} bytes arrived before it was sent: {extra[:120]!r}")
        c.close()
        sock = c.connect()
    try:
        sock.sendall(request_bytes(s))
    except OSError:
        # the proxy closed this kept-alive connection just now (RFC 9112 9.3.1: a client
        # retries on a new one when nothing of the request can have been processed)
        t.add("client resent on a new connection")
        c.close()
        sock = c.connect()
        sock.sendall(request_bytes(s))
    if s.client_reset:
        time.sleep(random.random() * 0.015)
        c.close(reset=True)
        t.add(f"{s.method} client-reset")
        return
    try:
        status, headers, body = c.read()
    except Cut as e:
        c.close()
        t.add(f"{kind} -> cut")
        if not s.fault and s.method == "GET":
            t.add("GET cut unplanned")
        del e
        return
    except (ValueError, IndexError) as e:
        t.bad(f"{s.rid}: unreadable answer ({e})")
        c.close()
        return
    rid = headers.get("x-id")
    if rid is not None and rid != s.rid:
        t.bad(f"{s.rid}: got the answer for {rid} (answered twice or out of order)")
    elif status == 200 and rid == s.rid:
        if s.method == "POST" and s.fault == "reset":
            t.bad(f"{s.rid}: a POST the app reset was answered 200: it was replayed")
        elif body != payload(s.rid, s.size):
            t.bad(f"{s.rid}: a {status} with {len(body)} bytes, not the {s.size} the app sent "
                  f"(truncated or corrupt, presented as complete)")
        else:
            t.add(f"{kind} -> 200")
    elif status in (502, 504) and rid is None:
        t.add(f"{kind} -> {status}")
    else:
        t.bad(f"{s.rid}: unexpected {status} {body[:100]!r}")
    if "close" in headers.get("connection", "").lower():
        c.close()
    elif c.buf:
        t.bad(f"{s.rid}: {len(c.buf)} bytes after its answer: {c.buf[:120]!r}")
        c.close()


def _sockets(pid: int) -> set[str]:
    out = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:"):
                    out.add(link)
    return out


def killer(masters: dict[str, int], every: float, stop: threading.Event, t: Tally,
           rng: random.Random) -> None:
    """Every `every` s SIGKILL one worker of an app server (local 70 %, peer 30 %), a busy one
    when there is one within 0.3 s (it holds a socket its master does not: an accepted
    connection), so that most kills cut a request in flight."""
    while not stop.wait(every):
        name = "local" if rng.random() < 0.7 else "peer"
        workers = children(masters[name])
        if not workers:
            continue
        listening = _sockets(masters[name])
        busy: list[int] = []
        for _ in range(30):  # wait up to ~0.3 s for a worker with a request in hand
            busy = [w for w in workers if _sockets(w) - listening]
            if busy or stop.wait(0.01):
                break
        victim = rng.choice(busy or workers)
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)
            t.add(f"kill {name}")
            if busy:
                t.add(f"kill {name} busy")


def start_app(procs: Processes, name: str, tcp_port: int, unix: str | None) -> int:
    exe = shutil.which("unicorn")
    if exe is None:
        raise SystemExit("unicorn is not installed (Debian package `unicorn`)")
    d = procs.workdir
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(d), "SOAK_NAME": name,
           "SOAK_TCP": f"{HOST}:{tcp_port}", "SOAK_DIR": str(d), "SOAK_WORKERS": "2",
           "SOAK_LOG": str(d / f"posts-{name}.log"), "SOAK_MARKS": str(d / "marks")}
    if unix:
        env["SOAK_UNIX"] = unix
    proc = procs.start(f"unicorn-{name}", [exe, "-E", "production", "-c",
                                           str(APP_DIR / "unicorn.conf.rb"),
                                           str(APP_DIR / "config.ru")], env=env)
    wait_http(proc, HOST, tcp_port, "/", timeout=30)
    return proc.pid


def free_port() -> int:
    s = socket.socket()
    s.bind((HOST, 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def run(requests: int = 10000, rate: float = 150.0, kill_every: float = 2.0,
        threads: int = 12, seed: int = 1, workdir: Path | None = None) -> dict[str, Any]:
    own_dir = workdir is None
    d = Path(workdir or tempfile.mkdtemp(prefix="fpsoak-", dir="/tmp"))
    (d / "marks").mkdir(parents=True, exist_ok=True)
    procs = Processes(d)
    t = Tally()
    t0 = time.monotonic()
    try:
        local_tcp, peer_tcp, front = free_port(), free_port(), free_port()
        sock = str(d / "local.sock")
        masters = {"local": start_app(procs, "local", local_tcp, sock),
                   "peer": start_app(procs, "peer", peer_tcp, None)}
        cfg = failproxy_config(
            listen=[f"{HOST}:{front}"], workers=1, log_file=str(d / "failproxy.log"),
            self_address=f"{HOST}:{local_tcp}",
            servers=[{"address": f"unix:{sock}"},
                     {"address": f"{HOST}:{peer_tcp}", "backup": True},
                     {"address": f"{HOST}:{local_tcp}", "backup": True}])
        start_failproxy(procs, "failproxy", cfg, probe=None)
        _wait_port(front, 20)
        specs = make_specs(requests, seed)
        by_id = {s.rid: s for s in specs}
        stop = threading.Event()
        k = threading.Thread(target=killer, args=(masters, kill_every, stop, t,
                                                  random.Random(seed + 1)), daemon=True)
        started = time.monotonic()
        k.start()
        nxt = iter(range(len(specs)))
        lock = threading.Lock()

        def worker() -> None:
            c = Client(front)
            try:
                while True:
                    with lock:
                        i = next(nxt, None)
                    if i is None:
                        return
                    due = started + i / rate
                    if (wait := due - time.monotonic()) > 0:
                        time.sleep(wait)
                    try:
                        one(c, specs[i], t)
                    except OSError as e:
                        t.bad(f"{specs[i].rid}: client error {e!r}")
                        c.close()
            finally:
                c.close()

        pool = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
        for th in pool:
            th.start()
        budget = requests / rate + 120
        for th in pool:
            th.join(max(1.0, started + budget - time.monotonic()))
        stop.set()
        k.join(5)
        load_s = time.monotonic() - started
        if any(th.is_alive() for th in pool):
            t.bad("the load did not finish in time")
        time.sleep(0.5)  # the last POSTs' log lines
        result = _summarise(d, t, by_id, load_s, requests, rate, kill_every)
        result["seconds_total"] = round(time.monotonic() - t0, 1)
        return result
    finally:
        procs.close()
        if own_dir:
            shutil.rmtree(d, ignore_errors=True)


def _wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
            time.sleep(0.3)  # the master forks its worker
            return
        time.sleep(0.05)
    raise RuntimeError(f"failproxy not accepting on {port}")


def _summarise(d: Path, t: Tally, by_id: dict[str, Spec], load_s: float, requests: int,
               rate: float, kill_every: float) -> dict[str, Any]:
    seen: Counter[str] = Counter()
    for name in ("local", "peer"):
        p = d / f"posts-{name}.log"
        if p.exists():
            seen.update(line for line in p.read_text().split("\n") if line)
    twice = sorted(k for k, v in seen.items() if v > 1)
    replays = []
    failovers: Counter[str] = Counter()
    for line in (d / "failproxy.log").read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            ev = json.loads(line)
            if ev.get("event") == "failover":
                failovers[ev.get("reason", "?")] += 1
                if ev.get("method") == "POST" and ev.get("reason") in (
                        "reset", "timeout", "http_502", "http_503", "http_504"):
                    replays.append(ev.get("path"))
    c = t.counts
    get_total = sum(v for k, v in c.items() if k.startswith("GET plain ->"))
    get_ok = c["GET plain -> 200"]
    posts_sent = sum(1 for s in by_id.values() if s.method == "POST")
    return {
        "command": f"python -m bench.scenarios.soak --requests {requests} --rate {rate:g} "
                   f"--kill-every {kill_every:g}",
        "requests": requests, "load_seconds": round(load_s, 1),
        "kills": c["kill local"] + c["kill peer"], "kills_by_server": {
            "local": c["kill local"], "peer": c["kill peer"]},
        "kills_of_a_busy_worker": c["kill local busy"] + c["kill peer busy"],
        "failovers": dict(failovers),
        "posts_sent": posts_sent, "post_ids_logged_by_apps": len(seen),
        "posts_seen_twice": len(twice), "posts_seen_twice_ids": twice[:10],
        "post_replays_in_failproxy_log": len(replays),
        "violations": c["violations"], "violation_samples": t.violations[:10],
        "get_plain_total": get_total, "get_plain_200": get_ok,
        "get_plain_200_ratio": round(get_ok / get_total, 5) if get_total else 0.0,
        "get_plain_cut": c["GET cut unplanned"],
        "outcomes": dict(sorted((k, v) for k, v in c.items()
                                if "->" in k or "client-reset" in k)),
    }


def check(r: dict[str, Any]) -> list[str]:
    """What the soak must show; returns the failures (empty: it passed)."""
    out = []
    if r["posts_seen_twice"]:
        out.append(f"{r['posts_seen_twice']} POSTs reached the app servers twice: "
                   f"{r['posts_seen_twice_ids']}")
    if r["post_replays_in_failproxy_log"]:
        out.append(f"{r['post_replays_in_failproxy_log']} POSTs moved on after a reset/timeout")
    if r["violations"]:
        out.append(f"{r['violations']} violations: {r['violation_samples']}")
    if r["get_plain_200_ratio"] < 0.999:
        out.append(f"idempotent requests answered 200: {r['get_plain_200_ratio']:.4%} < 99.9 %")
    if not r["kills"]:
        out.append("no worker was killed")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.scenarios.soak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=10000)
    ap.add_argument("--rate", type=float, default=150.0, help="requests per second offered")
    ap.add_argument("--kill-every", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=12)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = ap.parse_args(argv)
    r = run(args.requests, args.rate, args.kill_every, args.threads, args.seed)
    text = json.dumps(r, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    failures = check(r)
    for f in failures:
        print(f"FAIL: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
