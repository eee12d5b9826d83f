"""Header rules: which request headers reach the upstream, which response headers reach the client.

Pure functions over lists of (name, value) byte pairs, so every rule is tested without sockets.
"""

from __future__ import annotations

import re

from failproxy.config import HeadersConfig

# RFC 9110 7.6.1 hop-by-hop headers, plus the legacy ones proxies must also drop.
HOP_BY_HOP = frozenset(
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
KNOWN_CODINGS = frozenset({b"chunked", b"gzip", b"x-gzip", b"deflate", b"compress", b"identity"})


# What the client connection does with a request header, by lower-cased name (see
# `header_kinds`); a name that is not in the table is copied through.
H_HOST, H_LENGTH, H_XFF, H_VIA, H_EXPECT, H_REQUEST_ID, H_HOP, H_REPLACED = 1, 2, 3, 4, 5, 6, 7, 8


def header_kinds(request_id: bytes, xff_mode: str, replaced: frozenset[bytes]) -> dict[bytes, int]:
    """Lower-cased request header name -> its H_* kind; built once per worker, because the
    request-id header name and the X-Forwarded-* settings are configured."""
    kinds = dict.fromkeys(HOP_BY_HOP, H_HOP) | dict.fromkeys(replaced, H_REPLACED)
    kinds |= {b"host": H_HOST, b"content-length": H_LENGTH, b"via": H_VIA, b"expect": H_EXPECT}
    if xff_mode != "off":
        kinds[b"x-forwarded-for"] = H_XFF
    if request_id:
        kinds[request_id] = H_REQUEST_ID
    return kinds


class BadRequest(Exception):
    """A request the proxy refuses before any byte reaches an upstream."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def connection_tokens(values: list[bytes]) -> set[bytes]:
    """Lower-cased tokens of every `Connection` header: the names they list are hop-by-hop too."""
    out: set[bytes] = set()
    for value in values:
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                out.add(token)
    return out


def check_transfer_encoding(value: bytes) -> None:
    """Raise BadRequest unless the codings end in `chunked` and are all known (SPEC 8)."""
    codings = [c.strip().lower() for c in value.split(b",")]
    for coding in codings:
        name = coding.split(b";", 1)[0].strip()
        if name not in KNOWN_CODINGS:
            raise BadRequest(501, f"unknown transfer coding {name.decode('latin-1')!r}")
    if codings[-1] != b"chunked":
        raise BadRequest(400, "Transfer-Encoding does not end with chunked")


class RequestHeadBuilder:
    """Builds the upstream request head from the client's; configured once per worker."""

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
    def xff_mode(self) -> str:
        return self._xff

    @property
    def request_id_header(self) -> bytes:
        """Lower-cased name of the request-id header, b"" when off."""
        return self._rid_lower

    def build(
        self,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        *,
        client_ip: str,
        tls: bool,
        request_id: str,
        framing: bytes,
        upgrade: bytes,
        xff_prior: bytes,
        via_prior: bytes,
    ) -> bytes:
        """The head to send upstream.

        `headers` are already filtered (no hop-by-hop, no underscore names, no X-Forwarded-For
        unless it is `off`, no Via, no request-id header); `framing` is the Content-Length or
        Transfer-Encoding line to send, `upgrade` the Upgrade value when tunnelling; the
        `*_prior` values are what the client sent in X-Forwarded-For and Via.
        """
        parts = [method, b" ", target, b" HTTP/1.1\r\n"]
        host = b""
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
            if not host and name.lower() == b"host":
                host = value
        if self._xff == "replace" or (self._xff == "append" and not xff_prior):
            parts += (b"X-Forwarded-For: ", client_ip.encode(), b"\r\n")
        elif self._xff == "append":
            parts += (b"X-Forwarded-For: ", xff_prior, b", ", client_ip.encode(), b"\r\n")
        parts.append(self._proto_https if tls else self._proto_http)
        if self._xfh and host:
            parts += (b"X-Forwarded-Host: ", host, b"\r\n")
        if self._via:
            if via_prior:
                parts += (b"Via: ", via_prior, b", 1.1 failproxy\r\n")
            else:
                parts.append(b"Via: 1.1 failproxy\r\n")
        elif via_prior:
            parts += (b"Via: ", via_prior, b"\r\n")
        if self._rid_name:
            parts += (self._rid_name, b": ", request_id.encode(), b"\r\n")
        if upgrade:
            parts += (b"Connection: upgrade\r\nUpgrade: ", upgrade, b"\r\n")
        parts.append(framing)
        parts.append(b"\r\n")
        return b"".join(parts)


STATUS_REASONS: dict[int, bytes] = {
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


def simple_response(status: int, body: str, *, close: bool, request_id: bytes = b"") -> bytes:
    """A short plain-text response made by the proxy itself (errors, 502/504)."""
    payload = body.encode() + b"\n"
    reason = STATUS_REASONS.get(status, b"Error")
    head = [
        b"HTTP/1.1 %d %s\r\n" % (status, reason),
        b"Content-Type: text/plain; charset=utf-8\r\n",
        b"Content-Length: %d\r\n" % len(payload),
    ]
    if request_id:
        head.append(request_id)
    head.append(b"Connection: close\r\n\r\n" if close else b"\r\n")
    return b"".join(head) + payload


# Response header lines that are not relayed as they are (RFC 9110 7.6.1 hop-by-hop), found in
# one case-sensitive pass over the lower-cased raw head (measured: cheaper than a case-blind
# regex, a `find` per name, or a Python step per line); `Content-Length` is found to frame the
# body and kept, `Upgrade` is kept on a 101.
_RESPONSE_SPECIAL = re.compile(
    rb"\r\n(connection|content-length|transfer-encoding|keep-alive|upgrade|proxy-connection|te"
    rb"|trailer|proxy-authenticate|proxy-authorization):"
)
_PLAIN_TOKENS = frozenset({b"keep-alive", b"close", b"upgrade"})


class InvalidResponse(Exception):
    """An upstream response the proxy must not relay (the client gets 502)."""


class ResponseHead:
    """What a raw response head says, and the part of it that is relayed unchanged."""

    __slots__ = ("chunked", "content_length", "keepalive_hint", "kept", "upgrade")

    def __init__(self) -> None:
        # The status line and every relayed header line, each with its CRLF: the relayed head
        # is `kept` + failproxy's own lines + CRLF.
        self.kept = b""
        self.content_length: bytes | None = None
        self.chunked = False
        self.upgrade = b""
        self.keepalive_hint = 0.0  # the upstream's `Keep-Alive: timeout=N`, 0 when absent


def scan_response_head(head: bytes, status: int) -> ResponseHead:
    """Read a response head (status line + header lines + the blank line, as llhttp validated
    it): the lines to drop are cut out, everything else is relayed byte for byte.

    Raises InvalidResponse for framing a proxy must not pass on: Transfer-Encoding that does not
    end in chunked or applies chunked twice, Content-Length beside Transfer-Encoding, differing
    Content-Length values, an obs-fold (RFC 9112 5.2: a proxy may reject it)."""
    out = ResponseHead()
    if head.find(b"\r\n ") >= 0 or head.find(b"\r\n\t") >= 0:
        raise InvalidResponse("obs-fold in a response header")
    cuts: list[tuple[int, int]] = []  # (start, end) of each line to drop, from its CRLF
    codings: list[bytes] = []
    tokens: list[bytes] = []
    for match in _RESPONSE_SPECIAL.finditer(head.lower()):
        name = match.group(1)
        at = match.start()
        eol = head.find(b"\r\n", at + 2)
        value = head[match.end() : eol].strip(b" \t")
        if name == b"content-length":
            if out.content_length is not None and out.content_length != value:
                raise InvalidResponse("differing Content-Length values")
            out.content_length = value
            continue
        if name == b"upgrade":
            out.upgrade = value
            if status == 101:
                continue
        elif name == b"transfer-encoding":
            codings += [c.strip().lower() for c in value.split(b",")]
        elif name == b"connection":
            tokens.append(value)
        elif name == b"keep-alive":
            out.keepalive_hint = _keepalive_timeout(value)
        cuts.append((at, eol))
    end = len(head) - 2  # without the blank line
    if head.startswith(b"HTTP/1.1 "):
        start = b""
        pos = 0
    else:
        # An HTTP/1.0 upstream: the client always gets an HTTP/1.1 status line.
        pos = head.find(b"\r\n")
        start = b"HTTP/1.1" + head[8:pos]
    if cuts:
        parts = [start]
        for cut_start, cut_end in cuts:
            parts.append(head[pos:cut_start])
            pos = cut_end
        parts.append(head[pos:end])
        kept = b"".join(parts)
    else:
        kept = start + head[pos:end]
    if codings:
        if codings[-1] != b"chunked":
            raise InvalidResponse("response Transfer-Encoding not ending in chunked")
        if codings.count(b"chunked") > 1:
            raise InvalidResponse("response Transfer-Encoding applies chunked twice")
        if out.content_length is not None:
            raise InvalidResponse("response with both Content-Length and Transfer-Encoding")
        out.chunked = True
    if tokens:
        named = connection_tokens(tokens) - _PLAIN_TOKENS
        if named:
            kept = _drop_lines(kept, named)
    out.kept = kept
    return out


def _drop_lines(kept: bytes, names: set[bytes]) -> bytes:
    """Header lines whose (lower-cased) name is in `names` cut out; the status line stays."""
    lines = kept.split(b"\r\n")
    keep = [lines[0]] + [
        line for line in lines[1:] if line.split(b":", 1)[0].strip().lower() not in names
    ]
    return b"\r\n".join(keep)


def _keepalive_timeout(value: bytes) -> float:
    """`Keep-Alive: timeout=N` tells when the upstream will close an idle connection."""
    for part in value.split(b","):
        key, _, val = part.strip().partition(b"=")
        if key.lower() == b"timeout":
            try:
                return float(val)
            except ValueError:
                return 0.0
    return 0.0


def response_tail(framing: bytes, *, keep_alive: bool, http10: bool, extra: bytes) -> bytes:
    """failproxy's own lines after a relayed head's `kept` part, and the blank line."""
    if not keep_alive:
        return framing + extra + b"Connection: close\r\n\r\n"
    if http10:
        return framing + extra + b"Connection: keep-alive\r\n\r\n"
    return framing + extra + b"\r\n"
