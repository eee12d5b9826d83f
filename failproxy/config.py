"""Configuration: TOML in, frozen dataclasses out, one validation pass naming each bad key path.

INTERFACE CONTRACT: the dataclass field names are fixed. Every problem of a file is reported at
once (an operator fixing a config should not have to run `failproxy check` once per typo).
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import pwd
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from failproxy.errors import ConfigError as ConfigError  # re-exported: config.ConfigError
from failproxy.reasons import REASONS, RETRY_ON_NAMES


@dataclass(frozen=True, slots=True)
class Address:
    """A parsed `HOST:PORT`, `[V6]:PORT` or `unix:/absolute/path`."""

    # canonical form, used in logs and metrics: "127.0.0.1:8001", "[::1]:80", "unix:/tmp/s"
    text: str
    kind: str  # "tcp" or "unix"
    host: str = ""  # tcp only (no brackets for v6)
    port: int = 0  # tcp only
    path: str = ""  # unix only

    @property
    def is_unix(self) -> bool:
        return self.kind == "unix"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: tuple[Address, ...] = ()
    tls_listen: tuple[Address, ...] = ()
    tls_cert: str = ""
    tls_key: str = ""
    workers: int = 0
    backlog: int = 1024
    max_connections: int = 10000
    keepalive_timeout: float = 75.0
    keepalive_requests: int = 1000
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    send_timeout: float = 60.0  # longest a client may take none of its answer (nginx send_timeout)
    max_header_bytes: int = 16384
    max_uri_bytes: int = 8192
    max_body_bytes: int = 104857600
    shutdown_timeout: float = 30.0
    pid_file: str = ""
    user: str = ""
    # SPEC 9: a request's whole body is read before any upstream is chosen (nginx's
    # proxy_request_buffering): the first request_buffer_bytes in memory, the rest in a temp file.
    request_buffering: bool = True
    request_buffer_bytes: int = 65536
    temp_dir: str = ""  # where request and answer bodies spill; "" = the system's temp dir


@dataclass(frozen=True, slots=True)
class Upstream:
    """One `[[upstream.server]]` entry."""

    address: Address
    backup: bool = False
    fail_timeout: float = 0.0
    max_fails: int = 1
    max_conns: int = 0
    max_queue: int = 0


@dataclass(frozen=True, slots=True)
class PeersConfig:
    """One `[[upstream.peers]]` entry: backups read from DNS (discovery/watch.py).

    The A and AAAA records of `dns` (looked up as written, at start and every
    `resolve_interval`) become backups `address:port`, sorted, after the listed backups; at most
    `max_peers` of them (the ones that follow this box around the ring). The server keys they
    share have `[[upstream.server]]`'s meanings.
    """

    dns: str
    port: int
    resolve_interval: float = 5.0
    max_peers: int = 32
    fail_timeout: float = 0.0
    max_fails: int = 1
    max_conns: int = 0


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    servers: tuple[Upstream, ...] = ()
    peers: tuple[PeersConfig, ...] = ()
    connect_timeout: float = 0.5
    send_timeout: float = 60.0
    read_timeout: float = 60.0
    retry_on: tuple[str, ...] = ("connect", "reset")
    tries: int = 0
    retry_timeout: float = 0.0
    retry_non_idempotent: bool = False
    retry_body_bytes: int = 65536
    keepalive: int = 32
    keepalive_requests: int = 1000
    keepalive_timeout: float = 60.0
    self: Address | None = None
    # Where overflow goes (SPEC 4.3, balance.py): "room" (a peer with a free worker, else held
    # up to hold_timeout, else home) or "ring" (the listed order, the seed's policy).
    overflow: str = "room"
    hold_timeout: float = 2.0  # room: longest a request waits in failproxy for a free worker
    # room: a local answer slower than this marks the box slow; while none is (10 s), a request
    # finding every worker busy with ours waits for one at home instead of crossing hosts.
    slow_after: float = 0.05
    # Name servers for [[upstream.peers]]; () = the `nameserver` lines of /etc/resolv.conf.
    resolver: tuple[Address, ...] = ()
    resolver_timeout: float = 1.0  # one query to one name server
    # SPEC 9: answers are read at the upstream's speed (nginx's proxy_buffering): the first
    # response_buffer_bytes a slow client leaves behind in memory, then a temp file up to
    # max_temp_file_bytes, then back-pressure.
    response_buffering: bool = True
    response_buffer_bytes: int = 32768
    max_temp_file_bytes: int = 1073741824


@dataclass(frozen=True, slots=True)
class HeadersConfig:
    x_forwarded_for: str = "replace"  # replace | append | off
    x_forwarded_proto: bool = True
    x_forwarded_host: bool = False
    via: bool = True
    request_id: str = "X-Request-Id"
    upstream_header: bool = False


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "info"
    format: str = "json"
    access: bool = True
    file: str = ""
    buffer: int = 0  # bytes gathered before a write (nginx access_log buffer=); 0: each loop turn
    flush: float = 1.0  # seconds a gathered line waits at most (nginx flush=), with buffer > 0


@dataclass(frozen=True, slots=True)
class StaticConfig:
    """SPEC 10: files from the app's public/ directory, served without the app."""

    root: str = ""  # "" = off
    try_files: tuple[str, ...] = ("$uri", "$uri/index.html", "$uri.html")
    gzip_static: bool = True
    error_pages: tuple[tuple[int, str], ...] = ()  # status -> page under root
    intercept_errors: bool = False


DEFAULT_GZIP_TYPES = (
    "text/html",
    "text/plain",
    "text/css",
    "text/xml",
    "text/javascript",
    "application/javascript",
    "application/json",
    "application/xml",
    "image/svg+xml",
)


@dataclass(frozen=True, slots=True)
class CompressConfig:
    """SPEC 10: gzip of text answers as they stream."""

    gzip: bool = False
    types: tuple[str, ...] = DEFAULT_GZIP_TYPES
    min_length: int = 500
    level: int = 1


@dataclass(frozen=True, slots=True)
class RoutesConfig:
    """SPEC 4.4: which routes are slow, learned from their app time or listed."""

    learn: bool = True  # false: every route is fast unless a prefix says otherwise
    slow_ms: float = 200.0  # a route learned slower than this is slow
    slow: tuple[str, ...] = ()  # path prefixes always slow
    fast: tuple[str, ...] = ()  # path prefixes always fast
    max_routes: int = 10000  # route keys remembered per worker
    shed_after: float = 0.0  # > 0: a slow-route request held this long at capacity gets 503


@dataclass(frozen=True, slots=True)
class AdminConfig:
    listen: Address | None = None


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    headers: HeadersConfig = field(default_factory=HeadersConfig)
    log: LogConfig = field(default_factory=LogConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    static: StaticConfig = field(default_factory=StaticConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)
    routes: RoutesConfig = field(default_factory=RoutesConfig)
    path: str = ""  # the file it was loaded from


# --- addresses ---------------------------------------------------------------------------------

ADDRESS_FORMS = "expected HOST:PORT, [V6]:PORT or unix:/absolute/path"
UNIX_PATH_MAX = 107  # sun_path is 108 bytes and needs its trailing NUL
DEFAULT_LISTEN = "127.0.0.1:8000"
MIN_INTERVAL = 0.1  # resolve_interval: DNS is asked at most this often
# Servers a worker counts in shared memory: the listed ones plus every entry's max_peers. The
# failover matrix grows with its square (metrics.py), so it is bounded.
MAX_SLOTS = 256
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(\.{_LABEL})*\.?")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 5.6.2: what a header name may be


def parse_address(text: str) -> Address:
    """Parse one address; raises ValueError with a short reason."""
    if text.startswith("unix:"):
        path = text[5:]
        if not path.startswith("/"):
            raise ValueError(f"unix socket path must be absolute, got {text!r}")
        if "\0" in path:
            raise ValueError(f"unix socket path contains NUL, got {text!r}")
        size = len(os.fsencode(path))
        if size > UNIX_PATH_MAX:
            raise ValueError(f"unix socket path is {size} bytes, at most {UNIX_PATH_MAX} fit")
        return Address(text, "unix", path=path)
    host, sep, port_text = text.rpartition(":")
    if not (sep and host and port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"{ADDRESS_FORMS}, got {text!r}")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port must be 1..65535, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        try:
            host = ipaddress.IPv6Address(host[1:-1]).compressed
        except ValueError:
            raise ValueError(f"{host[1:-1]!r} is not an IPv6 address, in {text!r}") from None
        return Address(f"[{host}]:{port}", "tcp", host=host, port=port)
    if ":" in host or "[" in host or "]" in host:
        raise ValueError(f"{ADDRESS_FORMS} (IPv6 needs brackets: [::1]:80), got {text!r}")
    if host.replace(".", "").isdigit():
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv4 address, in {text!r}") from None
    elif not _HOSTNAME.fullmatch(host):
        raise ValueError(f"{host!r} is not a host name, in {text!r}")
    return Address(f"{host}:{port}", "tcp", host=host, port=port)


# --- validation --------------------------------------------------------------------------------
# Each TOML table is described by a table of checks: key -> (dataclass field, check). A check
# converts one value, or records a problem at its key path and returns _BAD, so one pass over the
# document reports every problem. Checks that span keys run after their table (`_Table.post`).

_BAD: Any = object()


@dataclass(frozen=True, slots=True)
class _At:
    """Where a value sits: its key path for messages, plus what every check may need."""

    path: str
    problems: list[str]
    base_dir: str  # relative file paths are read from the config file's directory

    def key(self, key: str) -> _At:
        return _At(f"{self.path}.{key}" if self.path else key, self.problems, self.base_dir)

    def index(self, i: int) -> _At:
        return _At(f"{self.path}[{i}]", self.problems, self.base_dir)

    def error(self, message: str) -> Any:
        self.problems.append(f"{self.path}: {message}")
        return _BAD


Check = Callable[[Any, _At], Any]


def _show(value: object) -> str:
    """A value as the message should quote it (TOML spelling for booleans)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return repr(value)
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"


def _integer(minimum: int, hint: str = "") -> Check:
    def check(value: Any, at: _At) -> Any:
        if type(value) is int and value >= minimum:
            return value
        return at.error(f"must be an integer >= {minimum}{hint}, got {_show(value)}")

    return check


def _seconds(value: Any, at: _At) -> Any:
    if type(value) in (int, float) and math.isfinite(value) and value >= 0:
        return float(value)
    return at.error(f"must be a number of seconds >= 0, got {_show(value)}")


def _interval(value: Any, at: _At) -> Any:
    if type(value) in (int, float) and math.isfinite(value) and value >= MIN_INTERVAL:
        return float(value)
    return at.error(f"must be a number of seconds >= {MIN_INTERVAL}, got {_show(value)}")


def _bool(value: Any, at: _At) -> Any:
    if isinstance(value, bool):
        return value
    return at.error(f"must be true or false, got {_show(value)}")


def _choice(*names: str) -> Check:
    def check(value: Any, at: _At) -> Any:
        if isinstance(value, str) and value in names:
            return value
        return at.error(f"must be one of {', '.join(names)}, got {_show(value)}")

    return check


def _file(value: Any, at: _At) -> Any:
    """A file path; a relative one is read from the config file's directory, as nginx does."""
    if not isinstance(value, str):
        return at.error(f"must be a file path string, got {_show(value)}")
    return os.path.join(at.base_dir, value) if value else value


def _user(value: Any, at: _At) -> Any:
    if not isinstance(value, str):
        return at.error(f"must be a user name string, got {_show(value)}")
    if value:
        try:
            pwd.getpwnam(value)
        except KeyError:
            return at.error(f"no such user {value!r}")
    return value


def _header_name(value: Any, at: _At) -> Any:
    if isinstance(value, str) and (value == "" or _TOKEN.fullmatch(value)):
        return value
    return at.error(f'must be a header name or "" (off), got {_show(value)}')


def _address(value: Any, at: _At) -> Any:
    if not isinstance(value, str):
        return at.error(f"{ADDRESS_FORMS}, got {_show(value)}")
    try:
        return parse_address(value)
    except ValueError as e:
        return at.error(str(e))


def _port(value: Any, at: _At) -> Any:
    if type(value) is int and 1 <= value <= 65535:
        return value
    return at.error(f"must be a port number 1..65535, got {_show(value)}")


def _dns_name(value: Any, at: _At) -> Any:
    """A host name to look up (an address is listed as an [[upstream.server]] instead)."""
    if not isinstance(value, str):
        return at.error(f"must be a host name string, got {_show(value)}")
    if _is_ip(value.strip("[]")):
        return at.error(f"{value!r} is an address, not a name: list it as an [[upstream.server]]")
    if not _HOSTNAME.fullmatch(value) or len(value.rstrip(".")) > 253:
        return at.error(f"must be a host name, got {_show(value)}")
    return value


def _name_server(value: Any, at: _At) -> Any:
    """`IP`, `IP:PORT` or `[V6]:PORT`: a name server is given by address (port 53 by default)."""
    if isinstance(value, str) and _is_ip(value):
        value = f"[{value}]:53" if ":" in value else f"{value}:53"
    address = _address(value, at)
    if address is _BAD:
        return _BAD
    if address.is_unix or not _is_ip(address.host):
        return at.error(f"a name server is an IP address (IP or IP:PORT), got {_show(value)}")
    return address


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _directory(value: Any, at: _At) -> Any:
    """A directory path ("" = unset); a relative one is read from the config file's directory."""
    if not isinstance(value, str):
        return at.error(f"must be a directory path string, got {_show(value)}")
    if not value:
        return value
    path = os.path.join(at.base_dir, value)
    if not os.path.isdir(path):
        return at.error(f"no such directory {path!r}")
    return path


def _try_file(value: Any, at: _At) -> Any:
    if isinstance(value, str) and value.startswith("$uri") and "\0" not in value:
        return value
    return at.error(f'must be a path pattern starting with "$uri", got {_show(value)}')


def _media_type(value: Any, at: _At) -> Any:
    if isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9.+-]+/[A-Za-z0-9.+*-]+", value):
        return value.lower()
    return at.error(f"must be a media type such as text/html, got {_show(value)}")


def _error_pages(value: Any, at: _At) -> Any:
    """{ 502 = "/500.html", ... }: TOML keys are strings, so each must be a status 300..599."""
    if not isinstance(value, dict):
        return at.error(f"must be a table of status = page, got {_show(value)}")
    pages: list[tuple[int, str]] = []
    ok = True
    for key, page in value.items():
        where = at.key(key)
        if not (key.isdigit() and 300 <= int(key) <= 599):
            where.error("must be an HTTP status 300..599")
            ok = False
        elif not isinstance(page, str) or not page.startswith("/"):
            where.error(f'must be a page under static.root, starting with "/", got {_show(page)}')
            ok = False
        else:
            pages.append((int(key), page))
    return tuple(sorted(pages)) if ok else _BAD


def _optional_address(value: Any, at: _At) -> Any:
    return None if value == "" else _address(value, at)


def _array(item: Check, what: str) -> Check:
    """An array whose every item passes `item`; each bad item is named by its index."""

    def check(value: Any, at: _At) -> Any:
        if not isinstance(value, list):
            return at.error(f"must be an array of {what}, got {_show(value)}")
        items = [item(v, at.index(i)) for i, v in enumerate(value)]
        return _BAD if any(v is _BAD for v in items) else tuple(items)

    return check


def _path_prefix(value: Any, at: _At) -> Any:
    if isinstance(value, str) and value.startswith("/") and value.isprintable() and value.isascii():
        return value
    return at.error(f"must be a path prefix starting with /, got {_show(value)}")


def _milliseconds(value: Any, at: _At) -> Any:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1e9:
        return float(value)
    return at.error(f"must be a number of milliseconds > 0, got {_show(value)}")


def _retry_reason(value: Any, at: _At) -> Any:
    if isinstance(value, str) and value in RETRY_ON_NAMES:
        return value
    names = ", ".join(["connect", *(r for r in REASONS if r in RETRY_ON_NAMES)])
    return at.error(f"must be one of {names}, got {_show(value)}")


@dataclass(frozen=True, slots=True)
class _Table:
    """A TOML table that becomes dataclass `cls`: unknown keys are errors, absent ones default."""

    cls: type[Any]
    keys: dict[str, tuple[str, Check]]
    required: tuple[str, ...] = ()
    defaults: dict[str, Any] = field(default_factory=dict)
    post: Callable[[dict[str, Any], dict[str, Any], _At], None] | None = None

    def __call__(self, value: Any, at: _At) -> Any:
        if not isinstance(value, dict):
            return at.error(f"must be a table, got {_show(value)}")
        good = {**_field_defaults(self.cls), **self.defaults}
        ok = True
        for key, item in value.items():
            entry = self.keys.get(key)
            if entry is None:
                close = difflib.get_close_matches(key, self.keys, n=1)
                at.key(key).error("unknown key" + (f" (did you mean {close[0]}?)" if close else ""))
                ok = False
                continue
            name, check = entry
            converted = check(item, at.key(key))
            if converted is _BAD:
                good.pop(name, None)
                ok = False
            else:
                good[name] = converted
        for key in self.required:
            if key not in value:
                at.key(key).error("required")
                ok = False
        if self.post is not None:
            # `good` holds the defaults and the keys that passed, never a bad value, so one
            # mistake is reported once; `value` is the table as written.
            before = len(at.problems)
            self.post(good, value, at)
            ok = ok and len(at.problems) == before
        return self.cls(**good) if ok else _BAD


def _field_defaults(cls: type[Any]) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _same_keys(**checks: Check) -> dict[str, tuple[str, Check]]:
    return {key: (key, check) for key, check in checks.items()}


def _check_server(v: dict[str, Any], _raw: dict[str, Any], at: _At) -> None:
    if not v.get("listen", True) and not v.get("tls_listen", True):
        at.key("listen").error("no listeners: set server.listen or server.tls_listen")
    seen: dict[Address, str] = {}
    for key in ("listen", "tls_listen"):
        for i, address in enumerate(v.get(key, ())):
            where = f"server.{key}[{i}]"
            if address in seen:
                at.key(key).index(i).error(f"{address.text} is also {seen[address]}")
            seen.setdefault(address, where)
    if v.get("tls_listen"):
        files = {key: v[key] for key in ("tls_cert", "tls_key") if key in v}
        for key, path in files.items():
            if not path:
                at.key(key).error("required when server.tls_listen is set")
            elif not os.path.isfile(path):
                at.key(key).error(f"no such file {path!r}")
        if len(files) == 2 and all(os.path.isfile(p) for p in files.values()):
            from failproxy import tls  # tls imports this module

            try:
                tls.build(files["tls_cert"], files["tls_key"])
            except tls.TLSError as e:
                at.key(e.key).error(e.detail)


def _check_server_entry(v: dict[str, Any], _raw: dict[str, Any], at: _At) -> None:
    address = v.get("address")
    if v.get("max_queue") and address is not None and not address.is_unix:
        at.key("max_queue").error("> 0 needs a unix: server (only their accept queue is readable)")


def _raw_address(entry: Any) -> Address | None:
    """The address of a raw server entry, or None when it is absent or bad (reported elsewhere)."""
    text = entry.get("address") if isinstance(entry, dict) else None
    try:
        return parse_address(text) if isinstance(text, str) else None
    except ValueError:
        return None


def _check_upstream(v: dict[str, Any], raw: dict[str, Any], at: _At) -> None:
    # Read from the raw entries, so a bad key in one entry does not hide a duplicate address.
    entries = raw.get("server", [])
    peers = raw.get("peers", [])
    if not isinstance(entries, list):
        return
    if not entries and not (isinstance(peers, list) and peers):
        at.key("server").error("at least one [[upstream.server]] is required")
    addresses = [_raw_address(entry) for entry in entries]
    seen: dict[Address, int] = {}
    for i, address in enumerate(addresses):
        if address is None:
            continue
        if address in seen:
            at.key("server").index(i).key("address").error(
                f"{address.text} duplicates upstream.server[{seen[address]}].address"
            )
        seen.setdefault(address, i)
    good_peers: tuple[PeersConfig, ...] = v.get("peers", ())
    names: dict[tuple[str, int], int] = {}
    for i, entry in enumerate(good_peers):
        key = (entry.dns.rstrip(".").lower(), entry.port)
        if key in names:
            at.key("peers").index(i).key("dns").error(
                f"{entry.dns} port {entry.port} duplicates upstream.peers[{names[key]}]"
            )
        names.setdefault(key, i)
    slots = len(entries) + sum(entry.max_peers for entry in good_peers)
    if good_peers and slots > MAX_SLOTS:
        at.key("peers").error(
            f"{len(entries)} servers and max_peers adding up to {slots}: at most {MAX_SLOTS}"
        )
    self_address = v.get("self")
    # With [[upstream.peers]], self may name an address that DNS gives (same port as an entry).
    from_dns = isinstance(peers, list) and any(
        isinstance(p, dict) and p.get("port") == getattr(self_address, "port", None)
        for p in peers
    )
    if (self_address is not None and None not in addresses and self_address not in seen
            and not from_dns):
        at.key("self").error(f"{self_address.text} matches no upstream.server address")


def _check_root(v: dict[str, Any], _raw: dict[str, Any], at: _At) -> None:
    server, admin = v.get("server"), v.get("admin")
    if server is None or admin is None or admin.listen is None:
        return
    if admin.listen in (*server.listen, *server.tls_listen):
        at.key("admin").key("listen").error(f"{admin.listen.text} is also a server listener")


def _level(value: Any, at: _At) -> Any:
    if type(value) is int and 1 <= value <= 9:
        return value
    return at.error(f"must be a gzip level 1..9, got {_show(value)}")


def _check_static(v: dict[str, Any], _raw: dict[str, Any], at: _At) -> None:
    if v.get("error_pages") and not v.get("root", "x"):
        at.key("error_pages").error("needs static.root: the pages are files under it")


_SERVER_ENTRY = _Table(
    Upstream,
    _same_keys(
        address=_address,
        backup=_bool,
        fail_timeout=_seconds,
        max_fails=_integer(1, " (fail_timeout = 0 never marks a server down)"),
        max_conns=_integer(0),
        max_queue=_integer(0),
    ),
    required=("address",),
    post=_check_server_entry,
)

_PEERS_ENTRY = _Table(
    PeersConfig,
    _same_keys(
        dns=_dns_name,
        port=_port,
        resolve_interval=_interval,
        max_peers=_integer(1),
        fail_timeout=_seconds,
        max_fails=_integer(1, " (fail_timeout = 0 never marks a server down)"),
        max_conns=_integer(0),
    ),
    required=("dns", "port"),
)

_ROOT = _Table(
    Config,
    {
        "server": (
            "server",
            _Table(
                ServerConfig,
                _same_keys(
                    listen=_array(_address, "addresses"),
                    tls_listen=_array(_address, "addresses"),
                    tls_cert=_file,
                    tls_key=_file,
                    workers=_integer(0),
                    backlog=_integer(1),
                    max_connections=_integer(1),
                    keepalive_timeout=_seconds,
                    keepalive_requests=_integer(1),
                    header_timeout=_seconds,
                    body_timeout=_seconds,
                    send_timeout=_seconds,
                    max_header_bytes=_integer(1),
                    max_uri_bytes=_integer(1),
                    max_body_bytes=_integer(0),
                    shutdown_timeout=_seconds,
                    pid_file=_file,
                    user=_user,
                    request_buffering=_bool,
                    request_buffer_bytes=_integer(0),
                    temp_dir=_directory,
                ),
                defaults={"listen": (parse_address(DEFAULT_LISTEN),)},
                post=_check_server,
            ),
        ),
        "upstream": (
            "upstream",
            _Table(
                UpstreamConfig,
                {
                    "server": ("servers", _array(_SERVER_ENTRY, "tables ([[upstream.server]])")),
                    "peers": ("peers", _array(_PEERS_ENTRY, "tables ([[upstream.peers]])")),
                    **_same_keys(
                        connect_timeout=_seconds,
                        send_timeout=_seconds,
                        read_timeout=_seconds,
                        retry_on=_array(_retry_reason, "reasons"),
                        tries=_integer(0),
                        retry_timeout=_seconds,
                        retry_non_idempotent=_bool,
                        retry_body_bytes=_integer(0),
                        keepalive=_integer(0),
                        keepalive_requests=_integer(1),
                        keepalive_timeout=_seconds,
                        self=_optional_address,
                        overflow=_choice("room", "ring"),
                        hold_timeout=_seconds,
                        slow_after=_seconds,
                        resolver=_array(_name_server, "name server addresses"),
                        resolver_timeout=_interval,
                        response_buffering=_bool,
                        response_buffer_bytes=_integer(0),
                        max_temp_file_bytes=_integer(0),
                    ),
                },
                defaults={"servers": (), "peers": ()},
                post=_check_upstream,
            ),
        ),
        "headers": (
            "headers",
            _Table(
                HeadersConfig,
                _same_keys(
                    x_forwarded_for=_choice("replace", "append", "off"),
                    x_forwarded_proto=_bool,
                    x_forwarded_host=_bool,
                    via=_bool,
                    request_id=_header_name,
                    upstream_header=_bool,
                ),
            ),
        ),
        "log": (
            "log",
            _Table(
                LogConfig,
                _same_keys(
                    level=_choice("debug", "info", "warning", "error"),
                    format=_choice("json", "console"),
                    access=_bool,
                    file=_file,
                    buffer=_integer(0),
                    flush=_seconds,
                ),
            ),
        ),
        "admin": ("admin", _Table(AdminConfig, _same_keys(listen=_optional_address))),
        "static": (
            "static",
            _Table(
                StaticConfig,
                _same_keys(
                    root=_directory,
                    try_files=_array(_try_file, "path patterns"),
                    gzip_static=_bool,
                    error_pages=_error_pages,
                    intercept_errors=_bool,
                ),
                post=_check_static,
            ),
        ),
        "compress": (
            "compress",
            _Table(
                CompressConfig,
                _same_keys(
                    gzip=_bool,
                    types=_array(_media_type, "media types"),
                    min_length=_integer(0),
                    level=_level,
                ),
            ),
        ),
        "routes": (
            "routes",
            _Table(
                RoutesConfig,
                _same_keys(
                    learn=_bool,
                    slow_ms=_milliseconds,
                    slow=_array(_path_prefix, "path prefixes"),
                    fast=_array(_path_prefix, "path prefixes"),
                    max_routes=_integer(1),
                    shed_after=_seconds,
                ),
            ),
        ),
    },
    post=_check_root,
)


def _validate(data: dict[str, Any], path: str, base_dir: str) -> Config:
    problems: list[str] = []
    at = _At("", problems, base_dir)
    # An absent table is checked as an empty one: its defaults may depend on the table's checks.
    cfg: Config = _ROOT({**{key: {} for key in _ROOT.keys}, **data}, at)
    if problems:
        raise ConfigError(problems)
    return dataclasses.replace(cfg, path=path)


def load(path: str) -> Config:
    """Read and validate a TOML file; raises ConfigError listing every problem."""
    path = os.path.abspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError([f"{path}: cannot read the config file: {e.strerror}"]) from None
    try:
        text = raw.decode()
    except UnicodeDecodeError as e:
        raise ConfigError([f"{path}: not UTF-8 text ({e.reason} at byte {e.start})"]) from None
    return loads(text, path)


def loads(text: str, path: str = "<string>") -> Config:
    """Validate TOML text; raises ConfigError listing every problem.

    Relative file paths in it are read from `path`'s directory when `path` is absolute.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{path}: invalid TOML: {e}"]) from None
    base_dir = os.path.dirname(path) if os.path.isabs(path) else ""
    return _validate(data, path, base_dir)
