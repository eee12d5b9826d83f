"""A strict upstream for the fuzz tests: every request that reaches it is read by h11 (and the
RFC 9110 field grammar h11 does not enforce on values), and recorded as h11 saw it.

`StrictBackend` listens on a loopback TCP port; one thread per connection. Each request is
answered `200` with `X-Seen: <index in .requests>` and the body `seen <index>`, so a client can
tell which recorded request a response answers. A request that h11 (or the extra checks) cannot
read is recorded with `error` set and the connection closed: anything failproxy forwards must
parse. A connection that ends in the middle of a request (failproxy aborted it) records the
request with `complete = False`.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from dataclasses import dataclass, field

import h11

# RFC 9110 5.1 / 5.5: token names; values of VCHAR / obs-text with SP / HTAB inside only.
TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
FIELD_VALUE = re.compile(rb"^(?:[\x21-\x7e\x80-\xff](?:[\x20\x09\x21-\x7e\x80-\xff]*"
                         rb"[\x21-\x7e\x80-\xff])?)?$")


@dataclass
class SeenRequest:
    index: int
    conn_id: int
    method: bytes = b""
    target: bytes = b""
    version: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)  # raw names, as sent
    body: bytes = b""
    complete: bool = False
    error: str = ""
    raw: bytes = b""  # the bytes read on its connection since the previous request ended
    at: float = 0.0

    def header_all(self, name: bytes) -> list[bytes]:
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]


class StrictBackend:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(256)
        self.port = self.sock.getsockname()[1]
        self.address = f"{host}:{self.port}"
        self.requests: list[SeenRequest] = []
        self.errors: list[SeenRequest] = []
        self.connections = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept_loop, daemon=True, name="strict-accept").start()

    # ---- queries -----------------------------------------------------------------------------
    def mark(self) -> int:
        with self._lock:
            return len(self.requests)

    def since(self, mark: int) -> list[SeenRequest]:
        with self._lock:
            return list(self.requests[mark:])

    # ---- server ------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                cid = self.connections
                self._socks.append(conn)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(conn, cid), daemon=True,
                             name=f"strict-{cid}").start()

    def _new(self, cid: int) -> SeenRequest:
        with self._lock:
            r = SeenRequest(len(self.requests), cid)
            self.requests.append(r)
            return r

    def _serve(self, sock: socket.socket, cid: int) -> None:
        h = h11.Connection(h11.SERVER, max_incomplete_event_size=1 << 20)
        raw = b""
        cur: SeenRequest | None = None
        body: list[bytes] = []
        try:
            while not self._stop.is_set():
                try:
                    event = h.next_event()
                except h11.RemoteProtocolError as e:
                    if cur is None:
                        cur = self._new(cid)
                    cur.error = f"h11: {e}"
                    cur.raw = raw
                    self.errors.append(cur)
                    return
                if event is h11.NEED_DATA:
                    try:
                        data = sock.recv(65536)
                    except OSError:
                        data = b""
                    raw += data
                    h.receive_data(data)
                    if not data and cur is not None and not cur.complete:
                        cur.raw = raw
                        cur.at = time.monotonic()
                        return
                    continue
                if isinstance(event, h11.Request):
                    cur = self._new(cid)
                    cur.method, cur.target = event.method, event.target
                    cur.version = event.http_version
                    cur.headers = list(event.headers.raw_items())
                    body = []
                    bad = [(k, v) for k, v in cur.headers
                           if not TOKEN.match(k) or not FIELD_VALUE.match(v)]
                    if bad:
                        cur.error = f"invalid field(s) {bad!r}"
                        cur.raw = raw
                        self.errors.append(cur)
                        return
                elif isinstance(event, h11.Data):
                    body.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    assert cur is not None
                    cur.body = b"".join(body)
                    cur.raw = raw
                    cur.complete = True
                    cur.at = time.monotonic()
                    payload = b"seen %d" % cur.index
                    h_resp = [("X-Seen", str(cur.index)), ("Content-Length", str(len(payload)))]
                    out = h.send(h11.Response(status_code=200, headers=h_resp)) or b""
                    if cur.method != b"HEAD":
                        out += h.send(h11.Data(data=payload)) or b""
                    out += h.send(h11.EndOfMessage()) or b""
                    sock.sendall(out)
                    cur = None
                    raw = b""  # keep only the bytes of the request being read
                    if h.our_state is h11.MUST_CLOSE or h.their_state is h11.MUST_CLOSE:
                        return
                    h.start_next_cycle()
                elif isinstance(event, h11.ConnectionClosed):
                    return
        except (OSError, h11.LocalProtocolError):
            if cur is not None and not cur.complete:
                cur.raw = raw
                cur.at = time.monotonic()
        finally:
            with contextlib.suppress(OSError):
                sock.close()

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self.sock.close()
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()
