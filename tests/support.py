"""Drive failproxy black-box: a real `python -m failproxy serve CONFIG` subprocess, its JSON log,
and raw HTTP over real sockets.

- `free_port()`, `render_config(sections)`.
- `Proxy`: start (generated TOML, `[log] file`, json), wait until its port accepts, read its log
  (`wait_for_event("failover", reason="overloaded")`), memory of its processes, stop by signal.
- `RawConn`: a client socket that sends exact bytes and reads whole responses with
  Content-Length / chunked / close framing (`read_response`), 1xx kept apart, or sees the close.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


_GIVEN: set[int] = set()


def metric(admin_port: int, name: str) -> int:
    """The value of the unlabelled sample `name`, from the admin endpoint's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return int(float(line.split()[-1]))
    raise AssertionError(f"no {name} in /metrics")


def settled_metric(admin_port: int, name: str, expected: int, timeout: float = 5.0) -> int:
    """The counter `name` once it reached `expected`, or its value when `timeout` passed (the
    caller asserts on it). A worker publishes its counters at the end of its loop turn, which
    may come after the client read the answer that counted."""
    deadline = time.monotonic() + timeout
    while True:
        value = metric(admin_port, name)
        if value >= expected or time.monotonic() > deadline:
            return value
        time.sleep(0.02)


def active_connections(admin_port: int) -> int:
    return metric(admin_port, "failproxy_connections_active")


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, and never one this test process handed out before: the
    kernel may give the same port to two binds to 0 in a row once the first is closed (a proxy
    then got the same port for `admin.listen` and `server.listen`, and refused to start)."""
    while True:
        s = socket.socket()
        s.bind((host, 0))
        port = int(s.getsockname()[1])
        s.close()
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


# ---- config -----------------------------------------------------------------------------------
def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {_toml_value(x)}"
                                for k, x in v.items()) + " }"
    raise TypeError(f"no TOML for {v!r}")


def render_config(sections: dict[str, dict[str, Any]], servers: list[dict[str, Any]],
                  peers: Iterable[dict[str, Any]] = ()) -> str:
    out: list[str] = []
    for name, values in sections.items():
        if not values:
            continue
        out.append(f"[{name}]")
        out += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        out.append("")
    for server in servers:
        out.append("[[upstream.server]]")
        out += [f"{k} = {_toml_value(v)}" for k, v in server.items()]
        out.append("")
    for entry in peers:
        out.append("[[upstream.peers]]")
        out += [f"{k} = {_toml_value(v)}" for k, v in entry.items()]
        out.append("")
    return "\n".join(out)


def _server_entry(s: Any) -> dict[str, Any]:
    if isinstance(s, dict):
        return dict(s)
    if isinstance(s, str):
        return {"address": s}
    return {"address": s.address}  # a backend object


# ---- the log ----------------------------------------------------------------------------------
class LogReader:
    """Reads the proxy's JSON log file incrementally; lines may arrive batched per loop turn."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._pos = 0
        self._partial = b""
        self.events: list[dict[str, Any]] = []
        self.garbage: list[bytes] = []

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._pos)
                data = f.read()
        except FileNotFoundError:
            return
        self._pos += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            if not line.strip():
                continue
            try:
                ev = json.loads(line)
            except ValueError:
                self.garbage.append(line)
                continue
            if isinstance(ev, dict):
                self.events.append(ev)
            else:
                self.garbage.append(line)

    def mark(self) -> int:
        """An index: pass it as `since=` to look only at events logged after this point."""
        self.poll()
        return len(self.events)

    @staticmethod
    def _matches(ev: dict[str, Any], event: str | None, match: dict[str, Any]) -> bool:
        if event is not None and ev.get("event") != event:
            return False
        for k, want in match.items():
            k = k.rstrip("_")  # from_ -> from
            if callable(want):
                if k not in ev or not want(ev[k]):
                    return False
            elif ev.get(k, _MISSING) != want:
                return False
        return True

    def find(self, event: str | None = None, since: int = 0, **match: Any) -> list[dict[str, Any]]:
        self.poll()
        return [ev for ev in self.events[since:] if self._matches(ev, event, match)]

    def wait_for_event(self, event: str, timeout: float = 5.0, since: int = 0,
                       **match: Any) -> dict[str, Any]:
        """The first `event` (after `since`) whose fields equal `match` (callables test a field)."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.find(event, since, **match)
            if found:
                return found[0]
            if time.monotonic() > deadline:
                near = [ev for ev in self.events[since:] if ev.get("event") == event][-5:]
                raise AssertionError(
                    f"no {event!r} event matching {match} within {timeout}s; "
                    f"{event!r} events seen: {near}; last events: {self.events[-8:]}")
            time.sleep(0.02)

    def wait_for_events(self, event: str, n: int, timeout: float = 5.0, since: int = 0,
                        **match: Any) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            found = self.find(event, since, **match)
            if len(found) >= n:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(found)} {event!r} events matching {match}, wanted {n}: "
                                     f"{found}; last events: {self.events[-8:]}")
            time.sleep(0.02)

    def assert_no_event(self, event: str, wait: float = 0.3, since: int = 0, **match: Any) -> None:
        time.sleep(wait)
        found = self.find(event, since, **match)
        assert not found, f"unexpected {event!r} events: {found}"


_MISSING = object()


# ---- the process ------------------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return out
    for tid in tasks:
        try:
            text = Path(f"/proc/{pid}/task/{tid}/children").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        for c in text.split():
            out.append(int(c))
            out += _children(int(c))
    return out


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, … of a process, in kB."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k.startswith("Vm"):
            out[k] = int(v.split()[0])
    return out


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, `echo 5 > clear_refs`)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class Proxy:
    """One `python -m failproxy serve CONFIG` subprocess."""

    def __init__(self, workdir: Path, servers: Iterable[Any], *,
                 server: dict[str, Any] | None = None, upstream: dict[str, Any] | None = None,
                 headers: dict[str, Any] | None = None,
                 log: dict[str, Any] | None = None, admin: dict[str, Any] | None = None,
                 static: dict[str, Any] | None = None,
                 compress: dict[str, Any] | None = None,
                 routes: dict[str, Any] | None = None, port: int | None = None,
                 peers: Iterable[dict[str, Any]] = (),
                 command_prefix: Iterable[str] = (),
                 socket_factory: Callable[[], socket.socket] | None = None) -> None:
        self.workdir = workdir
        # Run it as `PREFIX... python -m failproxy serve` (e.g. `ip netns exec NS`), and reach it
        # with sockets from `socket_factory` (e.g. made inside that namespace).
        self.command_prefix = list(command_prefix)
        self.socket_factory = socket_factory
        workdir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.log_path = workdir / "proxy.log"
        self.config_path = workdir / "proxy.toml"
        srv = {"listen": [f"{self.host}:{self.port}"], "workers": 1}
        srv.update(server or {})
        lg = {"level": "debug", "format": "json", "file": str(self.log_path)}
        lg.update(log or {})
        self.log_level = str(lg["level"])
        self.servers = [_server_entry(s) for s in servers]
        self.config_text = render_config(
            {"server": srv, "upstream": upstream or {}, "headers": headers or {}, "log": lg,
             "admin": admin or {}, "static": static or {}, "compress": compress or {},
             "routes": routes or {}},
            self.servers, peers)
        self.config_path.write_text(self.config_text)
        self.log = LogReader(self.log_path)
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> Proxy:
        env = dict(os.environ)
        extra = env.get("PYTHONPATH")
        env["PYTHONPATH"] = str(REPO) + (os.pathsep + extra if extra else "")
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._out = open(self.workdir / "stdout.txt", "wb")  # noqa: SIM115
        self._err = open(self.workdir / "stderr.txt", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [*self.command_prefix, sys.executable, "-m", "failproxy", "serve",
             str(self.config_path)],
            cwd=str(self.workdir), env=env, stdout=self._out, stderr=self._err,
            stdin=subprocess.DEVNULL, start_new_session=True)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"failproxy exited with {self.proc.returncode} before serving:\n"
                    f"{self.stderr()[-3000:]}\nconfig:\n{self.config_text}")
            with contextlib.suppress(OSError), self._socket(timeout=0.5):
                # the port accepts; a pre-fork master may still be forking: wait for a worker
                self._wait_worker(deadline)
                return
            time.sleep(0.03)
        raise AssertionError(f"failproxy did not accept on {self.address} within {timeout}s:\n"
                             f"{self.stderr()[-3000:]}")

    def _socket(self, timeout: float) -> socket.socket:
        """A connected client socket."""
        if self.socket_factory is None:
            return socket.create_connection(self.address, timeout=timeout)
        sock = self.socket_factory()
        try:
            sock.settimeout(timeout)
            sock.connect(self.address)
        except OSError:
            sock.close()
            raise
        return sock

    def _wait_worker(self, deadline: float) -> None:
        # A single-process proxy serves by itself; a master serves once a worker logged in.
        if self.log_level not in ("debug", "info"):
            # worker_started and started are info events, never logged here: the port accepts,
            # and a request waits in the shared backlog for the worker (waiting for the events
            # took the whole start timeout, 15 s, whenever the master had forked by then)
            return
        while time.monotonic() < deadline:
            if (self.log.find("worker_started") or self.log.find("started")
                    or not _children(self.pid)):
                return
            time.sleep(0.03)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def pids(self) -> list[int]:
        """The proxy's process and all its descendants."""
        return [self.pid, *_children(self.pid)]

    def serving_pids(self) -> list[int]:
        """The processes that serve requests: the workers, or the process itself when alone."""
        kids = _children(self.pid)
        return kids or [self.pid]

    def stderr(self) -> str:
        with contextlib.suppress(FileNotFoundError):
            return (self.workdir / "stderr.txt").read_text(errors="replace")
        return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float) -> int | None:
        assert self.proc is not None
        try:
            self.returncode = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        return self.returncode

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 5.0) -> int | None:
        """Signal it and wait; returns the exit code, or None when it had to be killed."""
        if self.proc is None:
            return None
        rc: int | None = self.proc.poll()
        if rc is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            rc = self.wait_exit(timeout)
            if rc is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        else:
            self.returncode = rc
        # workers left behind by a master that died
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for f in (getattr(self, "_out", None), getattr(self, "_err", None)):
            if f:
                f.close()
        return rc

    def connect(self, timeout: float = 5.0, rcvbuf: int | None = None) -> RawConn:
        sock = self.socket_factory() if self.socket_factory is not None else None
        return RawConn(self.port, self.host, timeout=timeout, rcvbuf=rcvbuf, sock=sock)

    def request(self, method: str, target: str, *, headers: Iterable[tuple[str, str]] = (),
                body: bytes = b"", timeout: float = 10.0) -> Response:
        """One request on a fresh connection."""
        with self.connect(timeout) as c:
            c.send(build_request(method, target, headers=headers, body=body))
            return c.read_response(method)


# ---- raw HTTP client --------------------------------------------------------------------------
def build_request(method: str, target: str, *, headers: Iterable[tuple[str, str]] = (),
                  body: bytes | None = b"", version: str = "HTTP/1.1",
                  host: str | None = "test.local") -> bytes:
    hs = list(headers)
    names = {k.lower() for k, _ in hs}
    if host is not None and "host" not in names:
        hs.insert(0, ("Host", host))
    if body and "content-length" not in names and "transfer-encoding" not in names:
        hs.append(("Content-Length", str(len(body))))
    elif method in ("POST", "PUT", "PATCH") and not body and "content-length" not in names \
            and "transfer-encoding" not in names:
        hs.append(("Content-Length", "0"))
    head = f"{method} {target} {version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hs) + "\r\n"
    return head.encode("latin-1") + (body or b"")


def chunked_body(parts: Iterable[bytes], trailers: str = "") -> bytes:
    out = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts if p)
    return out + b"0\r\n" + trailers.encode() + b"\r\n"


class IncompleteResponse(AssertionError):
    """The connection ended (or timed out) before the response was complete."""

    def __init__(self, msg: str, partial: bytes) -> None:
        super().__init__(f"{msg} after {len(partial)} bytes: {partial[:300]!r}")
        self.partial = partial


class HeaderLookup:
    """Case-insensitive header access for anything with `headers: list[tuple[str, str]]`."""

    headers: list[tuple[str, str]]

    def header(self, name: str, default: str | None = None) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return default

    def header_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]

    def has_header(self, name: str) -> bool:
        return self.header(name) is not None


@dataclass
class Response(HeaderLookup):
    status: int
    reason: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    raw_head: bytes = b""
    chunked: bool = False
    close_delimited: bool = False
    interim: list[Response] = field(default_factory=list)
    trailers: bytes = b""


    @property
    def connection_tokens(self) -> set[str]:
        return {t.strip().lower() for v in self.header_all("connection") for t in v.split(",")}


class RawConn:
    """A client connection to the proxy: exact bytes out, whole responses in."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 5.0,
                 rcvbuf: int | None = None, sock: socket.socket | None = None) -> None:
        # `sock`: an unconnected socket to use (e.g. one made in another network namespace)
        self.sock = sock if sock is not None else socket.socket(socket.AF_INET,
                                                                socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect((host, port))
        self.timeout = timeout
        self.buf = b""
        self.eof = False

    def __enter__(self) -> RawConn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, deadline: float, want: str) -> None:
        if self.eof:
            raise IncompleteResponse(f"connection closed while reading {want}", self.buf)
        left = deadline - time.monotonic()
        if left <= 0:
            raise IncompleteResponse(f"timed out reading {want}", self.buf)
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(262144)
        except TimeoutError:
            raise IncompleteResponse(f"timed out reading {want}", self.buf) from None
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            raise IncompleteResponse(f"connection closed while reading {want}", self.buf)
        self.buf += data

    def _read_until(self, marker: bytes, deadline: float, want: str) -> bytes:
        while True:
            i = self.buf.find(marker)
            if i >= 0:
                out, self.buf = self.buf[: i + len(marker)], self.buf[i + len(marker):]
                return out
            self._fill(deadline, want)

    def _read_exact(self, n: int, deadline: float, want: str) -> bytes:
        while len(self.buf) < n:
            self._fill(deadline, want)
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_head(self, timeout: float | None = None) -> Response:
        deadline = time.monotonic() + (timeout or self.timeout)
        head = self._read_until(b"\r\n\r\n", deadline, "the response head")
        lines = head[:-4].decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/") or not code.isdigit():
            raise AssertionError(f"bad status line {lines[0]!r}")
        headers = []
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers.append((k, v.strip()))
        return Response(int(code), reason, version, headers, raw_head=head)

    def read_response(self, method: str = "GET", timeout: float | None = None,
                      slow_read: Callable[[int], None] | None = None) -> Response:
        """The next final response (1xx other than 101 collected in `.interim`), body decoded."""
        deadline = time.monotonic() + (timeout or self.timeout)
        interim: list[Response] = []
        while True:
            resp = self.read_head(max(0.001, deadline - time.monotonic()))
            if 100 <= resp.status < 200 and resp.status != 101:
                interim.append(resp)
                continue
            break
        resp.interim = interim
        if method == "HEAD" or resp.status in (204, 304, 101) or resp.status < 200:
            return resp
        te = (resp.header("transfer-encoding") or "").lower()
        cl = resp.header("content-length")
        if te:
            assert te.replace(" ", "") .endswith("chunked"), f"odd Transfer-Encoding {te!r}"
            resp.chunked = True
            parts = []
            while True:
                line = self._read_until(b"\r\n", deadline, "a chunk size")
                n = int(line.split(b";")[0].strip(), 16)
                if n == 0:
                    trailers = b""
                    while True:
                        t = self._read_until(b"\r\n", deadline, "the trailers")
                        if t == b"\r\n":
                            break
                        trailers += t
                    resp.trailers = trailers
                    break
                parts.append(self._read_exact(n, deadline, "a chunk"))
                assert self._read_exact(2, deadline, "a chunk end") == b"\r\n"
            resp.body = b"".join(parts)
        elif cl is not None:
            n = int(cl)
            if slow_read is None:
                resp.body = self._read_exact(n, deadline, "the body")
            else:
                resp.body = self._read_slowly(n, deadline, slow_read)
        else:
            resp.close_delimited = True
            while not self.eof:
                try:
                    self._fill(deadline, "a close-delimited body")
                except IncompleteResponse:
                    if not self.eof:
                        raise
            resp.body, self.buf = self.buf, b""
        return resp

    def _read_slowly(self, n: int, deadline: float, pause: Callable[[int], None]) -> bytes:
        import hashlib

        h = hashlib.sha256()
        got = min(n, len(self.buf))
        h.update(self.buf[:got])
        self.buf = self.buf[got:]
        while got < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise IncompleteResponse("timed out reading the body slowly", b"")
            self.sock.settimeout(left)
            data = self.sock.recv(min(65536, n - got))
            if not data:
                self.eof = True
                raise IncompleteResponse(f"closed after {got} of {n} body bytes", b"")
            h.update(data)
            got += len(data)
            pause(got)
        return h.hexdigest().encode()  # the digest stands in for the body

    def wait_closed(self, timeout: float = 3.0) -> bytes:
        """Wait until the peer closes; returns what arrived meanwhile. Fails if it stays open."""
        deadline = time.monotonic() + timeout
        data = self.buf
        self.buf = b""
        while not self.eof:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"connection still open after {timeout}s (got {data[:200]!r})")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self.eof = True
            data += chunk
        return data

    def is_open(self, wait: float = 0.2) -> bool:
        """True when nothing (no EOF, no data) arrives within `wait`."""
        if self.eof:
            return False
        self.sock.settimeout(wait)
        try:
            chunk = self.sock.recv(65536, socket.MSG_PEEK)
        except TimeoutError:
            return True
        except ConnectionResetError:
            return False
        return bool(chunk)
