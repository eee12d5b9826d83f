"""Interleavings a subprocess test cannot choose, driven in-process on fake transports
(tests/inprocess.py), with a real uvloop loop and real sockets where the exchange connects."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop
from backends import TcpBlackhole
from inprocess import RESPONSE, FakeTransport, Harness, request

from failproxy.proxy import downstream, exchange, rawtransport, upstream
from failproxy.proxy.downstream import ClientConnection
from failproxy.proxy.exchange import Exchange
from failproxy.proxy.upstream import UpstreamConnection


def run(main: Callable[[], Awaitable[None]]) -> None:
    uvloop.run(asyncio.wait_for(main(), 10))


def test_client_gone_during_a_tcp_connect(tmp_path: Path) -> None:
    """The slot is given back at once, the request is logged 499, and the connect that ends
    later (here by its timeout) neither fails over nor writes to the gone client."""
    hole = TcpBlackhole()
    try:

        async def main() -> None:
            loop = asyncio.get_running_loop()
            toml = (f"[upstream]\nconnect_timeout = 0.3\n[[upstream.server]]\n"
                    f'address = "{hole.address}"\n[[upstream.server]]\n'
                    f'address = "unix:{tmp_path}/never.sock"\n')
            h = Harness(toml, tmp_path / "log", loop)
            first = h.ctx.order[0]
            client, out = h.client()
            client.data_received(request("/slow"))
            active = client.active
            assert active is not None and active.phase == exchange.CONNECTING
            assert first.inflight == 1
            client.connection_lost(None)
            assert first.inflight == 0, "the slot outlived its client"
            assert active.phase == exchange.DONE
            await asyncio.sleep(0.6)  # past connect_timeout: the connect ends now
            assert out.data() == b""
            assert [e["status"] for e in h.events("request")] == [499]
            assert h.events("failover") == [] and h.events("upstream_exhausted") == []
            assert all(p.inflight == 0 for p in h.ctx.peers)

        run(main)
    finally:
        hole.close()


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_upstream_eof_during_a_pooled_reuse(tmp_path: Path, method: str) -> None:
    """A pooled connection the upstream closes before any response byte: a GET is sent once
    more on a fresh connection to the same server (no failover, one answer); a POST is never
    replayed (SPEC 4.2): it is answered 502 and the fresh listener never sees it."""
    path = str(tmp_path / "up.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(8)
    listener.setblocking(False)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        h = Harness(f'[[upstream.server]]\naddress = "unix:{path}"\n', tmp_path / "log", loop)
        peer = h.ctx.peers[0]
        pooled, upstream_out = h.pooled(peer)
        client, out = h.client()
        body = "Content-Length: 3\r\n" if method == "POST" else ""
        client.data_received(request("/r", method, body) + (b"abc" if body else b""))
        assert upstream_out.data().startswith(f"{method} /r HTTP/1.1\r\n".encode())
        pooled.connection_lost(None)  # EOF before the first response byte
        if method == "GET":
            fresh, _ = await loop.sock_accept(listener)
            got = await loop.sock_recv(fresh, 65536)
            assert got.startswith(b"GET /r HTTP/1.1\r\n")
            await loop.sock_sendall(fresh, RESPONSE)
            for _ in range(100):
                if out.data().endswith(b"ok"):
                    break
                await asyncio.sleep(0.01)
            assert out.data().count(b"HTTP/1.1 200 OK") == 1
            (event,) = h.events("request")
            assert event["status"] == 200 and event["tries"] == 1
            fresh.close()
        else:
            assert out.data().startswith(b"HTTP/1.1 502 ")
            await asyncio.sleep(0.1)
            with pytest.raises(BlockingIOError):
                listener.accept()  # nobody connected: the POST was not replayed
            (event,) = h.events("request")
            assert event["status"] == 502
        assert h.events("failover") == []
        assert peer.inflight == 0

    try:
        run(main)
    finally:
        listener.close()


def test_pipelined_request_while_a_response_streams(tmp_path: Path) -> None:
    """The second request waits (reading paused) until the first response is complete, then
    goes out on the connection the first one freed; answers come in order."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        h = Harness('[[upstream.server]]\naddress = "unix:/nonexistent/up.sock"\n',
                    tmp_path / "log", loop)
        peer = h.ctx.peers[0]
        pooled, upstream_out = h.pooled(peer)
        client, out = h.client()
        client.data_received(request("/one"))
        assert upstream_out.take().startswith(b"GET /one ")
        pooled.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nfirst")
        client.data_received(request("/two"))
        transport = client.transport
        assert transport is not None and not transport.reading, "a pipelined request waits"  # type: ignore[attr-defined]
        assert upstream_out.data() == b"", "the second request went out too early"
        pooled.data_received(b"-part")
        assert upstream_out.take().startswith(b"GET /two "), "it did not follow"
        assert transport.reading  # type: ignore[attr-defined]
        pooled.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond")
        data = out.data()
        assert data.index(b"first-part") < data.index(b"second")
        assert data.count(b"HTTP/1.1 200 OK\r\n") == 2
        assert [e["path"] for e in h.events("request")] == ["/one", "/two"]
        assert peer.inflight == 0 and peer.idle == [pooled]

    run(main)


def test_phase_transitions_are_checked(tmp_path: Path) -> None:
    """The exchange's phase moves only along the table; a move off it is a bug, caught."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        h = Harness('[[upstream.server]]\naddress = "unix:/nonexistent/up.sock"\n',
                    tmp_path / "log", loop)
        peer = h.ctx.peers[0]
        pooled, _ = h.pooled(peer)
        client, _ = h.client()
        client.data_received(request())
        active = client.active
        assert isinstance(active, Exchange) and active.phase == exchange.WAITING
        with pytest.raises(AssertionError, match="waiting -> new"):
            active._enter(exchange.NEW)
        pooled.data_received(RESPONSE)
        assert active.phase == exchange.DONE
        with pytest.raises(AssertionError, match="done -> relaying"):
            active._enter(exchange.RELAYING)

    run(main)


def test_a_slow_clients_answer_is_spooled_and_the_upstream_released(tmp_path: Path) -> None:
    """SPEC 9: while the client takes nothing, the answer goes on being read into the spool; the
    connection is pooled again the moment the answer is read whole (phase SENDING), and the
    client then gets every byte, in order, once it takes them."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        h = Harness(f'[server]\ntemp_dir = "{tmp_path}"\n[upstream]\n'
                    'response_buffer_bytes = 1000\n'
                    '[[upstream.server]]\naddress = "unix:/nonexistent/up.sock"\n',
                    tmp_path / "log", loop)
        peer = h.ctx.peers[0]
        pooled, upstream_out = h.pooled(peer)
        client, out = h.client()
        client.data_received(request("/big"))
        assert upstream_out.take().startswith(b"GET /big ")
        body = bytes(range(256)) * 40
        pooled.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
                             + body[:100])
        client.pause_writing()  # the client's socket buffer is full
        for i in range(100, len(body), 1000):
            pooled.data_received(body[i:i + 1000])
            assert pooled.transport is not None and not pooled.paused, "the upstream was held"
        active = client.active
        assert active is not None and active.phase == exchange.SENDING
        assert peer.idle == [pooled] and peer.inflight == 0, "released when read whole"
        assert out.high_water == 16384, "a slow client's transport buffer is kept small"
        assert active.spool is not None and active.spool.front_size == 0, "all in the file"
        assert h.events("request") == [], "not answered yet"
        client.resume_writing()
        data = out.data()
        assert data.endswith(body) and data.count(b"HTTP/1.1 200 OK") == 1
        (event,) = h.events("request")
        assert event["spilled_bytes"] > 0 and event["upstream_ms"] is not None
        assert client.active is None

    run(main)


def test_head_and_bad_chunk_in_one_read_reach_no_upstream_when_streaming(tmp_path: Path) -> None:
    """request_buffering = false: the head and a good chunk arrive with a bad one in one read;
    the pooled upstream connection is handed nothing at all."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        h = Harness('[server]\nrequest_buffering = false\n'
                    '[[upstream.server]]\naddress = "unix:/nonexistent/up.sock"\n',
                    tmp_path / "log", loop)
        pooled, upstream_out = h.pooled(h.ctx.peers[0])
        client, out = h.client()
        client.data_received(request("/up", "POST", "Transfer-Encoding: chunked\r\n")
                             + b"5\r\nhello\r\n5 \r\nworld\r\n0\r\n\r\n")
        assert upstream_out.data() == b""
        assert out.data().startswith(b"HTTP/1.1 400 ")
        assert h.ctx.peers[0].idle == [pooled]

    run(main)


def test_a_bad_chunk_after_the_answer_was_read_cuts_the_client(tmp_path: Path) -> None:
    """Streaming: the upstream answered (and was released) while the client's body still came;
    a bad chunk then must not put a second answer (a 400) after the spooled first one: the
    client connection is cut."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        h = Harness(f'[server]\nrequest_buffering = false\ntemp_dir = "{tmp_path}"\n'
                    '[[upstream.server]]\naddress = "unix:/nonexistent/up.sock"\n',
                    tmp_path / "log", loop)
        pooled, upstream_out = h.pooled(h.ctx.peers[0])
        client, out = h.client()
        client.data_received(request("/up", "POST", "Transfer-Encoding: chunked\r\n")
                             + b"5\r\nhello\r\n")
        assert upstream_out.data().startswith(b"POST /up ")  # streamed: the head went out
        client.pause_writing()
        pooled.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nyes")
        active = client.active
        assert active is not None and active.phase == exchange.SENDING
        client.data_received(b"zz\r\n")
        transport = client.transport
        assert transport is not None and transport.aborted  # type: ignore[attr-defined]
        assert b"400" not in out.data()
        assert active.phase == exchange.DONE

    run(main)


def test_send_timeout_counts_time_without_progress(tmp_path: Path) -> None:
    """server.send_timeout, as nginx's: a client whose transport buffer stays full but shrinks
    (it takes bytes, slowly) is kept; one that takes nothing for send_timeout is cut, and its
    spooled answer's temp file goes with it."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        h = Harness(f'[server]\nsend_timeout = 0.5\ntemp_dir = "{tmp_path}"\n'
                    '[[upstream.server]]\naddress = "unix:/nonexistent/up.sock"\n',
                    tmp_path / "log", loop)
        pooled, _ = h.pooled(h.ctx.peers[0])
        client, out = h.client()
        client.data_received(request("/big"))
        body = b"x" * 200_000
        pooled.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
        out.buffered = 100_000
        client.pause_writing()
        pooled.data_received(body)
        active = client.active
        assert active is not None and active.phase == exchange.SENDING
        for _ in range(15):  # slow but steady, for three times send_timeout
            await asyncio.sleep(0.1)
            out.buffered -= 1000
            assert not out.aborted, "cut while the client was taking bytes"
        for _ in range(200):  # now it takes nothing: cut within send_timeout (and a turn)
            if out.aborted:
                break
            await asyncio.sleep(0.01)
        assert out.aborted
        client.connection_lost(None)
        (event,) = h.events("request")
        assert event["path"] == "/big" and event["bytes_sent"] < len(body)
        assert active.spool is None and active.phase == exchange.DONE

    run(main)


def test_a_held_request_whose_body_breaks_leaves_the_hold_queue(tmp_path: Path) -> None:
    """Streaming, a request held by the overflow policy (no free worker anywhere) whose body
    then breaks a rule: it is answered 400 and taken out of the hold queue, so a worker freeing
    up later does not send an answered request on."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        h = Harness('[server]\nrequest_buffering = false\n'
                    '[upstream]\nself = "127.0.0.1:9002"\n'
                    '[[upstream.server]]\naddress = "unix:/nonexistent/up.sock"\n'
                    '[[upstream.server]]\naddress = "127.0.0.1:9001"\nbackup = true\n'
                    '[[upstream.server]]\naddress = "127.0.0.1:9002"\nbackup = true\n',
                    tmp_path / "log", loop)
        room = h.ctx.room
        assert room is not None
        local, peer, _own = h.ctx.peers
        room._probe_at = loop.time() + 60
        local.acquire()  # its one worker is busy with ours
        room.capacity_of(peer).concurrency = 1.0
        peer.acquire()  # and so is the peer's
        client, out = h.client()
        client.data_received(request("/up", "POST", "Transfer-Encoding: chunked\r\n")
                             + b"5\r\nhello\r\n")
        active = client.active
        assert active is not None and active.phase == exchange.HELD
        assert [r for _, r in room.held] == [active]
        client.data_received(b"5 \r\nworld\r\n")
        assert out.data().startswith(b"HTTP/1.1 400 ")
        assert not room.held and active.phase == exchange.DONE
        local.release(False)
        room.release()  # a worker is free: nothing is sent on
        assert local.inflight == 0

    run(main)


class _Faulty(FakeTransport):
    """A transport whose write meets a bug: the fault injected into a real code path (the
    hot path calls its transport's write, compiled or not)."""

    def __init__(self, fail_on: bytes) -> None:
        super().__init__()
        self.fail_on = fail_on

    def write(self, data: bytes) -> None:
        if self.fail_on in data:
            raise RuntimeError("injected fault")
        super().write(data)

    def writelines(self, lines: list[bytes]) -> None:
        for data in lines:
            self.write(data)


def _has_traceback(event: dict[str, Any]) -> None:
    """The record keeps the exception's type, message and frames (down to the faulty write),
    whichever of structlog's renderings the JSON log uses."""
    text = json.dumps(event.get("exception"))
    assert "RuntimeError" in text and "injected fault" in text and "write" in text, event


def _catch_all_harness(tmp_path: Path, loop: asyncio.AbstractEventLoop) -> Harness:
    return Harness(f'[[upstream.server]]\naddress = "unix:{tmp_path}/none.sock"\n',
                   tmp_path / "log", loop)


def test_a_bug_before_the_answer_gets_a_500_and_the_worker_serves_on(tmp_path: Path) -> None:
    """The catch-all: a handler that raises (here while sending the request upstream) answers
    500, logs `internal_error` with the traceback, gives the upstream slot back and cuts that
    upstream connection; the next connection is served as if nothing happened."""

    async def main() -> None:
        h = _catch_all_harness(tmp_path, asyncio.get_running_loop())
        peer = h.ctx.peers[0]
        bad = UpstreamConnection(peer, h.loop)
        bad_out = _Faulty(b"/boom")
        bad.transport = bad_out  # type: ignore[assignment]
        bad.idle_since = h.loop.time()
        peer.put_idle(bad)
        client, out = h.client()
        client.data_received(request("/boom"))  # must not raise into the loop
        assert out.data().startswith(b"HTTP/1.1 500 "), out.data()
        assert b"Connection: close" in out.data() and out.closing
        assert bad_out.aborted, "the upstream connection the bug met is never reused"
        assert peer.inflight == 0, "the slot outlived the bug"
        (error,) = h.events("internal_error")
        assert error["path"] == "/boom" and error["where"] == "client read"
        _has_traceback(error)
        assert [e["status"] for e in h.events("request")] == [500]

        good, good_out = h.pooled(peer)
        client2, out2 = h.client()
        client2.data_received(request("/fine"))
        assert good_out.data().startswith(b"GET /fine HTTP/1.1\r\n")
        good.data_received(RESPONSE)
        assert out2.data().startswith(b"HTTP/1.1 200 OK") and out2.data().endswith(b"ok")
        assert peer.inflight == 0

    run(main)


def test_a_bug_after_the_answer_began_cuts_the_client(tmp_path: Path) -> None:
    """Once the head went out no 500 can follow: the client connection is cut, so the client
    never takes the part it got for a whole answer; the slot is given back, the upstream
    connection cut, the bug logged with its traceback."""

    async def main() -> None:
        h = _catch_all_harness(tmp_path, asyncio.get_running_loop())
        peer = h.ctx.peers[0]
        upstream, upstream_out = h.pooled(peer)
        client = ClientConnection(h.ctx, False)
        out = _Faulty(b"second half")
        client.connection_made(out)  # type: ignore[arg-type]
        client.data_received(request("/stream"))
        assert upstream_out.data().startswith(b"GET /stream HTTP/1.1\r\n")
        upstream.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 22\r\n\r\nfirst half")
        assert out.data().endswith(b"first half")
        upstream.data_received(b"second half.")  # the client write meets the bug
        assert out.aborted, "a cut answer is never presented as complete"
        assert upstream_out.aborted
        assert peer.inflight == 0
        (error,) = h.events("internal_error")
        assert error["where"] == "upstream read"
        _has_traceback(error)

    run(main)


def test_answers_read_in_one_upstream_batch_leave_at_its_end(tmp_path: Path) -> None:
    """rawtransport.Poller reads every ready upstream socket in one batch: the answers it
    relays are held to the batch's end and then written together, each client's in order.
    One as large as HOLD_BELOW goes at once (a writer filling the transport sees it fill); a
    connection closed inside the batch sends what it held first; outside a batch a write goes
    at once."""

    async def main() -> None:
        h = _catch_all_harness(tmp_path, asyncio.get_running_loop())
        peer = h.ctx.peers[0]
        batch = rawtransport.poller(h.loop)
        up1, (c1, out1) = h.pooled(peer)[0], h.client()
        c1.data_received(request("/one"))  # each request takes the connection just pooled
        up2, (c2, out2) = h.pooled(peer)[0], h.client()
        c2.data_received(request("/two", extra="Connection: close\r\n"))
        up3, (c3, out3) = h.pooled(peer)[0], h.client()
        c3.data_received(request("/big"))
        big = b"b" * downstream.HOLD_BELOW

        batch.batching = True
        up1.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nfirst")
        up1.data_received(b"-half")
        up2.data_received(RESPONSE)
        up3.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(big) + big)
        assert out1.data() == b"", "held to the batch's end"
        assert out2.data().endswith(b"ok") and out2.closing, "sent before its close"
        assert out3.data().endswith(big), "a large answer is not held"
        batch.end_batch()
        assert not batch.batching
        assert out1.data().startswith(b"HTTP/1.1 200 OK") and out1.data().endswith(b"first-half")

        up4, (c4, out4) = h.pooled(peer)[0], h.client()
        c4.data_received(request("/four"))
        up4.data_received(RESPONSE)  # no batch: at once
        assert out4.data().endswith(b"ok")
        assert [e["status"] for e in h.events("request")] == [200] * 4

    run(main)


def test_a_bug_in_the_batch_end_write_cuts_the_client_and_the_answer(tmp_path: Path) -> None:
    """The same bug met where a connection writes what an upstream batch held (flush_held, at
    the batch's end, outside any read of its own): an answer still under way is cut with its
    upstream connection, one already read whole is not answered twice; the client is cut
    either way, the bug logged, and the other connections of the batch get their answers."""

    async def main() -> None:
        h = _catch_all_harness(tmp_path, asyncio.get_running_loop())
        peer = h.ctx.peers[0]
        batch = rawtransport.poller(h.loop)
        upstream, upstream_out = h.pooled(peer)
        client = ClientConnection(h.ctx, False)
        out = _Faulty(b"first half")
        client.connection_made(out)  # type: ignore[arg-type]
        client.data_received(request("/stream"))
        good_up, _ = h.pooled(peer)
        good, good_out = h.client()
        good.data_received(request("/fine"))
        batch.batching = True
        upstream.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 22\r\n\r\nfirst half")
        good_up.data_received(RESPONSE)
        assert out.data() == b"", "held to the batch's end"
        batch.end_batch()
        assert out.aborted and upstream_out.aborted, "an answer under way is cut"
        assert good_out.data().endswith(b"ok"), "the rest of the batch is written"
        assert peer.inflight == 0
        (error,) = h.events("internal_error")
        assert error["where"] == "client write" and error["path"] == "/stream"
        _has_traceback(error)

        upstream2, upstream2_out = h.pooled(peer)
        client2 = ClientConnection(h.ctx, False)
        out2 = _Faulty(b"whole")
        client2.connection_made(out2)  # type: ignore[arg-type]
        client2.data_received(request("/whole"))
        batch.batching = True
        upstream2.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nwhole")
        assert client2.active is None, "read whole: the exchange is over"
        batch.end_batch()
        assert out2.aborted and out2.data() == b"", "nothing follows a write that failed"
        assert not upstream2_out.aborted and upstream2 in peer.idle, "its answer was whole"
        errors = h.events("internal_error")
        assert len(errors) == 2 and errors[1]["where"] == "client write"
        _has_traceback(errors[1])

    run(main)


def test_the_idle_pool_is_lifo_bounded_and_keeps_what_a_careful_request_refuses(
    tmp_path: Path,
) -> None:
    """routing.peer's pool (the warmest connection kept apart from the older ones): taken most
    recently pooled first, refused past `keepalive`, a connection too old for a careful request
    kept as the oldest, a forgotten one gone wherever it sat, all closed by close_idle."""

    async def main() -> None:
        h = Harness('[upstream]\nkeepalive = 3\nkeepalive_timeout = 10.0\n'
                    '[[upstream.server]]\naddress = "unix:/nonexistent/up.sock"\n',
                    tmp_path / "log", asyncio.get_running_loop())
        peer = h.ctx.peers[0]
        now = h.loop.time()
        a, b, c = (h.pooled(peer)[0] for _ in range(3))
        assert peer.idle == [a, b, c] and peer.has_idle()
        extra = UpstreamConnection(peer, h.loop)
        assert not peer.put_idle(extra), "past keepalive = 3"
        assert peer.take_idle(now, False) is c
        assert peer.take_idle(now, False) is b
        assert peer.idle == [a]
        assert peer.put_idle(b) and peer.idle == [a, b]
        peer.forget_idle(a)  # an older one
        assert peer.idle == [b]
        peer.forget_idle(b)  # the warmest
        assert peer.idle == [] and not peer.has_idle()
        assert peer.take_idle(now, False) is None
        old, _ = h.pooled(peer)
        old.idle_since = now - 6.0  # past half of keepalive_timeout: not for a careful request
        fresh, _ = h.pooled(peer)
        assert peer.take_idle(now, True) is fresh
        assert peer.take_idle(now, True) is None, "too old for a careful request..."
        assert peer.idle == [old], "... but kept for another"
        newer, _ = h.pooled(peer)
        assert peer.idle == [old, newer]
        assert peer.take_idle(now, False) is newer and peer.take_idle(now, False) is old
        gone = [h.pooled(peer)[1] for _ in range(2)]
        peer.close_idle()
        assert peer.idle == [] and all(t.closing for t in gone)

    asyncio.run(main())


def test_a_connection_nobody_carries_ends_in_its_close_and_one_carrying_an_answer_later(
    tmp_path: Path,
) -> None:
    """UpstreamConnection.close() with no exchange (an answer complete, unicorn's close; an
    idle one closed): the socket is closed, the connection out of its pool and its parser and
    timer let go in the call (the timer given back, or held unarmed where the connection may be
    reused), and no connection_lost follows on a later turn. One still carrying
    an exchange ends as asyncio's transports end: on a later turn, the exchange told then."""

    async def main() -> None:
        h = _catch_all_harness(tmp_path, asyncio.get_running_loop())
        peer = h.ctx.peers[0]
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        idle = UpstreamConnection(peer, h.loop)
        idle.transport = rawtransport.SocketTransport(h.loop, ours.detach(), idle)
        assert peer.put_idle(idle) and peer.idle == [idle]
        timer = idle.timer
        idle.close()
        assert idle.closed and peer.idle == [], "in the call"
        if upstream._take_ended is not None:  # kept for its next life: held, calling nothing
            assert idle.timer is timer and timer.held_by(h.loop)
        else:  # given back: the connection holds a stand-in
            assert idle.timer is not timer
        assert idle.transport.is_closing() and not idle.transport.end_now()
        theirs.settimeout(5)
        assert theirs.recv(10) == b"", "the socket is closed"
        for _ in range(3):
            await asyncio.sleep(0)
        assert h.events("internal_error") == []

        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        up, (client, out) = h.pooled(peer)[0], h.client()
        up.transport = rawtransport.SocketTransport(h.loop, ours.detach(), up)
        client.data_received(request("/carried"))
        assert up.exchange is not None
        up.close()
        assert up.exchange is not None, "told on a later turn, not inside close()"
        for _ in range(3):
            await asyncio.sleep(0)
        assert up.exchange is None and out.data().startswith(b"HTTP/1.1 502")
        theirs.close()

    run(main)
