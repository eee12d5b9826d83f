"""SPEC 10's streaming gzip as tables: the decision, the header rewrite, the stream itself."""

from __future__ import annotations

import gzip
import os
import zlib

import pytest

from failproxy.config import CompressConfig
from failproxy.proxy.compress import (
    Gzipper,
    accepts_gzip,
    header_list,
    header_value,
    media_type,
    should_gzip,
)

ON = CompressConfig(gzip=True)


def hdrs(*pairs: tuple[bytes, bytes]) -> list[bytes]:
    out: list[bytes] = []
    for name, value in pairs:
        out += (name, b": ", value, b"\r\n")
    return out


def pairs(lines: list[bytes]) -> list[tuple[bytes, bytes]]:
    assert len(lines) % 4 == 0
    for i in range(0, len(lines), 4):
        assert lines[i + 1] == b": " and lines[i + 3] == b"\r\n"
    return [(lines[i], lines[i + 2]) for i in range(0, len(lines), 4)]


HTML = hdrs((b"Content-Type", b"text/html; charset=utf-8"), (b"Content-Length", b"1000"))


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (b"gzip", True),
        (b"GZIP", True),
        (b"x-gzip", True),
        (b"deflate, gzip", True),
        (b"gzip, deflate, br", True),
        (b"br;q=1.0, gzip;q=0.8, *;q=0.1", True),
        (b"gzip;q=0", False),
        (b"gzip;q=0.000", False),
        (b"gzip; q=0.001", True),
        (b"gzip;Q=0", False),
        (b"*", True),
        (b"*;q=0", False),
        (b"gzip;q=0, *", False),  # the explicit refusal wins over the wildcard
        (b"*;q=0, gzip", True),  # the explicit acceptance wins over the wildcard refusal
        (b"identity", False),
        (b"br, deflate", False),
        (b"", False),
        (b"gzipper", False),
        (b"gzip;q=2", False),  # malformed q: the element is ignored
        (b"gzip;q=abc, *;q=0.5", True),  # ...so the wildcard decides
        (b"gzip;q=0.5;level=1", True),
        (b" gzip ; q=1 ", True),
    ],
)
def test_accepts_gzip(value: bytes, ok: bool) -> None:
    assert accepts_gzip(value) is ok


def test_header_value_and_list() -> None:
    lines = hdrs((b"Accept", b"*/*"), (b"ACCEPT-Encoding", b" br "), (b"accept-encoding", b"gzip"))
    assert header_value(lines, b"accept-encoding") == b"br"
    assert header_value(lines, b"accept") == b"*/*"
    assert header_value(lines, b"vary") is None
    assert header_list(lines, b"accept-encoding") == b"br, gzip"
    assert header_list(lines, b"vary") is None


def test_media_type() -> None:
    assert media_type(b" Text/HTML ; charset=UTF-8") == b"text/html"
    assert media_type(b"application/json") == b"application/json"


def test_should_gzip_yes() -> None:
    assert should_gzip(ON, 200, False, b"gzip", HTML, 1000)
    assert should_gzip(ON, 404, False, b"gzip", HTML, None)  # unknown length: compressed
    assert should_gzip(ON, 200, False, b"gzip", HTML, 500)  # exactly min_length


@pytest.mark.parametrize(
    ("cfg", "status", "head", "ae", "lines", "length"),
    [
        (CompressConfig(gzip=False), 200, False, b"gzip", HTML, 1000),
        (ON, 200, False, None, HTML, 1000),
        (ON, 200, False, b"gzip;q=0", HTML, 1000),
        (ON, 200, False, b"br", HTML, 1000),
        (ON, 200, True, b"gzip", HTML, 1000),
        (ON, 204, False, b"gzip", HTML, 1000),
        (ON, 206, False, b"gzip", HTML, 1000),
        (ON, 304, False, b"gzip", HTML, 1000),
        (ON, 101, False, b"gzip", HTML, 1000),
        (ON, 103, False, b"gzip", HTML, 1000),
        (ON, 200, False, b"gzip", HTML, 499),
        (ON, 200, False, b"gzip", HTML + hdrs((b"Content-Encoding", b"br")), 1000),
        (ON, 200, False, b"gzip", HTML + hdrs((b"content-encoding", b"identity")), 1000),
        (ON, 200, False, b"gzip", hdrs((b"Content-Type", b"image/png")), 1000),
        (ON, 200, False, b"gzip", hdrs((b"Content-Length", b"1000")), 1000),
        (CompressConfig(gzip=True, types=("text/css",)), 200, False, b"gzip", HTML, 1000),
    ],
)
def test_should_gzip_no(
    cfg: CompressConfig,
    status: int,
    head: bool,
    ae: bytes | None,
    lines: list[bytes],
    length: int | None,
) -> None:
    assert not should_gzip(cfg, status, head, ae, lines, length)


def test_should_gzip_type_case_and_params() -> None:
    lines = hdrs((b"content-type", b"Application/JSON ; charset=utf-8"))
    assert should_gzip(ON, 200, False, b"*", lines, None)


def test_rewrite_headers_basic() -> None:
    lines = hdrs(
        (b"Content-Type", b"text/html"),
        (b"Content-Length", b"1000"),
        (b"ETag", b'"abc"'),
        (b"Accept-Ranges", b"bytes"),
        (b"X-Other", b"1"),
    )
    out = pairs(Gzipper(1).rewrite_headers(lines))
    assert out == [
        (b"Content-Type", b"text/html"),
        (b"ETag", b'W/"abc"'),
        (b"X-Other", b"1"),
        (b"Content-Encoding", b"gzip"),
        (b"Vary", b"Accept-Encoding"),
    ]
    assert len(lines) == 20  # the input is left as it was


def test_rewrite_headers_weak_etag_kept() -> None:
    out = pairs(Gzipper(1).rewrite_headers(hdrs((b"etag", b'W/"abc"'))))
    assert (b"etag", b'W/"abc"') in out


@pytest.mark.parametrize(
    ("vary", "expect"),
    [
        (b"Cookie", [(b"Vary", b"Cookie, Accept-Encoding")]),
        (b"accept-encoding", [(b"Vary", b"accept-encoding")]),
        (b"Cookie, Accept-Encoding", [(b"Vary", b"Cookie, Accept-Encoding")]),
        (b"*", [(b"Vary", b"*")]),
        (b"", [(b"Vary", b"Accept-Encoding")]),
    ],
)
def test_rewrite_headers_vary(vary: bytes, expect: list[tuple[bytes, bytes]]) -> None:
    out = pairs(Gzipper(1).rewrite_headers(hdrs((b"Vary", vary))))
    assert [p for p in out if p[0].lower() == b"vary"] == expect
    assert (b"Content-Encoding", b"gzip") in out


def test_rewrite_headers_vary_on_second_line() -> None:
    """A later Vary line already naming Accept-Encoding: the first is left alone."""
    lines = hdrs((b"Vary", b"Cookie"), (b"Vary", b"Accept-Encoding"))
    out = pairs(Gzipper(1).rewrite_headers(lines))
    assert [v for n, v in out if n == b"Vary"] == [b"Cookie", b"Accept-Encoding"]


def test_gzip_stream_round_trip() -> None:
    z = Gzipper(1)
    pieces = [b"hello " * 100, b"", os.urandom(5000), b"<p>text</p>\n" * 3000, b"x"]
    out = bytearray()
    for piece in pieces:
        out += z.compress(piece)
        out += z.flush_sync()
    out += z.finish()
    assert gzip.decompress(bytes(out)) == b"".join(pieces)


def test_flush_sync_makes_bytes_decodable_now() -> None:
    """After flush_sync the client can decode everything sent so far, before the trailer."""
    z = Gzipper(6)
    sent = z.compress(b"event: tick\n\n") + z.flush_sync()
    assert sent  # something to send at once
    d = zlib.decompressobj(31)
    assert d.decompress(sent) == b"event: tick\n\n"
    sent2 = z.compress(b"event: tock\n\n") + z.flush_sync()
    assert d.decompress(sent2) == b"event: tock\n\n"
    d.decompress(z.finish())
    assert d.eof


def test_compression_compresses() -> None:
    z = Gzipper(1)
    data = b"<div class='row'>same</div>\n" * 2000
    out = z.compress(data) + z.finish()
    assert len(out) < len(data) // 10
    assert out[:2] == b"\x1f\x8b"  # gzip framing, not zlib or raw deflate
