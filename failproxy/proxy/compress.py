"""SPEC 10's compression: which answers are gzip-compressed as they stream, and the compressor.

Pure: no loop, no sockets. The client connection asks `should_gzip` once per answer head, then
feeds the body through a `Gzipper`. Headers are flat pieces, as everywhere in failproxy:
[name, b": ", value, b"\\r\\n", ...], four pieces per header line.

`accepts_gzip` lives here (not in static.py) because both the static files (gzip_static) and the
streaming compression ask the same question of the same header.
"""

from __future__ import annotations

import re
import zlib
from typing import Final

from failproxy.config import CompressConfig
from failproxy.proxy.spool import Source

# RFC 9110 12.4.2 qvalue: "0" ["." 0*3DIGIT] / "1" ["." 0*3("0")]. Anything else is not a weight
# we can trust, so the element that carries it is ignored (it neither grants nor refuses).
_QVALUE: Final = re.compile(rb"(?:0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?)")

# Statuses that never get a compressed body: 204/304 have none, 206 is a byte range of the
# identity representation (compressing it would make the range meaningless).
_NO_BODY_CHANGE: Final = frozenset({204, 206, 304})


def _weight(params: list[bytes]) -> float | None:
    """The q of one Accept-Encoding element's parameters: 1.0 when absent, None when malformed."""
    for param in params:
        key, eq, val = param.partition(b"=")
        if key.strip().lower() != b"q":
            continue
        val = val.strip()
        if not eq or _QVALUE.fullmatch(val) is None:
            return None
        return float(val)
    return 1.0


def accepts_gzip(value: bytes) -> bool:
    """Does an Accept-Encoding value accept gzip (RFC 9110 12.5.3)? An explicit `gzip` (or its
    alias `x-gzip`) decides by its own q; otherwise `*` decides; otherwise no. q=0 refuses, so
    "gzip;q=0, *" does not accept gzip even though `*` would. An empty value asks for identity
    only. Elements with a malformed q are ignored rather than guessed at."""
    explicit: float | None = None
    wildcard: float | None = None
    for element in value.split(b","):
        parts = element.split(b";")
        coding = parts[0].strip().lower()
        if coding not in (b"gzip", b"x-gzip", b"*"):
            continue
        q = _weight(parts[1:])
        if q is None:
            continue
        if coding == b"*":
            wildcard = q if wildcard is None else max(wildcard, q)
        else:
            explicit = q if explicit is None else max(explicit, q)
    if explicit is not None:
        return explicit > 0.0
    return wildcard is not None and wildcard > 0.0


def header_value(lines: list[bytes], name: bytes) -> bytes | None:
    """The first value of header `name` (given lower-case) in flat pieces, names compared
    case-insensitively (they arrive as the peer spelled them), surrounding whitespace stripped."""
    for i in range(0, len(lines) - 3, 4):
        if lines[i].lower() == name:
            return lines[i + 2].strip()
    return None


def header_list(lines: list[bytes], name: bytes) -> bytes | None:
    """Every value of list header `name` joined by ", " (RFC 9110 5.3: a list split over several
    lines means the same as one line), or None when absent. For Accept-Encoding, If-None-Match."""
    found: list[bytes] = []
    for i in range(0, len(lines) - 3, 4):
        if lines[i].lower() == name:
            found.append(lines[i + 2].strip())
    if not found:
        return None
    return b", ".join(found)


def media_type(content_type: bytes) -> bytes:
    """The media type of a Content-Type value: before any parameter, trimmed, lower-case."""
    return content_type.partition(b";")[0].strip().lower()


def should_gzip(
    cfg: CompressConfig,
    status: int,
    head_request: bool,
    accept_encoding: bytes | None,
    lines: list[bytes],
    content_length: int | None,
) -> bool:
    """Is this answer compressed on its way to the client (SPEC 10)? `lines` are the answer's
    header pieces; `content_length` its length when known (None: close-delimited or chunked).
    Cheap tests first: most answers stop at `cfg.gzip` or the client's Accept-Encoding."""
    if not cfg.gzip or head_request or accept_encoding is None:
        return False
    if status < 200 or status in _NO_BODY_CHANGE:
        return False
    if content_length is not None and content_length < cfg.min_length:
        return False
    if not accepts_gzip(accept_encoding):
        return False
    content_type: bytes | None = None
    for i in range(0, len(lines) - 3, 4):
        lower = lines[i].lower()
        if lower == b"content-encoding":
            return False  # already encoded (even "identity": the upstream chose; leave it)
        if lower == b"content-type" and content_type is None:
            content_type = lines[i + 2]
    if content_type is None:
        return False
    return media_type(content_type).decode("latin-1") in cfg.types


def _names_token(value: bytes, token: bytes) -> bool:
    """Does a comma list (Vary) name `token` (lower-case), or `*`?"""
    for item in value.split(b","):
        item = item.strip().lower()
        if item == token or item == b"*":
            return True
    return False


class Gzipper:
    """One answer's gzip stream (RFC 1952 framing: wbits 31). The caller calls `compress` per
    upstream read and `flush_sync` at the end of each read, so a streaming client (server-sent
    events, a long page flushed in parts) gets its bytes promptly, while the bytes of one read are
    still compressed together for ratio; `finish` writes the trailer."""

    __slots__ = ("_z",)

    def __init__(self, level: int) -> None:
        self._z = zlib.compressobj(level, zlib.DEFLATED, 31)

    def rewrite_headers(self, lines: list[bytes]) -> list[bytes]:
        """The answer's header pieces as they go out compressed: Content-Length dropped (the
        compressed length is unknown until the end: the caller frames it chunked or by close),
        Accept-Ranges dropped (ranges of the upstream's identity bytes mean nothing in the gzip
        stream; nginx's gzip filter drops it too), `Content-Encoding: gzip` added, Vary made to
        name Accept-Encoding (appended to an existing Vary unless it names it or is `*`), and a
        strong ETag made weak (the bytes differ from the identity representation's, and a
        deflate at another level or zlib version would differ again: only weakly equal)."""
        vary_done = False
        for i in range(0, len(lines) - 3, 4):
            if lines[i].lower() == b"vary" and _names_token(lines[i + 2], b"accept-encoding"):
                vary_done = True
                break
        out: list[bytes] = []
        for i in range(0, len(lines) - 3, 4):
            name = lines[i]
            lower = name.lower()
            if lower == b"content-length" or lower == b"accept-ranges":
                continue
            value = lines[i + 2]
            if lower == b"etag":
                stripped = value.strip()
                if not stripped.startswith(b"W/"):
                    value = b"W/" + stripped
            elif lower == b"vary" and not vary_done:
                stripped = value.strip()
                value = stripped + b", Accept-Encoding" if stripped else b"Accept-Encoding"
                vary_done = True
            out += (name, b": ", value, b"\r\n")
        out += (b"Content-Encoding", b": ", b"gzip", b"\r\n")
        if not vary_done:
            out += (b"Vary", b": ", b"Accept-Encoding", b"\r\n")
        return out

    def compress(self, data: bytes) -> bytes:
        """Compressed bytes for `data`; often b"" (zlib keeps input until it has a block)."""
        return self._z.compress(data)

    def flush_sync(self) -> bytes:
        """Everything given so far, decodable by the client now (Z_SYNC_FLUSH: byte-aligned,
        the stream goes on). Called once per upstream read, not per piece."""
        return self._z.flush(zlib.Z_SYNC_FLUSH)

    def finish(self) -> bytes:
        """The last deflate block and the gzip trailer (CRC32, length). Call once, at the end."""
        return self._z.flush(zlib.Z_FINISH)


class GzipSource(Source):
    """A static file compressed as the client takes it ([compress] applies to files under
    static.root as to the app's answers, as nginx's gzip does): each piece read from `inner` is
    compressed and sync-flushed, and framed chunked (`chunked`) or, for an HTTP/1.0 client,
    sent bare with the connection closing after it."""

    __slots__ = ("chunked", "done", "gz", "inner", "produced", "spilled")

    def __init__(self, inner: Source, gz: Gzipper, chunked: bool) -> None:
        self.inner = inner
        self.gz = gz
        self.chunked = chunked
        self.done = False
        self.spilled = 0
        self.produced = 0

    @property
    def pending(self) -> int:
        return 0 if self.done else self.inner.pending + 1  # + the gzip trailer still to come

    @property
    def unsent(self) -> int:
        return 0  # its bytes are counted as they are handed out (produced)

    def full(self) -> bool:
        return False

    def take(self) -> bytes:
        while not self.done:
            data = self.inner.take()
            if data:
                out = self.gz.compress(data) + self.gz.flush_sync()
            else:
                out = self.gz.finish()
                self.done = True
            if self.chunked:
                framed = b"%x\r\n%b\r\n" % (len(out), out) if out else b""
                if self.done:
                    framed += b"0\r\n\r\n"
                out = framed
            if out:
                self.produced += len(out)
                return out
        return b""

    def close(self) -> None:
        self.inner.close()
