"""One parsed request and its body, held so that it can be sent (again) to an upstream.

The client connection fills it from the parser's callbacks; the exchange sends it. It never
sees either of them: a request knows only the upstream connection its body streams to.
"""

from __future__ import annotations

from failproxy.upstream import UpstreamConnection


class Request:
    __slots__ = (
        "body_bytes",
        "chunked",
        "chunks",
        "complete",
        "conn_tokens",
        "content_length",
        "expect_continue",
        "has_body",
        "head",
        "head_size",
        "held",
        "host",
        "host_count",
        "http10",
        "keep_alive",
        "lines",
        "method",
        "replayable",
        "request_id",
        "sent",
        "sink",
        "started",
        "te",
        "upgrade",
        "url",
        "via",
        "xff",
    )

    def __init__(self, started: float) -> None:
        self.started = started
        self.method = b""
        self.url = b""
        # The headers to forward, as the pieces of the upstream head: name, b": ", value, CRLF.
        self.lines: list[bytes] = []
        self.host = b""  # the Host value among them
        self.head_size = 0
        self.host_count = 0
        self.content_length: bytes | None = None
        self.te = b""
        self.conn_tokens: list[bytes] = []
        self.upgrade = b""
        self.xff = b""
        self.via = b""
        self.request_id = ""
        self.expect_continue = False
        self.http10 = False
        self.keep_alive = True
        self.chunked = False
        self.head = b""
        # Body bytes as they go upstream (already chunk-framed when chunked), from the first
        # byte not yet known to be unneeded: `sent` of them reached the current upstream.
        self.chunks: list[bytes] = []
        self.held = 0
        self.sent = 0
        self.body_bytes = 0
        self.replayable = True
        self.complete = False
        self.has_body = False
        self.sink: UpstreamConnection | None = None

    def add_body(self, data: bytes, retry_limit: int) -> None:
        self.chunks.append(data)
        self.held += len(data)
        sink = self.sink
        if sink is not None:
            sink.write(data)
            self.sent = len(self.chunks)
            if self.held > retry_limit:
                self._drop_sent()

    def attach(self, sink: UpstreamConnection, retry_limit: int) -> None:
        """Send the head and every held body byte to a new upstream; stream the rest to it."""
        self.sink = sink
        if self.chunks:
            sink.writelines([self.head, *self.chunks])
            self.sent = len(self.chunks)
            if self.held > retry_limit:
                self._drop_sent()
        else:
            sink.write(self.head)

    def detach(self) -> None:
        self.sink = None
        self.sent = 0

    def _drop_sent(self) -> None:
        """Past `retry_body_bytes` the sent part of the body is let go: no replay after this."""
        del self.chunks[: self.sent]
        self.held = sum(len(c) for c in self.chunks)
        self.sent = 0
        self.replayable = False
