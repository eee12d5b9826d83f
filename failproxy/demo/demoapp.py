"""A tiny pre-fork app server that behaves like unicorn, for `failproxy demo` and the tests.

The master binds a UNIX listener (backlog 5: it fails fast) and a TCP listener (backlog 1024: it
fails slowly), then forks N workers that share them. Each worker serves ONE request at a time:
it waits in select() on both listeners, accepts (non-blocking, EAGAIN ignored: another worker
won the race), reads one HTTP/1.1 request, answers with `Connection: close` and closes. While
every worker is busy, new connections wait in the kernel's accept queues; once the UNIX queue is
full (backlog + 1 connections) a non-blocking connect() to it fails with EAGAIN at once. An
asyncio server would accept eagerly and never fill its backlog, which is why this one forks.

    python -m failproxy.demo.demoapp --name host1 --unix /tmp/h1.sock --tcp 127.0.1.1:9001 \
        --workers 2

Paths: `/fast` and `/items/<id>` (tiny body), `/slow?ms=N` (sleeps N ms, default 100),
`/reports/<id>` (sleeps `--slow-ms`, default 300, or `?ms=N`: a slow action on a route of its
own, as a proxy's route learning sees it), `/echo` (answers the request body).
Every response carries `X-Served-By: NAME/PID` and `X-Served-Via: unix|tcp`.
Master: TERM/INT/QUIT kill the workers, remove the socket file and exit 0; a worker that dies is
replaced. Workers exit when the master is gone. Standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Sequence
from urllib.parse import parse_qs, urlsplit

UNIX_BACKLOG = 5
TCP_BACKLOG = 1024
MAX_HEAD = 65536
MAX_BODY = 64 * 1024 * 1024
IO_TIMEOUT = 30.0
MAX_SLOW_MS = 60_000
REPORT_MS = 300  # what /reports/<id> sleeps unless --slow-ms or ?ms= says otherwise

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            413: "Content Too Large"}


class _BadRequest(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status


class _Closed(Exception):
    """The client closed the connection before sending a whole request head."""


class _Stop(Exception):
    """Raised by the master's signal handlers."""


# ---------------------------------------------------------------------------- worker


class _Reader:
    """Buffered reads from a blocking socket."""

    __slots__ = ("buf", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _more(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise _Closed
        self.buf += data

    def until(self, sep: bytes, limit: int) -> bytes:
        while True:
            i = self.buf.find(sep)
            if i >= 0:
                out, self.buf = self.buf[:i], self.buf[i + len(sep):]
                return out
            if len(self.buf) > limit:
                raise _BadRequest(400, "line or head too long")
            self._more()

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._more()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out


def _read_request(reader: _Reader) -> tuple[str, str, dict[str, str], bytes]:
    head = reader.until(b"\r\n\r\n", MAX_HEAD)
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _BadRequest(400, "bad request line")
    method, target, _version = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise _BadRequest(400, "bad header line")
        headers[name.lower()] = value.strip()
    body = b""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        chunks: list[bytes] = []
        total = 0
        while True:
            size_line = reader.until(b"\r\n", 1024)
            try:
                size = int(size_line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise _BadRequest(400, "bad chunk size") from None
            if size == 0:
                while reader.until(b"\r\n", MAX_HEAD):  # trailers up to the empty line
                    pass
                break
            total += size
            if total > MAX_BODY:
                raise _BadRequest(413, "body too large")
            chunks.append(reader.exactly(size))
            reader.exactly(2)
        body = b"".join(chunks)
    elif "content-length" in headers:
        try:
            length = int(headers["content-length"])
        except ValueError:
            raise _BadRequest(400, "bad content-length") from None
        if length < 0:
            raise _BadRequest(400, "bad content-length")
        if length > MAX_BODY:
            raise _BadRequest(413, "body too large")
        body = reader.exactly(length)
    return method, target, headers, body


def _respond(conn: socket.socket, status: int, body: bytes, served_by: str, via: str,
             head_only: bool = False) -> None:
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"
        f"Content-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"X-Served-By: {served_by}\r\n"
        f"X-Served-Via: {via}\r\n"
        f"Connection: close\r\n\r\n"
    ).encode("latin-1")
    conn.sendall(head if head_only else head + body)


def _sleep_ms(query: str, default: int) -> int | None:
    """The `ms` of a slow action (its query's `ms`, else `default`), clamped; None when bad."""
    try:
        ms = int(parse_qs(query).get("ms", [str(default)])[0])
    except ValueError:
        return None
    return max(0, min(ms, MAX_SLOW_MS))


def _handle(conn: socket.socket, served_by: str, via: str,
            report_ms: int = REPORT_MS) -> None:
    reader = _Reader(conn)
    try:
        method, target, _headers, body = _read_request(reader)
    except _Closed:
        return
    except _BadRequest as exc:
        _respond(conn, exc.status, f"{exc}\n".encode(), served_by, via)
        return
    url = urlsplit(target)
    head_only = method == "HEAD"
    path = url.path
    if path in ("/fast", "/") or (path.startswith("/items/") and len(path) > len("/items/")):
        _respond(conn, 200, b"fast\n", served_by, via, head_only)
    elif path == "/slow" or (path.startswith("/reports/") and len(path) > len("/reports/")):
        ms = _sleep_ms(url.query, 100 if path == "/slow" else report_ms)
        if ms is None:
            _respond(conn, 400, b"ms must be an integer\n", served_by, via)
            return
        time.sleep(ms / 1000.0)
        _respond(conn, 200, f"slow {ms} ms\n".encode(), served_by, via, head_only)
    elif url.path == "/echo":
        _respond(conn, 200, body, served_by, via, head_only)
    else:
        _respond(conn, 404, b"not found\n", served_by, via, head_only)


def _worker(name: str, listeners: Sequence[tuple[socket.socket, str]], master_pid: int,
            report_ms: int = REPORT_MS) -> None:
    quitting = False

    def on_quit(_sig: int, _frame: object) -> None:
        nonlocal quitting
        quitting = True

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, on_quit)
    served_by = f"{name}/{os.getpid()}"
    by_fd = {sock.fileno(): (sock, via) for sock, via in listeners}
    while not quitting and os.getppid() == master_pid:
        try:
            ready, _, _ = select.select(list(by_fd), [], [], 0.5)
        except InterruptedError:
            continue
        for fd in ready:
            sock, via = by_fd[fd]
            try:
                conn, _addr = sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue  # another worker took it
            try:
                conn.settimeout(IO_TIMEOUT)
                _handle(conn, served_by, via, report_ms)
            except OSError:
                pass
            finally:
                with contextlib.suppress(OSError):
                    conn.close()
            break  # back to select: one request at a time, fresh readiness


# ---------------------------------------------------------------------------- master


def _parse_tcp(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def bind(unix_path: str | None, tcp: tuple[str, int] | None) -> list[tuple[socket.socket, str]]:
    """Bind and listen (UNIX first, then TCP); both non-blocking for the workers' accept."""
    out: list[tuple[socket.socket, str]] = []
    if unix_path:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(unix_path)
        u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        u.bind(unix_path)
        u.listen(UNIX_BACKLOG)
        u.setblocking(False)
        out.append((u, "unix"))
    if tcp:
        family = socket.AF_INET6 if ":" in tcp[0] else socket.AF_INET
        t = socket.socket(family, socket.SOCK_STREAM)
        t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        t.bind(tcp)
        t.listen(TCP_BACKLOG)
        t.setblocking(False)
        out.append((t, "tcp"))
    return out


def _spawn(name: str, listeners: Sequence[tuple[socket.socket, str]], master_pid: int,
           report_ms: int = REPORT_MS) -> int:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            _worker(name, listeners, master_pid, report_ms)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    return pid


def serve(name: str, unix_path: str | None, tcp: tuple[str, int] | None, workers: int,
          report_ms: int = REPORT_MS) -> int:
    listeners = bind(unix_path, tcp)
    master_pid = os.getpid()

    def stop(_sig: int, _frame: object) -> None:
        raise _Stop

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        signal.signal(sig, stop)
    pids: set[int] = set()
    try:
        for _ in range(workers):
            pids.add(_spawn(name, listeners, master_pid, report_ms))
        while True:
            try:
                pid, _status = os.waitpid(-1, 0)
            except ChildProcessError:
                pid = 0
                time.sleep(0.1)
            if pid in pids:
                pids.discard(pid)
                time.sleep(0.05)  # a worker crashing at once must not fork-bomb
                pids.add(_spawn(name, listeners, master_pid, report_ms))
    except _Stop:
        pass
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_IGN)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in pids:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        for sock, _via in listeners:
            sock.close()
        if unix_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(unix_path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m failproxy.demo.demoapp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="app", help="host name reported in X-Served-By")
    parser.add_argument("--unix", metavar="PATH", help="UNIX socket path (backlog 5)")
    parser.add_argument("--tcp", metavar="HOST:PORT", type=_parse_tcp,
                        help="TCP address (backlog 1024)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--slow-ms", type=int, default=REPORT_MS,
                        help=f"what /reports/<id> sleeps, in ms (default {REPORT_MS})")
    args = parser.parse_args(argv)
    if not args.unix and not args.tcp:
        parser.error("give --unix, --tcp or both")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if not 0 <= args.slow_ms <= MAX_SLOW_MS:
        parser.error(f"--slow-ms must be between 0 and {MAX_SLOW_MS}")
    return serve(args.name, args.unix, args.tcp, args.workers, args.slow_ms)


if __name__ == "__main__":
    sys.exit(main())
