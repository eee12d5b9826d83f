"""One parsed request and its body, held so that it can be sent (again) to an upstream.

The client connection fills it from the parser's callbacks; the exchange sends it. It never
sees either of them: a request knows only the upstream connection its body goes to.

A body is held one of two ways. Buffered (`server.request_buffering`, the default): read whole
into a spool.RequestBody before any upstream is chosen, then sent with `Content-Length` and
replayable whatever its size. Streamed: framed as it goes upstream (`chunks`), the sent part let
go past `retry_body_bytes`. Either way nothing is written upstream from inside a parser
callback: the client connection calls `flush_body` once a read has parsed cleanly, so a bad
chunk in a read keeps every byte of that read from the upstream.
"""

from __future__ import annotations

from failproxy.proxy.spool import RequestBody, Sender
from failproxy.proxy.upstream import UpstreamConnection


class Request:
    __slots__ = (
        "awaiting",
        "body",
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
        "sender",
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
        self.conn_tokens: tuple[bytes, ...] = ()  # each Connection value
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
        # byte not yet known to be unneeded: `sent` of them reached the current upstream. Made
        # with the first streamed byte (most requests have none).
        self.chunks: list[bytes] | None = None
        self.held = 0
        self.sent = 0
        self.body_bytes = 0
        self.replayable = True
        self.complete = False
        self.has_body = False
        self.sink: UpstreamConnection | None = None
        # Buffered mode: the whole body, read before any upstream is contacted; `sender` sends
        # it to the current upstream connection; `awaiting`: its body is being read (the
        # client was told 100 Continue if it asked).
        self.awaiting = False
        self.body: RequestBody | None = None
        self.sender: Sender | None = None

    def add_body(self, data: bytes) -> None:
        """Streaming mode: hold `data` until `flush_body` (see the module docstring)."""
        chunks = self.chunks
        if chunks is None:
            chunks = self.chunks = []
        chunks.append(data)
        self.held += len(data)

    def flush_body(self, retry_limit: int) -> None:
        """Streaming mode: send what was held since the last flush to the attached upstream."""
        sink = self.sink
        chunks = self.chunks
        if sink is None or chunks is None or self.sent == len(chunks) or self.body is not None:
            return
        sink.writelines(chunks[self.sent :])
        self.sent = len(chunks)
        if self.held > retry_limit:
            self._drop_sent()

    def attach(self, sink: UpstreamConnection, retry_limit: int) -> bool:
        """Send the head and every held body byte to a new upstream; stream the rest to it.
        True when the request went out whole (buffered mode: False while the temp-file part
        waits for the connection's buffer to drain, `Sender.pump`). Raises OSError when a
        buffered body's temp file cannot be read."""
        self.sink = sink
        body = self.body
        if body is not None:
            sender = self.sender = Sender(body, sink)
            return sender.start(self.head)
        chunks = self.chunks
        if chunks:
            sink.writelines([self.head, *chunks])
            self.sent = len(chunks)
            if self.held > retry_limit:
                self._drop_sent()
        else:
            sink.write(self.head)
        return self.complete

    def detach(self) -> None:
        self.sink = None
        self.sender = None
        self.sent = 0

    def release(self) -> None:
        """The request is over (answered, or its client left): its held body goes (a temp file
        is closed, so its disk space is freed at once)."""
        body = self.body
        if body is not None:
            self.body = None
            body.close()
        if self.held:
            self.chunks = None
            self.held = 0

    def _drop_sent(self) -> None:
        """Past `retry_body_bytes` the sent part of the body is let go: no replay after this."""
        chunks = self.chunks
        assert chunks is not None, "only what was held is dropped"
        del chunks[: self.sent]
        self.held = sum(len(c) for c in chunks)
        self.sent = 0
        self.replayable = False
