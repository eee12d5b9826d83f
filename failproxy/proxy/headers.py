"""Header rules: which request headers reach the upstream, which response headers reach the client.

Pure functions over lists of (name, value) byte pairs, so every rule is tested without sockets.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from email.utils import formatdate
from typing import Any, Final

from failproxy.config import HeadersConfig

# RFC 9110 7.6.1 hop-by-hop headers, plus the legacy ones proxies must also drop.
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
    }
)

# Transfer codings failproxy knows (RFC 9112 7); any other is 501.
KNOWN_CODINGS: Final = frozenset(
    {b"chunked", b"gzip", b"x-gzip", b"deflate", b"compress", b"identity"}
)


# RFC 3986 host [":" port] as a Host value or an absolute-form authority: an IP-literal
# ("[v6]" or "[vX.future]") or a non-empty reg-name (unreserved, sub-delims, %HH), then an optional
# port of digits; trailing OWS is llhttp's (it keeps it in the value).
_SUB = rb"A-Za-z0-9\-._~!$&'()*+,;="
_HOST_RE: Final = re.compile(
    rb"(?:\[(?:[0-9A-Fa-f:.]+|[vV][0-9A-Fa-f]+\.[" + _SUB + rb":]+)\]"
    rb"|(?:[" + _SUB + rb"]|%[0-9A-Fa-f]{2})+)(?::[0-9]*)?[ \t]*"
)
KNOWN_HOSTS: Final[set[bytes]] = set()  # values already checked: most traffic repeats a few Hosts
_KNOWN_HOSTS_MAX: Final = 256


def valid_host(value: bytes) -> bool:
    """Is `value` a valid Host field value (RFC 9112 3.2, RFC 3986 3.2.2)? Known-good values are
    remembered (a bounded set), so the common case is one set lookup, not a regex."""
    if value in KNOWN_HOSTS:
        return True
    if _HOST_RE.fullmatch(value) is None:
        return False
    if len(KNOWN_HOSTS) >= _KNOWN_HOSTS_MAX:
        KNOWN_HOSTS.clear()
    KNOWN_HOSTS.add(value)
    return True


def upgrade_tokens(value: bytes) -> list[bytes]:
    """The protocols of an `Upgrade` value, as sent, without empty list elements."""
    return [t for t in (p.strip() for p in value.split(b",")) if t]


def without_h2c(value: bytes) -> bytes:
    """An `Upgrade` value less h2c: cleartext HTTP/2 through a proxy tunnels past it (the upstream
    answers 101 and the proxy would relay bytes it never parses), so HAProxy drops it too."""
    return b", ".join(t for t in upgrade_tokens(value) if t.lower() != b"h2c")


def upgrade_matches(answered: bytes, asked: bytes) -> bool:
    """May a 101 naming `answered` be tunnelled for a request that asked for `asked`? Every
    protocol it names must be one asked for (RFC 9110 7.8; names compare case-insensitively)."""
    got = {t.lower() for t in upgrade_tokens(answered)}
    return bool(got) and got <= {t.lower() for t in upgrade_tokens(asked)}


# What the client connection does with a request header (see `request_kind_names`); H_PLAIN is
# copied through.
H_PLAIN: Final = 0
H_HOST: Final = 1
H_LENGTH: Final = 2
H_XFF: Final = 3
H_VIA: Final = 4
H_EXPECT: Final = 5
H_REQUEST_ID: Final = 6
H_CONNECTION: Final = 7
H_TE: Final = 8
H_UPGRADE: Final = 9
H_DROP: Final = 10  # other hop-by-hop ones, the ones failproxy sets itself, HTTP2-Settings
H_UNDERSCORE: Final = 11  # dropped, as nginx does: WSGI/Rack would read X_A as X-A
H_KEEPALIVE: Final = 12  # responses only: `Keep-Alive: timeout=N`
H_ACCEL: Final = 13  # responses only: `X-Accel-Buffering` (read, never relayed: SPEC 9)
H_PROXY_CONNECTION: Final = 14  # requests only: dropped, but llhttp reads it (requestparser)

_NAMES_REMEMBERED: Final = 512


class NameTable:
    """Header name -> what to do with it, looked up by the name exactly as it arrived.

    A name seen for the first time is lower-cased and classified once, then remembered (a bounded
    dict): traffic repeats a few dozen names in a few spellings, so the common case is one dict
    lookup per header, no bytes.lower() (a generic method call, the dearest step per header)."""

    __slots__ = ("_by_lower", "_seen", "_underscore")

    def __init__(self, by_lower: dict[bytes, int], underscore: bool) -> None:
        self._by_lower = by_lower
        self._underscore = underscore
        self._seen: dict[bytes, int] = {}

    def kind(self, name: bytes) -> int:
        kind = self._seen.get(name, -1)
        if kind >= 0:
            return kind
        if self._underscore and name.find(b"_") >= 0:
            kind = H_UNDERSCORE
        else:
            kind = self._by_lower.get(name.lower(), H_PLAIN)
        if len(self._seen) >= _NAMES_REMEMBERED:
            self._seen.clear()
        self._seen[name] = kind
        return kind


def request_kind_names(
    request_id: bytes, xff_mode: str, replaced: frozenset[bytes]
) -> dict[bytes, int]:
    """The request headers of a worker that are not plain, by lower-cased name: the request-id
    header name and the X-Forwarded-* settings are configured. Either twin's table is made
    from it (requestparser.Names, with underscore=True: names with an underscore are
    H_UNDERSCORE in both)."""
    kinds = dict.fromkeys(HOP_BY_HOP, H_DROP) | dict.fromkeys(replaced, H_DROP)
    kinds[b"http2-settings"] = H_DROP  # h2c is never forwarded (see without_h2c)
    kinds[b"proxy-connection"] = H_PROXY_CONNECTION
    kinds |= {
        b"host": H_HOST,
        b"content-length": H_LENGTH,
        b"via": H_VIA,
        b"expect": H_EXPECT,
        b"connection": H_CONNECTION,
        b"transfer-encoding": H_TE,
        b"upgrade": H_UPGRADE,
    }
    if xff_mode != "off":
        kinds[b"x-forwarded-for"] = H_XFF
    if request_id:
        kinds[request_id] = H_REQUEST_ID
    return kinds


def response_kinds() -> NameTable:
    """The response header table: hop-by-hop ones dropped, framing ones read."""
    return NameTable(response_kind_names(), underscore=False)


def response_kind_names() -> dict[bytes, int]:
    """The response headers that are not plain, by lower-cased name (the Cython response
    parser builds its C table from this too)."""
    return dict.fromkeys(HOP_BY_HOP, H_DROP) | {
        b"connection": H_CONNECTION,
        b"content-length": H_LENGTH,
        b"transfer-encoding": H_TE,
        b"keep-alive": H_KEEPALIVE,
        b"upgrade": H_UPGRADE,
        b"x-accel-buffering": H_ACCEL,
    }


def without_names(lines: list[bytes], names: set[bytes]) -> list[bytes]:
    """Header pieces (name, b": ", value, CRLF each) less the headers whose lower-cased name is
    in `names`."""
    out: list[bytes] = []
    for i in range(0, len(lines), 4):
        if lines[i].lower() not in names:
            out += lines[i : i + 4]
    return out


class BadRequest(Exception):
    """A request the proxy refuses before any byte reaches an upstream."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def connection_tokens(values: Sequence[bytes]) -> set[bytes]:
    """Lower-cased tokens of every `Connection` header: the names they list are hop-by-hop too."""
    out: set[bytes] = set()
    for value in values:
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                out.add(token)
    return out


def check_transfer_encoding(value: bytes) -> None:
    """Raise BadRequest unless the codings end in `chunked` and are all known (SPEC 8). A tab
    in the value is refused here: llhttp refuses it once the body starts, which would be after
    the head went upstream."""
    if value.find(b"\t") >= 0:
        raise BadRequest(400, "tab in Transfer-Encoding")
    codings = [c.strip().lower() for c in value.split(b",")]
    for coding in codings:
        name = coding.split(b";", 1)[0].strip()
        if name not in KNOWN_CODINGS:
            raise BadRequest(501, f"unknown transfer coding {name.decode('latin-1')!r}")
    if codings[-1] != b"chunked":
        raise BadRequest(400, "Transfer-Encoding does not end with chunked")


class RequestHeadBuilder:
    """Builds the upstream request head from the client's; configured once per worker.

    `build` is the pure twin; `writer()` gives what a connection calls per request: the Cython
    twin's (`_heads.RequestHead`) where it runs, else `build` itself."""

    __slots__ = ("_proto_http", "_proto_https", "_rid_lower", "_rid_name", "_via", "_xff", "_xfh")

    def __init__(self, cfg: HeadersConfig) -> None:
        self._xff = cfg.x_forwarded_for
        self._proto_http = b"X-Forwarded-Proto: http\r\n" if cfg.x_forwarded_proto else b""
        self._proto_https = b"X-Forwarded-Proto: https\r\n" if cfg.x_forwarded_proto else b""
        self._xfh = cfg.x_forwarded_host
        self._via = cfg.via
        self._rid_name = cfg.request_id.encode("latin-1")
        self._rid_lower = self._rid_name.lower()

    @property
    def request_id_header(self) -> bytes:
        """Lower-cased name of the request-id header, b"" when off."""
        return self._rid_lower

    def writer(self) -> RequestHeadWriter:
        """The per-request `build`, in C where the Cython twin runs."""
        if _REQUEST_HEAD is None:
            return self.build
        writer: RequestHeadWriter = _REQUEST_HEAD(
            self._xff, self._proto_http, self._proto_https, self._xfh, self._via,
            self._rid_name, self.build).build
        return writer

    def build(
        self,
        method: bytes,
        target: bytes,
        lines: list[bytes],
        host: bytes,
        client_ip: bytes,
        tls: bool,
        request_id: str,
        framing: bytes,
        upgrade: bytes,
        xff_prior: bytes,
        via_prior: bytes,
    ) -> bytes:
        """The head to send upstream.

        `lines` are the header pieces already filtered (no hop-by-hop, no underscore names, no
        X-Forwarded-For unless it is `off`, no Via, no request-id header) and `host` the Host
        value among them; `framing` is the Content-Length or
        Transfer-Encoding line to send, `upgrade` the Upgrade value when tunnelling; the
        `*_prior` values are what the client sent in X-Forwarded-For and Via.

        Pieces are appended one by one: `parts += (a, b, c)` makes a tuple and goes through
        the generic in-place concatenation (~300 instructions each, bench/PROFILE.md).
        """
        parts = [method, b" ", target, b" HTTP/1.1\r\n"]
        parts.extend(lines)
        xff = self._xff
        if xff == "replace" or (xff == "append" and not xff_prior):
            parts.append(b"X-Forwarded-For: ")
            parts.append(client_ip)
            parts.append(b"\r\n")
        elif xff == "append":
            parts.append(b"X-Forwarded-For: ")
            parts.append(xff_prior)
            parts.append(b", ")
            parts.append(client_ip)
            parts.append(b"\r\n")
        parts.append(self._proto_https if tls else self._proto_http)
        if self._xfh and host:
            parts.append(b"X-Forwarded-Host: ")
            parts.append(host)
            parts.append(b"\r\n")
        if self._via:
            if via_prior:
                parts.append(b"Via: ")
                parts.append(via_prior)
                parts.append(b", 1.1 failproxy\r\n")
            else:
                parts.append(b"Via: 1.1 failproxy\r\n")
        elif via_prior:
            parts.append(b"Via: ")
            parts.append(via_prior)
            parts.append(b"\r\n")
        if self._rid_name:
            parts.append(self._rid_name)
            parts.append(b": ")
            parts.append(request_id.encode())
            parts.append(b"\r\n")
        if upgrade:
            parts.append(b"Connection: upgrade\r\nUpgrade: ")
            parts.append(upgrade)
            parts.append(b"\r\n")
        parts.append(framing)
        parts.append(b"\r\n")
        return b"".join(parts)


STATUS_REASONS: Final[dict[int, bytes]] = {
    400: b"Bad Request",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
    499: b"Client Closed Request",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}


def simple_response(
    status: int, body: str, *, close: bool, request_id: bytes = b"", head: bool = False,
    extra: bytes = b"",
) -> bytes:
    """A short plain-text response made by the proxy itself (errors, 502/504). `head`: it
    answers a HEAD request: the same head, no body (RFC 9110 9.3.2), or a client keeping the
    connection would read the text as its next answer."""
    payload = body.encode() + b"\n"
    reason = STATUS_REASONS.get(status, b"Error")
    lines = [
        b"HTTP/1.1 %d %s\r\n" % (status, reason),
        b"Content-Type: text/plain; charset=utf-8\r\n",
        b"Content-Length: %d\r\n" % len(payload),
    ]
    if request_id:
        lines.append(request_id)
    if extra:
        lines.append(extra)  # whole header lines, e.g. Retry-After
    lines.append(b"Connection: close\r\n\r\n" if close else b"\r\n")
    return b"".join(lines) if head else b"".join(lines) + payload


class _Clock:
    """The Date of answers failproxy makes itself from files, formatted once a second."""

    __slots__ = ("second", "text")

    def __init__(self) -> None:
        self.second = -1
        self.text = b""


_CLOCK: Final = _Clock()


def http_date() -> bytes:
    """The IMF-fixdate of now (RFC 9110 6.6.1)."""
    now = int(time.time())
    clock = _CLOCK
    if clock.second != now:
        clock.second = now
        clock.text = formatdate(now, usegmt=True).encode()
    return clock.text


def page_response(
    status: int, content_type: bytes, body: bytes, *, close: bool, head: bool = False,
    extra: bytes = b"",
) -> bytes:
    """An answer failproxy makes itself from a page of static.error_pages (SPEC 10): the status
    kept, the page's type and bytes."""
    reason = STATUS_REASONS.get(status, b"Error")
    parts = [
        b"HTTP/1.1 %d %s\r\n" % (status, reason),
        b"Content-Type: %s\r\n" % content_type,
        b"Content-Length: %d\r\n" % len(body),
        extra,
        b"Connection: close\r\n\r\n" if close else b"\r\n",
    ]
    if not head:
        parts.append(body)
    return b"".join(parts)


# RFC 9110 15: the status lines failproxy writes itself. As nginx, a known status code gets its
# standard reason phrase (whatever the upstream wrote); only another code relays the upstream's.
STATUS_LINES: Final[dict[int, bytes]] = {
    code: b"HTTP/1.1 %d %s\r\n" % (code, reason)
    for code, reason in {
        100: b"Continue", 101: b"Switching Protocols", 102: b"Processing", 103: b"Early Hints",
        200: b"OK", 201: b"Created", 202: b"Accepted", 203: b"Non-Authoritative Information",
        204: b"No Content", 205: b"Reset Content", 206: b"Partial Content",
        207: b"Multi-Status", 208: b"Already Reported", 226: b"IM Used",
        300: b"Multiple Choices", 301: b"Moved Permanently", 302: b"Found", 303: b"See Other",
        304: b"Not Modified", 305: b"Use Proxy", 307: b"Temporary Redirect",
        308: b"Permanent Redirect",
        400: b"Bad Request", 401: b"Unauthorized", 402: b"Payment Required", 403: b"Forbidden",
        404: b"Not Found", 405: b"Method Not Allowed", 406: b"Not Acceptable",
        407: b"Proxy Authentication Required", 408: b"Request Timeout", 409: b"Conflict",
        410: b"Gone", 411: b"Length Required", 412: b"Precondition Failed",
        413: b"Content Too Large", 414: b"URI Too Long", 415: b"Unsupported Media Type",
        416: b"Range Not Satisfiable", 417: b"Expectation Failed", 421: b"Misdirected Request",
        422: b"Unprocessable Content", 423: b"Locked", 424: b"Failed Dependency",
        425: b"Too Early", 426: b"Upgrade Required", 428: b"Precondition Required",
        429: b"Too Many Requests", 431: b"Request Header Fields Too Large",
        451: b"Unavailable For Legal Reasons",
        500: b"Internal Server Error", 501: b"Not Implemented", 502: b"Bad Gateway",
        503: b"Service Unavailable", 504: b"Gateway Timeout",
        505: b"HTTP Version Not Supported", 506: b"Variant Also Negotiates",
        507: b"Insufficient Storage", 508: b"Loop Detected", 510: b"Not Extended",
        511: b"Network Authentication Required",
    }.items()
}
# A reason phrase that may be relayed (RFC 9112 4: HTAB, SP, VCHAR, obs-text; llhttp lets
# other control bytes through).
_REASON_RE: Final = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")


def valid_status(status: int, reason: bytes) -> bool:
    """May a status line failproxy has no line of its own for be relayed? Codes outside 100-599
    are invalid (RFC 9110 15), and so is a reason phrase with control bytes."""
    return 100 <= status <= 599 and _REASON_RE.fullmatch(reason) is not None


def response_head_py(
    status: int,
    reason: bytes,
    lines: list[bytes],
    framing: bytes,
    keep_alive: bool,
    http10: bool,
    extra: bytes,
) -> bytes:
    """The head relayed to the client: upstream headers minus hop-by-hop ones, our framing and
    connection lines. `lines` arrive already filtered, as pieces (name, b": ", value, CRLF);
    `extra` holds optional debug lines. The pure twin of `_heads.ResponseHead.write`."""
    line = STATUS_LINES.get(status)
    parts = [line] if line is not None else [b"HTTP/1.1 %d " % status, reason, b"\r\n"]
    parts += lines
    parts.append(framing)
    if extra:
        parts.append(extra)
    if not keep_alive:
        parts.append(b"Connection: close\r\n\r\n")
    elif http10:
        parts.append(b"Connection: keep-alive\r\n\r\n")
    else:
        parts.append(b"\r\n")
    return b"".join(parts)


# What the two heads' writers are called as (positional: a call with keywords costs more).
RequestHeadWriter = Callable[
    [bytes, bytes, list[bytes], bytes, bytes, bool, str, bytes, bytes, bytes, bytes], bytes]
ResponseHeadWriter = Callable[[int, bytes, list[bytes], bytes, bool, bool, bytes], bytes]


def _select() -> tuple[Any, Any, str]:
    try:
        from failproxy.proxy._heads import (  # type: ignore[import-not-found]
            RequestHead,
            ResponseHead,
        )
    except ImportError:
        return None, None, "pure"
    return RequestHead, ResponseHead, "cython"


# The Cython twins' classes (None where they are not built or the build is pure), and which
# twin runs.
_REQUEST_HEAD, _RESPONSE_HEAD, BUILT = _select()


def _response_writer() -> ResponseHeadWriter:
    if _RESPONSE_HEAD is None:
        return response_head_py
    writer: ResponseHeadWriter = _RESPONSE_HEAD(STATUS_LINES, response_head_py).write
    return writer


# The client's response head, written by the twin that runs: (status, reason, lines, framing,
# keep_alive, http10, extra), positional.
response_head: Final = _response_writer()
