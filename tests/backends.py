"""Real upstream servers for the behaviour tests: threads in the test process, real sockets.

- `HTTPBackend`: an HTTP/1.1 server on a UNIX path or a loopback TCP port. It records every
  request it read (method, target, version, headers, body, which connection) and answers what its
  `handler` returns: a `Reply` (status, headers, body, chunked, close-delimited, slow, raw bytes…)
  or an action (`RESET`, `CLOSE`, `HANG`). Accepting can be paused and the accept queue filled
  until a raw non-blocking connect gets EAGAIN (a full UNIX backlog), then drained again.
- `stale_unix_socket(path)`: a socket file nobody listens on (ECONNREFUSED).
- `TcpBlackhole`: a TCP listener whose accept queue is full, so a connect hangs (SYNs dropped).
- `closed_tcp_port()`: a loopback port with no listener (ECONNREFUSED).
- `WSEchoBackend`: a WebSocket echo server (the `websockets` package).
- `probe_connect(address)`: a raw non-blocking connect as the proxy must do it: "ok" or an errno.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from support import HeaderLookup

RESET = "reset"  # read the request, then close with RST (SO_LINGER 0), no answer
CLOSE = "close"  # read the request, then close (FIN), no answer
HANG = "hang"  # read the request, never answer (the connection stays open until stop())


def probe_connect(address: str, timeout: float = 0.0) -> str:
    """Connect once like failproxy must (raw, non-blocking): "ok" or the errno name.

    For TCP, `timeout` > 0 waits that long for the handshake ("timeout" if it does not complete).
    """
    if address.startswith("unix:"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: object = address[5:]
    else:
        host, _, port = address.rpartition(":")
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        target = (host, int(port))
    s.setblocking(False)
    try:
        try:
            s.connect(target)
            return "ok"
        except BlockingIOError as e:
            if s.family == socket.AF_UNIX:
                return errno.errorcode[e.errno]
            _, w, _ = select.select([], [s], [], timeout)
            if not w:
                return "timeout"
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            return "ok" if err == 0 else errno.errorcode[err]
        except OSError as e:
            return errno.errorcode.get(e.errno, str(e.errno))
    finally:
        s.close()


def stale_unix_socket(path: str) -> str:
    """A UNIX socket file with nobody listening (as after a crash): connect -> ECONNREFUSED."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()
    assert os.path.exists(path)
    return "unix:" + path


def closed_tcp_port(host: str = "127.0.0.1") -> str:
    """A loopback address where nothing listens: connect -> ECONNREFUSED at once."""
    s = socket.socket()
    s.bind((host, 0))
    port = s.getsockname()[1]
    s.close()
    return f"{host}:{port}"


class TcpBlackhole:
    """A TCP listener with `listen(0)` that never accepts, filled until connects hang.

    On loopback a full accept queue drops SYNs, so the next connect() neither succeeds nor
    fails: exactly a dead peer whose kernel still exists (the seed's "fail slowly")."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.sock = socket.socket()
        self.sock.bind((host, 0))
        self.sock.listen(0)
        self.host = host
        self.port = self.sock.getsockname()[1]
        self.address = f"{host}:{self.port}"
        self._fillers: list[socket.socket] = []
        for _ in range(64):
            c = socket.socket()
            c.settimeout(0.25)
            try:
                c.connect((host, self.port))
            except (TimeoutError, OSError):
                c.close()
                break
            self._fillers.append(c)
        else:  # pragma: no cover - the kernel never filled the queue
            raise RuntimeError("TCP accept queue never filled")
        assert probe_connect(self.address, timeout=0.2) == "timeout"

    def close(self) -> None:
        for c in self._fillers:
            c.close()
        self._fillers.clear()
        self.sock.close()


@dataclass
class Reply:
    """What an `HTTPBackend` answers. Bytes go out exactly as described."""

    status: int = 200
    reason: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | Iterable[bytes] = b""
    chunked: bool = False  # Transfer-Encoding: chunked, one chunk per body part
    close_delimited: bool = False  # no Content-Length, no chunked: the body ends when we close
    content_length: int | None = None  # override the Content-Length header (e.g. truncation)
    no_length: bool = False  # send no framing header at all (204/304/1xx)
    delay: float = 0.0  # before the status line
    part_delay: float = 0.0  # between body parts
    close: bool = False  # close the connection after the response (adds Connection: close)
    then: str = ""  # after sending: RESET or CLOSE (cut the connection without a Connection header)
    interim: list[bytes] = field(default_factory=list)  # raw 1xx responses sent before
    raw: bytes | None = None  # send exactly these bytes as the whole response
    keepalive_header: bool = False  # add "Connection: keep-alive" explicitly


@dataclass
class Request(HeaderLookup):
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes
    body_len: int
    body_sha256: str
    chunked: bool  # the body arrived chunked
    conn_id: int  # which upstream connection (1-based, in accept order)
    conn_seq: int  # 0 for the first request on its connection
    raw_head: bytes
    complete: bool = True  # False when the body was cut short
    received_at: float = 0.0

    @property
    def path(self) -> str:
        return self.target



class _Cut(Exception):
    """The peer closed the connection."""


class _Conn:
    def __init__(self, sock: socket.socket, conn_id: int) -> None:
        self.sock = sock
        self.id = conn_id
        self.buf = b""

    def fill(self, timeout: float | None) -> None:
        self.sock.settimeout(timeout)
        data = self.sock.recv(262144)
        if not data:
            raise _Cut
        self.buf += data

    def read_until(self, marker: bytes, timeout: float | None, limit: int = 1 << 20) -> bytes:
        while True:
            i = self.buf.find(marker)
            if i >= 0:
                out, self.buf = self.buf[: i + len(marker)], self.buf[i + len(marker) :]
                return out
            if len(self.buf) > limit:
                raise ValueError("line too long")
            self.fill(timeout)

    def read_exact(self, n: int, timeout: float | None, sink: Callable[[bytes], None],
                   rate: float = 0.0) -> None:
        while n > 0:
            if not self.buf:
                self.fill(timeout)
            part, self.buf = self.buf[:n], self.buf[n:]
            n -= len(part)
            sink(part)
            if rate:
                time.sleep(len(part) / rate)


class HTTPBackend:
    """A recording HTTP/1.1 server on `unix:/path` or `127.0.0.1:0` (a free port).

    `handler(request) -> Reply | RESET | CLOSE | HANG`; the default answers 200 with the body
    "<name> <METHOD> <target>" and an `X-Backend: <name>` header. Use `.address` in configs.
    """

    def __init__(
        self,
        name: str,
        address: str = "127.0.0.1:0",
        *,
        handler: Callable[[Request], Reply | str] | None = None,
        backlog: int = 128,
        idle_timeout: float | None = 30.0,
        read_rate: float = 0.0,
        record_body_limit: int = 1 << 20,
        send_100: bool = True,
        sock: socket.socket | None = None,
    ) -> None:
        """`sock`: an unbound TCP socket to listen with (e.g. one made in another network
        namespace); `address` is then the HOST:PORT it binds."""
        self.name = name
        self.handler = handler or self.default_reply
        self.idle_timeout = idle_timeout  # close an idle keep-alive connection after it
        self.read_rate = read_rate  # bytes/s when reading request bodies (0 = as fast as possible)
        self.record_body_limit = record_body_limit
        self.send_100 = send_100
        self.requests: list[Request] = []
        self.errors: list[str] = []
        self.connections = 0  # accepted so far
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._accepting = threading.Event()
        self._accepting.set()
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._fillers: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        if address.startswith("unix:"):
            self.path = address[5:]
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.bind(self.path)
            self.address = address
        else:
            self.path = ""
            host, _, port = address.rpartition(":")
            self.sock = sock if sock is not None else socket.socket(socket.AF_INET,
                                                                    socket.SOCK_STREAM)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind((host, int(port)))
            self.address = f"{host}:{self.sock.getsockname()[1]}"
            self.port = self.sock.getsockname()[1]
        self.sock.listen(backlog)
        self.sock.setblocking(False)
        t = threading.Thread(target=self._accept_loop, name=f"backend-{name}", daemon=True)
        t.start()
        self._threads.append(t)

    # ---- default behaviour -------------------------------------------------------------------
    def default_reply(self, req: Request) -> Reply:
        return Reply(200, headers=[("X-Backend", self.name), ("Content-Type", "text/plain")],
                     body=f"{self.name} {req.method} {req.target}".encode())

    # ---- queries -----------------------------------------------------------------------------
    def seen(self, method: str | None = None, path: str | None = None) -> list[Request]:
        with self._lock:
            return [r for r in self.requests
                    if (method is None or r.method == method)
                    and (path is None or r.target == path)]

    def wait_requests(self, n: int, timeout: float = 5.0) -> list[Request]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.requests) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"backend {self.name}: {len(self.requests)} requests, waited for {n}")
                self._cond.wait(left)
            return list(self.requests)

    # ---- accept gate and backlog filling -----------------------------------------------------
    def pause(self) -> None:
        """Stop accepting: new connections wait in the kernel's accept queue."""
        self._accepting.clear()
        time.sleep(0.06)  # let the accept loop see it

    def resume(self) -> None:
        self._accepting.set()

    def fill_backlog(self) -> int:
        """Pause accepting and connect until a raw non-blocking connect gets EAGAIN (UNIX only).

        That IS a full backlog: the kernel refuses the next connect at once."""
        assert self.path, "fill_backlog is for UNIX listeners"
        self.pause()
        n = 0
        for _ in range(10000):
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.setblocking(False)
            try:
                c.connect(self.path)
            except BlockingIOError as e:
                assert e.errno == errno.EAGAIN, e
                c.close()
                break
            self._fillers.append(c)
            n += 1
        assert probe_connect(self.address) == "EAGAIN"
        return n

    def drain(self, timeout: float = 3.0) -> None:
        """Close the fillers, accept again, and wait until a connect finds room."""
        for c in self._fillers:
            c.close()
        self._fillers.clear()
        self.resume()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.path or probe_connect(self.address) == "ok":
                # the probe itself is queued and will be accepted (EOF): give the loop a moment
                time.sleep(0.05)
                return
            time.sleep(0.01)
        raise AssertionError(f"backend {self.name}: backlog still full after drain")

    # ---- server loop -------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            if not self._accepting.is_set():
                self._accepting.wait(0.05)
                continue
            try:
                r, _, _ = select.select([self.sock], [], [], 0.05)
            except (OSError, ValueError):
                return
            if not r or not self._accepting.is_set():
                continue
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                return
            conn.setblocking(True)
            if conn.family != socket.AF_UNIX:
                # as unicorn (tcp_nodelay, its default), gunicorn and nginx: a head and a body
                # written apart would otherwise wait for the reader's delayed ACK (~40 ms)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self.connections += 1
                cid = self.connections
                self._conns.append(conn)
            t = threading.Thread(target=self._serve_conn, args=(conn, cid), daemon=True,
                                 name=f"backend-{self.name}-{cid}")
            t.start()
            self._threads.append(t)

    def _serve_conn(self, sock: socket.socket, cid: int) -> None:
        conn = _Conn(sock, cid)
        seq = 0
        try:
            while not self._stop.is_set():
                try:
                    req = self._read_request(conn, seq)
                except (_Cut, TimeoutError, ConnectionError):
                    return
                if req is None:
                    return
                with self._cond:
                    self.requests.append(req)
                    self._cond.notify_all()
                if not req.complete:
                    return
                action = self.handler(req)
                keep = self._answer(conn, req, action)
                if not keep:
                    return
                seq += 1
        except Exception as e:
            if not self._stop.is_set():
                self.errors.append(f"{type(e).__name__}: {e}")
        finally:
            with contextlib.suppress(OSError):
                sock.close()

    def _read_request(self, conn: _Conn, seq: int) -> Request | None:
        timeout = self.idle_timeout if seq else 30.0
        while conn.buf.startswith(b"\r\n"):
            conn.buf = conn.buf[2:]
        head = conn.read_until(b"\r\n\r\n", timeout)
        received = time.monotonic()
        lines = head[:-4].split(b"\r\n")
        method, target, version = lines[0].decode("latin-1").split(" ", 2)
        headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            name, _, value = line.decode("latin-1").partition(":")
            headers.append((name, value.strip(" \t")))
        lower = {k.lower(): v for k, v in headers}
        body_parts: list[bytes] = []
        h = hashlib.sha256()
        size = 0
        recorded = 0

        def sink(part: bytes) -> None:
            nonlocal size, recorded
            size += len(part)
            h.update(part)
            if recorded < self.record_body_limit:
                body_parts.append(part[: self.record_body_limit - recorded])
                recorded += len(body_parts[-1])

        if self.send_100 and lower.get("expect", "").lower() == "100-continue":
            conn.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        chunked = "chunked" in lower.get("transfer-encoding", "").lower()
        complete = True
        try:
            if chunked:
                while True:
                    line = conn.read_until(b"\r\n", 30.0)
                    n = int(line.split(b";")[0].strip(), 16)
                    if n == 0:
                        while conn.read_until(b"\r\n", 30.0) != b"\r\n":
                            pass  # trailers
                        break
                    conn.read_exact(n, 30.0, sink, self.read_rate)
                    if conn.read_until(b"\r\n", 30.0) != b"\r\n":
                        raise ValueError("bad chunk end")
            elif "content-length" in lower:
                conn.read_exact(int(lower["content-length"]), 30.0, sink, self.read_rate)
        except (_Cut, TimeoutError, ConnectionError):
            complete = False
        return Request(method, target, version, headers, b"".join(body_parts), size,
                       h.hexdigest(), chunked, conn.id, seq, head, complete, received)

    def _answer(self, conn: _Conn, req: Request, action: Reply | str) -> bool:
        sock = conn.sock
        if action == RESET:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return False
        if action == CLOSE:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            return False
        if action == HANG:
            self._stop.wait()
            return False
        assert isinstance(action, Reply), action
        reply = action
        if reply.delay:
            time.sleep(reply.delay)
        for interim in reply.interim:
            sock.sendall(interim)
        if reply.raw is not None:
            sock.sendall(reply.raw)
            return self._after(sock, reply, keep=not reply.close and not reply.then)
        parts = [reply.body] if isinstance(reply.body, bytes | bytearray) else reply.body
        if isinstance(reply.body, bytes | bytearray):
            body_len: int | None = len(reply.body)
        else:
            body_len = None
        reason = reply.reason or _REASONS.get(reply.status, "Something")
        head = [f"HTTP/1.1 {reply.status} {reason}"]
        head += [f"{k}: {v}" for k, v in reply.headers]
        no_body = (req.method == "HEAD" or reply.status in (204, 304) or reply.status < 200)
        if reply.no_length:
            pass
        elif reply.chunked:
            head.append("Transfer-Encoding: chunked")
        elif reply.close_delimited:
            pass
        elif reply.content_length is not None:
            head.append(f"Content-Length: {reply.content_length}")
        elif body_len is not None:
            head.append(f"Content-Length: {body_len}")
        req_close = (req.header("connection", "") or "").lower()
        client_wants_close = "close" in req_close or (
            req.version == "HTTP/1.0" and "keep-alive" not in req_close)
        keep = not (reply.close or reply.close_delimited or reply.then or client_wants_close)
        if reply.close or (client_wants_close and not reply.then):
            head.append("Connection: close")
        elif reply.keepalive_header:
            head.append("Connection: keep-alive")
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        if not no_body:
            for i, part in enumerate(parts):
                if i and reply.part_delay:
                    time.sleep(reply.part_delay)
                if not part:
                    continue
                if reply.chunked:
                    sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))
                else:
                    sock.sendall(part)
            if reply.chunked and not reply.then:
                sock.sendall(b"0\r\n\r\n")
        return self._after(sock, reply, keep)

    def _after(self, sock: socket.socket, reply: Reply, keep: bool) -> bool:
        if reply.then == RESET:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return False
        if not keep:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
            # let the peer read everything before the close
            with contextlib.suppress(OSError):
                sock.settimeout(2.0)
                while sock.recv(65536):
                    pass
            return False
        return True

    def close_idle(self) -> None:
        """Close every connection now (the pooled ones included)."""
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        self._stop.set()
        self._accepting.set()
        for c in self._fillers:
            c.close()
        with contextlib.suppress(OSError):
            self.sock.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                c.close()
        if self.path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


_REASONS = {100: "Continue", 101: "Switching Protocols", 103: "Early Hints", 200: "OK",
            204: "No Content", 304: "Not Modified", 400: "Bad Request", 404: "Not Found",
            500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
            504: "Gateway Timeout"}


class WSEchoBackend:
    """A WebSocket echo server (websockets' threaded server) on a loopback TCP port."""

    def __init__(self) -> None:
        from websockets.sync.server import serve

        self.handshakes: list[tuple[str, list[tuple[str, str]]]] = []
        self.messages: list[str | bytes] = []

        def echo(ws) -> None:  # type: ignore[no-untyped-def]
            req = ws.request
            self.handshakes.append((req.path, list(req.headers.raw_items())))
            for message in ws:
                self.messages.append(message)
                ws.send(message)

        self.server = serve(echo, "127.0.0.1", 0)
        self.port = self.server.socket.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self._thread.join(5)
