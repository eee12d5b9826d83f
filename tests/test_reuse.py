"""An ended upstream connection is reused for the next one only when nothing else holds it
(proxy/_reuse.pyx and upstream.open_connection): `take_ended` on plain objects, then a
unicorn-like upstream in-process (real UNIX sockets, an answer and a close per request), where
each request's connection is the same object made new, and one a test still holds is not."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import uvloop
from inprocess import Harness, request

from failproxy.proxy import upstream

pytestmark = pytest.mark.skipif(upstream._take_ended is None,
                                reason="no reuse without the Cython module (the pure build)")


class Obj:
    transport: Any
    _parser: Any


def entry() -> tuple[Obj, Any, Any]:
    conn = Obj()
    conn.transport, conn._parser = object(), object()
    return conn, conn.transport, conn._parser


def test_take_ended_takes_only_what_nothing_else_holds() -> None:
    take = upstream._take_ended
    assert take is not None
    assert take([]) is None
    ended = [entry()]
    assert isinstance(take(ended), Obj) and ended == [], "held by the list alone: taken"
    for part in range(3):  # the connection, its transport, its parser held here too
        ended = [entry()]
        kept = ended[0][part]
        assert take(ended) is None and ended == [], f"part {part} held elsewhere: dropped"
        del kept
    # the newest that nothing else holds; those looked at before it leave the list
    older, newer = entry(), entry()
    held_conn = newer[0]
    ended = [older, newer, entry()]
    del older, newer
    newest_id = id(ended[-1][0])
    assert id(take(ended)) == newest_id and len(ended) == 2
    assert take(ended) is not None and ended == [], "`newer` is dropped, `older` taken"
    assert held_conn is not None


HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"


def test_each_request_behind_a_closing_upstream_reuses_the_last_connection(
    tmp_path: Path,
) -> None:
    sock = tmp_path / "app.sock"

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        path = head.split(b" ", 2)[1]
        writer.write(HEAD % len(path) + path)
        await writer.drain()
        writer.close()  # unicorn's way: a connection per request

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await asyncio.start_unix_server(answer, str(sock))
        upstream._ENDED.clear()
        h = Harness(f'[[upstream.server]]\naddress = "unix:{sock}"\n', tmp_path / "log", loop)
        client, out = h.client()

        async def served(n: int) -> None:
            deadline = loop.time() + 5
            while out.data().count(b"HTTP/1.1 200") < n or len(upstream._ENDED) != 1:
                assert loop.time() < deadline, out.data()
                await asyncio.sleep(0.001)

        timers = set()
        for i in range(1, 5):
            client.data_received(request(f"/r{i}"))
            await served(i)
            # the same object each time, made new: generation counts the connections it was
            assert upstream._ENDED[0][0].generation == i
            timers.add(id(upstream._ENDED[0][0].timer))
        assert len(timers) == 1, "the timer was not kept with the connection"
        assert out.data().count(b"HTTP/1.1 200") == 4
        for i in range(1, 5):
            assert f"/r{i}".encode() in out.data()

        held = upstream._ENDED[0][0]  # a holder the reuse must respect
        assert held.closed and held.transport is not None and held.transport.is_closing()
        client.data_received(request("/r5"))
        await served(5)
        assert held.generation == 4 and held.closed and held.transport.is_closing()
        fresh = upstream._ENDED[0][0]
        assert fresh is not held and fresh.generation == 1
        assert [e["status"] for e in h.events("request")] == [200] * 5
        del held, fresh
        server.close()

    uvloop.run(asyncio.wait_for(main(), 10))
