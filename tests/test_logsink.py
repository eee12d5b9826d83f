"""The log sink's buffering (jsonlog.Sink, `[log] buffer` / `flush`), on a real file and a
real event loop: per loop turn by default; with a buffer, written once it fills or once the
oldest line has waited `flush` seconds, and always before the process forks or exits."""

from __future__ import annotations

import asyncio
import os
import re
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import vclock

from failproxy import config
from failproxy.proxy import rawtransport
from failproxy.telemetry import jsonlog
from failproxy.telemetry.jsonlog import Sink, Timestamper


def test_by_default_lines_are_written_once_per_loop_turn(tmp_path: Path) -> None:
    path = tmp_path / "log"
    sink = Sink(None, str(path))

    async def main() -> tuple[bytes, bytes]:
        sink.write(b"a\n")
        sink.write(b"b\n")
        before = path.read_bytes()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return before, path.read_bytes()

    before, after = asyncio.run(main())
    assert (before, after) == (b"", b"a\nb\n")


def test_a_buffer_waits_until_full_or_flush_seconds(tmp_path: Path) -> None:
    """On a virtual clock (tests/vclock.py): the flush-after deadline is checked to the
    millisecond, whatever the machine's load."""
    path = tmp_path / "log"
    sink = Sink(None, str(path), buffer=64, flush_after=0.2)

    async def main() -> list[bytes]:
        loop = asyncio.get_running_loop()
        seen = []
        start = loop.time()
        sink.write(b"x" * 20 + b"\n")
        await asyncio.sleep(0.05)
        seen.append(path.read_bytes())  # 21 bytes of 64, 0.05 s of 0.2: still gathered
        await asyncio.sleep(start + 0.199 - loop.time())
        seen.append(path.read_bytes())  # 1 ms before the oldest waited 0.2 s: still gathered
        await asyncio.sleep(start + 0.2 - loop.time())
        await asyncio.sleep(0)  # the flush was due at the same time: it ran in that turn
        seen.append(path.read_bytes())  # the oldest waited 0.2 s: written
        sink.write(b"y" * 40 + b"\n")
        sink.write(b"z" * 40 + b"\n")  # 82 >= 64: written at once, in order
        seen.append(path.read_bytes())
        sink.write(b"w\n")
        sink.flush()  # what a worker does before it exits (and the master before fork)
        seen.append(path.read_bytes())
        await asyncio.sleep(1.0)  # the flush-after timer of "y" was cancelled: nothing more
        seen.append(path.read_bytes())
        return seen

    seen = vclock.run(main())
    first = b"x" * 20 + b"\n"
    assert seen[0] == b""
    assert seen[1] == b""
    assert seen[2] == first
    assert seen[3] == first + b"y" * 40 + b"\n" + b"z" * 40 + b"\n"
    assert seen[4] == seen[3] + b"w\n"
    assert seen[5] == seen[4]


SERVER = '[[upstream.server]]\naddress = "unix:/run/app.sock"\n'


def test_the_keys_default_to_per_turn_writes() -> None:
    cfg = config.loads('[log]\nbuffer = 65536\nflush = 1\n' + SERVER)
    assert (cfg.log.buffer, cfg.log.flush) == (65536, 1.0)
    default = config.loads(SERVER).log
    assert (default.buffer, default.flush) == (0, 1.0)


def test_a_child_forked_inside_a_running_loop_writes_through_its_own_loop(tmp_path: Path) -> None:
    """The sink caches the loop it schedules its flush on (asyncio.get_running_loop() costs a
    getpid() syscall); a worker forked from inside the master's running loop must not use the
    copy of the master's loop it inherits, or its lines would wait for a loop nobody runs."""
    import os

    path = tmp_path / "log"
    sink = Sink(None, str(path))

    async def parent() -> int:
        sink.write(b"parent\n")  # caches this loop
        await asyncio.sleep(0)
        pid = os.fork()
        if pid == 0:
            try:
                async def child() -> None:
                    sink.write(b"child\n")
                    await asyncio.sleep(0.05)

                asyncio.new_event_loop().run_until_complete(child())
            finally:
                os._exit(0)
        return pid

    pid = asyncio.run(parent())
    _, status = os.waitpid(pid, 0)
    assert status == 0
    assert path.read_bytes() == b"parent\nchild\n"


def test_timestamps_are_utc_iso_8601_with_the_milliseconds_of_now() -> None:
    """SPEC 5's `timestamp`: the millisecond digits come from a table, the rest from strftime
    once a second; a new Timestamper formats its first one from scratch, a second call in a
    later millisecond from the table."""
    stamper = Timestamper()
    for _ in range(2):
        before = time.time()
        text = stamper.now()
        after = time.time()
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", text), text
        at = datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
        assert int(before * 1000) / 1000 - 1e-6 <= at <= after, (before, text, after)
        deadline = time.monotonic() + 1
        while int(time.time() * 1000) == int(after * 1000) and time.monotonic() < deadline:
            pass  # into the next millisecond


def _written_with(write: Any, sink: Sink, line: bytes) -> None:
    jsonlog.use_writer(write)
    try:
        sink.write(line)
        sink.flush()
    finally:
        jsonlog.use_writer(os.write)


def test_lines_go_out_through_the_writer_handed_in_whole_however_it_cuts_them(
    tmp_path: Path,
) -> None:
    """A worker hands its own write(2) (jsonlog.use_writer: proxy/_sockio.write where built);
    a writer that takes part of the bytes is called again for the rest."""
    path = tmp_path / "log"
    sink = Sink(None, str(path))
    calls: list[int] = []

    def short_writes(fd: int, data: bytes) -> int:
        calls.append(len(data))
        return os.write(fd, data[:3])

    _written_with(short_writes, sink, b"one line\n")
    assert path.read_bytes() == b"one line\n"
    assert calls == [9, 6, 3]
    if rawtransport.SOCKIO is not None:
        _written_with(rawtransport.SOCKIO.write, sink, b"two\n")
        assert path.read_bytes() == b"one line\ntwo\n"
