"""requestparser.version_of (how the pure twin reads the version) against httptools' own
answer: every version llhttp accepts, with and without each header that sets llhttp's
keep-alive flags (the fast path must never call an HTTP/1.0 request 1.1: that would refuse it
for a missing Host and keep it open)."""

from __future__ import annotations

import httptools
import pytest

from failproxy.proxy.requestparser import version_of

VERSIONS = ("0.9", "1.0", "1.1", "2.0")
HEADERS = {
    "none": b"",
    "connection keep-alive": b"Connection: keep-alive\r\n",
    "connection close": b"Connection: close\r\n",
    "connection list with keep-alive": b"Connection: x-a, Keep-Alive\r\n",
    "connection upgrade": b"Connection: upgrade\r\nUpgrade: websocket\r\n",
    "connection other token": b"Connection: x-hop\r\n",
    "proxy-connection keep-alive": b"Proxy-Connection: keep-alive\r\n",
    "proxy-connection close": b"Proxy-Connection: close\r\n",
    "proxy-connection upper case": b"PROXY-CONNECTION: Keep-Alive\r\n",
    "content-length": b"Content-Length: 0\r\n",
    "chunked": b"Transfer-Encoding: chunked\r\n",
}


class _Head:
    """Reads both answers where downstream reads them: in on_headers_complete."""

    def __init__(self) -> None:
        self.parser: httptools.HttpRequestParser | None = None
        self.flagged = False
        self.answers: tuple[str, str] | None = None

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() in (b"connection", b"proxy-connection"):
            self.flagged = True

    def on_headers_complete(self) -> None:
        assert self.parser is not None
        self.answers = (version_of(self.parser, self.flagged), self.parser.get_http_version())


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("headers", HEADERS.values(), ids=list(HEADERS))
def test_the_fast_answer_is_httptools_answer(version: str, headers: bytes) -> None:
    head = _Head()
    parser = httptools.HttpRequestParser(head)
    head.parser = parser
    try:
        body = b"0\r\n\r\n" if b"chunked" in headers else b""
        parser.feed_data(b"GET / HTTP/" + version.encode() + b"\r\nHost: h\r\n" + headers +
                         b"\r\n" + body)
    except httptools.HttpParserUpgrade:
        pass  # the head was read: the upgrade is what follows it
    assert head.answers is not None, "the head was not parsed"
    fast, slow = head.answers
    assert slow == version
    assert fast == slow


@pytest.mark.parametrize("version", ("1.2", "1.9", "2.1", "3.0", "0.0"))
def test_llhttp_refuses_every_other_version(version: str) -> None:
    """The fast path's premise: llhttp parses no version besides the four above."""
    head = _Head()
    parser = httptools.HttpRequestParser(head)
    head.parser = parser
    with pytest.raises(httptools.HttpParserError):
        parser.feed_data(b"GET / HTTP/" + version.encode() + b"\r\nHost: h\r\n\r\n")
    assert head.answers is None
