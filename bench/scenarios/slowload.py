"""The slow clients of the "slowclients" scenario, run as a process of their own:
`python -m bench.scenarios.slowload --port P --uploaders N --readers N --ramp S --settle S
--ready FILE --out FILE`.

Two kinds of client, the ones unicorn's authors say must never reach a unicorn worker:

- an *uploader* sends `POST /upload` with a 160 KiB body in 16 KiB pieces, one every 0.3 s
  (a phone on a bad network), reads the app's answer ("<size> <sha256>"), checks the size, and
  starts again on the same connection (a new one after an error or a close);
- a *reader* sends `GET /big` (8 MiB) with a small receive buffer (SO_RCVBUF 8 KiB) and reads
  4 KiB of it every 0.1 s (a slow downlink); an answer read whole is followed by the next one.

Why a process of its own, with plain non-blocking sockets and one 0.1 s tick: a thousand such
clients cost the client CPU, and in the harness's process they would delay the fast requests'
sends (which the open-loop client measures from their scheduled time) and show up as proxy
latency. One tick loop makes the pace exact and the cost a bounded number of syscalls per tick.

Clients start spread over `--ramp` seconds (a thousand requests for /big at once would overflow
unicorn's backlog of 5 through any proxy); `--settle` seconds later the file `--ready` is
written, and the harness starts its measured window. Everything before that is the *ramp*
phase, after it the *window*: the counts are kept apart. The process ends on SIGTERM or after
`--max-seconds`, closes every socket and writes its counts as JSON to `--out`.

Any answer that is not a 200, an upload answer with the wrong size, a close or reset before an
answer ended, or no progress for 30 s (`STALL_S`) is an error, counted by kind; after an error
a client waits 1 s before it tries again, so a broken proxy is not hammered.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Any

PIECE = 16384
PIECES = 10  # 160 KiB per upload
PIECE_EVERY = 0.3
READ_BYTES = 4096
RCVBUF = 8192  # the kernel doubles it
TICK = 0.1
STALL_S = 30.0  # no byte of an answer for this long: an error ("stall")
RETRY_AFTER = 1.0
BODY = bytes(range(256)) * (PIECE // 256)


class Phase:
    """Counts of one phase (ramp or window)."""

    def __init__(self) -> None:
        self.errors: Counter[str] = Counter()
        self.uploads_ok = 0
        self.upload_bytes = 0
        self.upload_answer_ms: list[float] = []  # last piece sent -> answer read whole
        self.answers_ok = 0  # /big answers read whole
        self.read_bytes = 0
        self.connects = 0
        # the first 10 errors of each kind in detail: kind, seconds since the connect, bytes
        # of the answer read, seconds since the last byte moved (a stall, or a cut)
        self.samples: list[tuple[str, float, int, float]] = []

    def as_dict(self) -> dict[str, Any]:
        lat = sorted(self.upload_answer_ms)

        def q(p: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(p / 100 * len(lat)))], 2) if lat else None

        return {"errors": dict(self.errors), "error_count": sum(self.errors.values()),
                "uploads_ok": self.uploads_ok, "upload_bytes": self.upload_bytes,
                "upload_answer_p50_ms": q(50), "upload_answer_p99_ms": q(99),
                "upload_answer_max_ms": round(lat[-1], 2) if lat else None,
                "big_answers_ok": self.answers_ok, "read_bytes": self.read_bytes,
                "connects": self.connects,
                "error_samples": [{"kind": k, "conn_age_s": round(a, 1), "answer_bytes": g,
                                   "idle_s": round(i, 1)} for k, a, g, i in self.samples]}


class Load:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.ramp = Phase()
        self.window = Phase()
        self.in_window = False

    @property
    def phase(self) -> Phase:
        return self.window if self.in_window else self.ramp


def _parse_head(buf: bytes) -> tuple[int, int, bool, int] | None:
    """(status, content-length, close, head length) once the head is in `buf`, else None."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = buf[:end].decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        return (0, 0, True, end + 4)
    length, close = 0, False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value.strip() or 0)
        elif name == "connection" and value.strip().lower() == "close":
            close = True
    return status, length, close, end + 4


class Client:
    """What both kinds share: a socket (re)opened when due, errors counted, a retry later."""

    def __init__(self, load: Load, index: int) -> None:
        self.load = load
        self.index = index
        self.sock: socket.socket | None = None
        self.connected_at = 0.0
        self.next_start = 0.0
        self.last_progress = 0.0
        self.buf = b""

    def connect(self, rcvbuf: int | None) -> bool:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(5.0)
        try:
            sock.connect((self.load.host, self.load.port))
        except OSError as exc:
            sock.close()
            self.fail(f"connect_{type(exc).__name__}", time.monotonic())
            return False
        sock.setblocking(False)
        self.sock = sock
        self.connected_at = time.monotonic()
        self.load.phase.connects += 1
        return True

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None
        self.buf = b""

    def fail(self, kind: str, now: float) -> None:
        phase = self.load.phase
        phase.errors[f"{self.kind}_{kind}"] += 1
        if sum(1 for x in phase.samples if x[0] == f"{self.kind}_{kind}") < 10:
            phase.samples.append((f"{self.kind}_{kind}", now - self.connected_at,
                                  self.answer_bytes(), now - self.last_progress))
        self.close()
        self.next_start = now + RETRY_AFTER
        self.reset()

    kind = "client"

    def reset(self) -> None:
        """Back to 'nothing sent'; the subclass's state."""

    def answer_bytes(self) -> int:
        return len(self.buf)

    def recv(self, n: int, now: float) -> bytes | None:
        """Up to n bytes, b"" at a clean close, None when nothing is there (or it failed)."""
        assert self.sock is not None
        try:
            data = self.sock.recv(n)
        except BlockingIOError:
            return None
        except OSError as exc:
            self.fail(type(exc).__name__, now)
            return None
        if data:
            self.last_progress = now
        return data


class Uploader(Client):
    kind = "upload"

    def __init__(self, load: Load, index: int) -> None:
        super().__init__(load, index)
        self.reset()

    def reset(self) -> None:
        self.state = "idle"
        self.pending = b""
        self.pieces = 0
        self.next_piece = 0.0
        self.sent_at = 0.0

    def tick(self, now: float) -> None:
        if self.state == "idle":
            if now < self.next_start or (self.sock is None and not self.connect(None)):
                return
            head = (f"POST /upload HTTP/1.1\r\nHost: app\r\nContent-Type: "
                    f"application/octet-stream\r\nContent-Length: {PIECE * PIECES}\r\n\r\n")
            self.pending = head.encode() + BODY
            self.pieces, self.next_piece = 1, now + PIECE_EVERY
            self.state, self.last_progress = "sending", now
        if self.state == "sending":
            if not self.pending and self.pieces < PIECES and now >= self.next_piece - 0.01:
                self.pending, self.pieces = BODY, self.pieces + 1
                self.next_piece += PIECE_EVERY
            if self.pending:
                assert self.sock is not None
                try:
                    n = self.sock.send(self.pending)
                except BlockingIOError:
                    n = 0
                except OSError as exc:
                    self.fail(f"send_{type(exc).__name__}", now)
                    return
                self.pending = self.pending[n:]
                self.load.phase.upload_bytes += n
                if n:
                    self.last_progress = now
            if not self.pending and self.pieces == PIECES:
                self.state, self.sent_at, self.last_progress = "waiting", now, now
            elif now - self.last_progress > STALL_S:
                self.fail("send_stall", now)
                return
        # an answer may come early (413, 408, 503): look for it while sending too
        if self.state in ("sending", "waiting"):
            self._read_answer(now)

    def _read_answer(self, now: float) -> None:
        data = self.recv(65536, now)
        if data is None:
            if self.sock is not None and now - self.last_progress > STALL_S:
                self.fail("answer_timeout", now)
            return
        if not data:
            self.fail("closed", now)
            return
        self.buf += data
        head = _parse_head(self.buf)
        if head is None:
            return
        status, length, close, hlen = head
        if len(self.buf) < hlen + length:
            return
        body = self.buf[hlen:hlen + length]
        if status != 200:
            self.fail(f"http_{status}", now)
            return
        if self.state != "waiting" or body.split(b" ", 1)[0] != str(PIECE * PIECES).encode():
            self.fail("bad_answer", now)
            return
        phase = self.load.phase
        phase.uploads_ok += 1
        phase.upload_answer_ms.append((now - self.sent_at) * 1000)
        self.buf = b""
        if close:
            self.close()
        self.reset()
        self.next_start = now  # loop: the next upload at once


class Reader(Client):
    kind = "read"
    REQUEST = b"GET /big HTTP/1.1\r\nHost: app\r\n\r\n"

    def __init__(self, load: Load, index: int) -> None:
        super().__init__(load, index)
        self.reset()

    def reset(self) -> None:
        self.state = "idle"
        self.length = -1
        self.got = 0
        self.close_after = False

    def answer_bytes(self) -> int:
        return self.got + len(self.buf)

    def tick(self, now: float) -> None:
        if self.state == "idle":
            if now < self.next_start or (self.sock is None and not self.connect(RCVBUF)):
                return
            assert self.sock is not None
            try:
                self.sock.send(self.REQUEST)  # a few bytes into an empty buffer: all go
            except OSError as exc:
                self.fail(f"send_{type(exc).__name__}", now)
                return
            self.state, self.last_progress = "reading", now
        data = self.recv(READ_BYTES, now)
        if data is None:
            if self.sock is not None and now - self.last_progress > STALL_S:
                self.fail("stall", now)
            return
        if not data:
            self.fail("closed", now)
            return
        phase = self.load.phase
        if self.length < 0:
            self.buf += data
            head = _parse_head(self.buf)
            if head is None:
                return
            status, length, close, hlen = head
            if status != 200:
                self.fail(f"http_{status}", now)
                return
            self.length, self.close_after = length, close
            data, self.buf = self.buf[hlen:], b""
        phase.read_bytes += len(data)
        self.got += len(data)
        if self.got >= self.length:
            phase.answers_ok += 1
            close = self.close_after
            self.reset()
            if close:
                self.close()
            self.next_start = now


def run(args: argparse.Namespace) -> dict[str, Any]:
    load = Load(args.host, args.port)
    clients: list[Client] = []
    for i in range(max(args.uploaders, args.readers)):  # interleaved: both kinds ramp together
        if i < args.uploaders:
            clients.append(Uploader(load, i))
        if i < args.readers:
            clients.append(Reader(load, i))
    stop = False

    def on_term(_sig: int, _frame: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    t0 = time.monotonic()
    deadline = t0 + args.max_seconds
    ready_at = t0 + args.ramp + args.settle
    window_t0 = None
    started = 0
    tick = 0
    late = 0.0  # the most a tick started after its time: the client's own delay
    ramp_late = 0.0
    while not stop and time.monotonic() < deadline:
        now = time.monotonic()
        late = max(late, now - (t0 + tick * TICK))
        # client k starts at t0 + k * ramp / len(clients); an uploader's pieces then keep to
        # its own 0.3 s phase, so the sends spread over the ticks
        due = len(clients) if args.ramp <= 0 else min(
            len(clients), int((now - t0) / args.ramp * len(clients)) + 1)
        for c in clients[started:due]:
            c.next_start = now
        started = max(started, due)
        for c in clients[:started]:
            c.tick(now)
        if window_t0 is None and now >= ready_at and started == len(clients):
            load.in_window, window_t0 = True, now
            ramp_late, late = late, 0.0
            Path(args.ready).write_text(json.dumps({"ramp_s": round(now - t0, 2)}))
        tick += 1
        time.sleep(max(0.0, t0 + tick * TICK - time.monotonic()))
    end = time.monotonic()
    for c in clients:
        c.close()
    return {"uploaders": args.uploaders, "readers": args.readers, "ramp_s": args.ramp,
            "settle_s": args.settle, "stopped_by": "signal" if stop else "max_seconds",
            "window_s": round(end - window_t0, 2) if window_t0 else 0.0,
            "ramp": load.ramp.as_dict(), "window": load.window.as_dict(),
            "max_tick_late_ms": {"ramp": round(ramp_late * 1000, 1),
                                 "window": round(late * 1000, 1)}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--uploaders", type=int, default=0)
    p.add_argument("--readers", type=int, default=0)
    p.add_argument("--ramp", type=float, default=2.0)
    p.add_argument("--settle", type=float, default=2.0)
    p.add_argument("--max-seconds", type=float, default=600.0)
    p.add_argument("--ready", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    if not args.host.startswith("127."):
        raise SystemExit("loopback only: --host must be a 127.x address")
    result = run(args)
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
